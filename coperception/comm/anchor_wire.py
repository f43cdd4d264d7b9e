"""The bytes of an anchor message (anchor-centric cooperation): a sender's most confident detections as
compact boxes, each with the codes of its anchor's feature, in one packet.

A cell message's header describes a grid, a codebook shape and a cell range (116 bytes with the CRC);
an anchor message needs none of that, so it has its own, smaller layout (little-endian):
  header (`ANCHOR_HEADER`, 55 bytes): magic "CA", version, flags, sender (i32), sequence (u32),
    capture time (f64), sender pose T_world_from_sender as translation (3 x f32) + unit quaternion
    (4 x f32), anchor-codebook hash (4 bytes), anchor count, code stages, bits per code
  anchors: per anchor `ANCHOR_RECORD` (10 bytes): x, y (i16, 1 cm), z (i8, 10 cm), length, width,
    height (u8, 5 cm), yaw (u8, 2 pi / 256), score (u8, 1/255), in the sender's frame
  codes: count x stages codes at `bits` each, bit-packed LSB first
  velocities (flag bit 2, motion compensation): per anchor vx, vy (i8, 0.25 m/s) in the sender's frame
  CRC32 of everything above; then, when flag bit 1 is set, HMAC-SHA256 (sender's key) of everything
  above including the CRC.
The translation is f32: world coordinates up to 10 km keep millimetres. Boxes beyond +-327 m of their
sender do not fit and are refused at encoding.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from coperception.comm.kinds import MalformedMessage
from coperception.comm.wire import (_CRC, _MAC, FLAG_HMAC, CodebookMismatch, CRCError, pack_bits, pose_fields,
                                   pose_from_fields, seal, unpack_bits, verify_signature)

ANCHOR_MAGIC = b"CA"
ANCHOR_VERSION = 1
ANCHOR_HEADER = struct.Struct("<2sBBiId3f4f4sBBB")
ANCHOR_RECORD = struct.Struct("<hhbBBBBB")
ANCHOR_SCALE = np.array([0.01, 0.01, 0.1, 0.05, 0.05, 0.05, 2 * np.pi / 256, 1 / 255])
ANCHOR_LIMITS = np.array([[-32768, 32767]] * 2 + [[-128, 127]] + [[1, 255]] * 3 + [[0, 255]] * 2)
FLAG_VELOCITY = 4
VELOCITY_SCALE = 0.25  # m/s per stored unit (i8: up to 31.75 m/s)
MAX_ANCHORS = 255


@dataclass
class AnchorMessage:
    """A decoded (or to-be-encoded) anchor message: boxes (K, 7) x y z l w h yaw and scores (K,) in the
    sender's frame, their anchor features' codes (K, stages)."""

    sender: int
    sequence: int
    capture_time: float
    pose: np.ndarray  # (4, 4) T_world_from_sender
    boxes: np.ndarray  # (K, 7)
    scores: np.ndarray  # (K,) in [0, 1]
    codes: np.ndarray  # (K, stages) integers < 2**bits
    bits: int
    codebook_hash: bytes = b"\0" * 4
    velocity: np.ndarray | None = None  # (K, 2) m/s in the sender's frame (motion compensation), or not sent


def anchor_message_size(count: int, stages: int, bits: int, signed: bool = False, velocity: bool = False) -> int:
    """Bytes of an anchor message of `count` anchors (what `encode_anchor_message` returns)."""
    return ANCHOR_HEADER.size + count * ANCHOR_RECORD.size + (count * stages * bits + 7) // 8 + _CRC + \
        (_MAC if signed else 0) + (2 * count if velocity else 0)


def quantize_boxes(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(K, 7) boxes and (K,) scores -> (K, 8) the integers the records hold (sizes at least one unit)."""
    values = np.column_stack([np.asarray(boxes, np.float64).reshape(-1, 7), np.asarray(scores, np.float64)])
    if not np.isfinite(values).all():
        raise ValueError("anchor message: non-finite box or score")
    values[:, 6] = np.mod(values[:, 6], 2 * np.pi)
    q = np.round(values / ANCHOR_SCALE).astype(np.int64)
    if (np.abs(q[:, :2]) > 32767).any():
        raise ValueError(f"anchor message: a box centre lies beyond {32767 * ANCHOR_SCALE[0]:.0f} m of its sender")
    q[:, 6] %= 256
    return np.clip(q, ANCHOR_LIMITS[:, 0], ANCHOR_LIMITS[:, 1])


def dequantize_boxes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `quantize_boxes`: boxes (K, 7), scores (K,)."""
    values = q.astype(np.float64) * ANCHOR_SCALE
    return values[:, :7], values[:, 7]


def encode_anchor_message(msg: AnchorMessage, mtu: int, key: bytes | None = None) -> bytes:
    """One packet of at most `mtu` bytes (a ValueError names what does not fit)."""
    count = len(msg.boxes)
    codes = np.asarray(msg.codes, dtype=np.int64)
    if codes.ndim != 2 or len(codes) != count:
        raise ValueError(f"anchor message: codes of shape {codes.shape} for {count} anchors, expected ({count}, stages)")
    stages = codes.shape[1]
    if count > MAX_ANCHORS:
        raise ValueError(f"{count} anchors: at most {MAX_ANCHORS} per message")
    velocity = b""
    if msg.velocity is not None:
        v = np.asarray(msg.velocity, np.float64).reshape(-1, 2)
        if len(v) != count or not np.isfinite(v).all():
            raise ValueError(f"anchor message: velocities of shape {v.shape} for {count} anchors, or not finite")
        velocity = np.clip(np.round(v / VELOCITY_SCALE), -128, 127).astype("i1").tobytes()
    size = anchor_message_size(count, stages, msg.bits, key is not None, msg.velocity is not None)
    if size > mtu:
        raise ValueError(f"anchor message of {count} anchors takes {size} bytes, more than the MTU {mtu}")
    q = quantize_boxes(msg.boxes, msg.scores)
    flags = (FLAG_HMAC if key else 0) | (FLAG_VELOCITY if msg.velocity is not None else 0)
    header = ANCHOR_HEADER.pack(ANCHOR_MAGIC, ANCHOR_VERSION, flags, int(msg.sender),
                                msg.sequence & 0xFFFFFFFF, float(msg.capture_time), *pose_fields(msg.pose),
                                msg.codebook_hash[:4], count, stages, msg.bits)
    return seal(header + b"".join(ANCHOR_RECORD.pack(*row) for row in q.tolist()) + pack_bits(codes, msg.bits)
                + velocity, key)


def decode_anchor_message(data: bytes, keys: Mapping[int, bytes] | None = None, require_auth: bool = False,
                          codebook_hash: bytes | None = None, stages: int | None = None,
                          bits: int | None = None) -> AnchorMessage:
    """Verify and decode one anchor packet; `codebook_hash`, `stages`, `bits`: what the receiver's anchor
    codebook is (a message coded otherwise is refused). Every violation is a `MalformedMessage`."""
    if len(data) < ANCHOR_HEADER.size + _CRC:
        raise MalformedMessage(f"anchor packet of {len(data)} bytes is shorter than header + CRC "
                               f"({ANCHOR_HEADER.size + _CRC})")
    fields = ANCHOR_HEADER.unpack_from(data)
    magic, version, flags, sender, sequence, t = fields[:6]
    translation, quat = fields[6:9], fields[9:13]
    cb_hash, count, n_stages, n_bits = fields[13:]
    if magic != ANCHOR_MAGIC:
        raise MalformedMessage(f"bad magic {magic!r} (expected {ANCHOR_MAGIC!r})")
    if version != ANCHOR_VERSION:
        raise MalformedMessage(f"anchor wire version {version} is not supported (expected {ANCHOR_VERSION})")
    mac_len = _MAC if flags & FLAG_HMAC else 0
    has_velocity = bool(flags & FLAG_VELOCITY)
    expected_size = anchor_message_size(count, n_stages, n_bits, bool(mac_len), has_velocity)
    if len(data) != expected_size:
        raise MalformedMessage(f"anchor packet of {len(data)} bytes, {count} anchors x {n_stages} codes of {n_bits} "
                               f"bits need {expected_size}")
    body_end = len(data) - mac_len - _CRC
    (crc,) = struct.unpack_from("<I", data, body_end)
    if zlib.crc32(data[:body_end]) != crc:
        raise CRCError(f"CRC32 mismatch in anchor message {sequence} from sender {sender}")
    verify_signature(data, body_end, bool(mac_len), sender, keys, require_auth, "anchor message")
    if codebook_hash is not None and cb_hash != codebook_hash[:4]:
        raise CodebookMismatch(f"anchor message from sender {sender} was coded with anchor codebook {cb_hash.hex()}, "
                               f"the receiver holds {codebook_hash[:4].hex()}")
    if (stages is not None and n_stages != stages) or (bits is not None and n_bits != bits) or not 1 <= n_bits <= 16:
        raise MalformedMessage(f"anchor message from sender {sender}: {n_stages} stages of {n_bits} bits, the receiver "
                               f"reads {stages} of {bits}")
    if not math.isfinite(t):
        raise MalformedMessage(f"anchor message from sender {sender}: non-finite capture time")
    try:
        pose = pose_from_fields((*translation, *quat))
    except MalformedMessage as exc:
        raise MalformedMessage(f"anchor message from sender {sender}: {exc}") from None
    start = ANCHOR_HEADER.size
    records = np.frombuffer(data, dtype=np.dtype([("x", "<i2"), ("y", "<i2"), ("z", "i1"), ("l", "u1"), ("w", "u1"),
                                                  ("h", "u1"), ("yaw", "u1"), ("score", "u1")]),
                            count=count, offset=start)
    q = np.column_stack([records[name].astype(np.int64) for name in records.dtype.names]) if count else \
        np.zeros((0, 8), np.int64)
    if count and (q[:, 3:6] == 0).any():
        raise MalformedMessage(f"anchor message from sender {sender}: a box of zero size")
    boxes, scores = dequantize_boxes(q)
    code_start = start + count * ANCHOR_RECORD.size
    velocity_start = body_end - (2 * count if has_velocity else 0)
    codes = unpack_bits(data[code_start:velocity_start], count * n_stages, n_bits).reshape(count, n_stages)
    velocity = None
    if has_velocity:
        velocity = np.frombuffer(data, dtype="i1", count=2 * count, offset=velocity_start).reshape(count, 2) \
            .astype(np.float64) * VELOCITY_SCALE
    return AnchorMessage(sender, sequence, t, pose, boxes, scores, codes, n_bits, cb_hash, velocity)

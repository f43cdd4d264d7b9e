"""The bytes on the air: a versioned, self-describing, packetised format for sparse BEV messages.

A message carries a set of BEV cells of the sender's grid, each with either integer codebook codes
(bit-packed, log2 K bits each) or fp32 feature values (the Where2comm-style baseline), or no payload
(the ego's request of information filling). It is split into MTU-sized packets; every packet
repeats the header, so it decodes on its own and a lost packet costs exactly its cells.

Packet layout (little-endian):
  header (`_HEADER`): magic "CPW1", version, kind, flags, bits per value, sender, sequence,
    packet index / count, capture time (f64), sender pose T_world_from_sender as translation
    (3 x f64) + unit quaternion (4 x f32), grid (x_min, y_min, cell size: f32; height, width: u16),
    codebook hash (8 bytes), segments m, stages r, feature channels, first cell of the packet's
    range, range length, number of cells, index section length
  index section: a bitmap over the range, or delta-varints (LEB128) of the cell indices,
    whichever is smaller (flag bit 0 says which)
  payload section: n_cells x m x r codes at `bits` each, bit-packed LSB first; or n_cells x C f32
  uncertainty section (flag bit 2): n_cells x 2 bytes, the sender's aleatoric and epistemic
    uncertainty of each cell (`models.uncertainty.quantize`)
  motion section (flag bit 3, first packet of a message only): object count (u8), then per moving
    object x, y (i16, 0.1 m), vx, vy (i8, 0.25 m/s), length, width (u8, 0.1 m), yaw (u8, pi/256),
    in the frame the message states (`MOTION_RECORD`)
  CRC32 of everything above; then, when flag bit 1 is set, HMAC-SHA256 (sender's key) of
  everything above including the CRC.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from coperception.comm.kinds import MalformedMessage, MessageKind
from coperception.grid import BEVGrid

MAGIC = b"CPW1"
VERSION = 1
_HEADER = struct.Struct("<4sBBBBiIHHd3d4f3f2H8sBBHIIII")  # sender is signed: RSU ids are negative
_CRC = 4
_MAC = 32
FLAG_VARINT = 1
FLAG_HMAC = 2
FLAG_UNCERTAINTY = 4
FLAG_MOTION = 8
MOTION_RECORD = struct.Struct("<hhbbBBB")  # x, y, vx, vy, length, width, yaw of one moving object
MOTION_FIELDS = 7
MOTION_SCALE = np.array([0.1, 0.1, 0.25, 0.25, 0.1, 0.1, np.pi / 256])  # units of each stored integer
MOTION_LIMITS = np.array([[-32768, 32767]] * 2 + [[-128, 127]] * 2 + [[0, 255]] * 3)
MAX_MOTION_OBJECTS = 255
DEFAULT_MTU = 1200


WIRE_KINDS = (MessageKind.CODES, MessageKind.SPARSE_FP32, MessageKind.REQUEST)
MAX_PACKET_BYTES = 65535  # one UDP datagram; nothing larger is read, so nothing larger is allocated


@dataclass(frozen=True)
class Expected:
    """What a receiver can use. A packet that claims anything else is rejected before its sections are
    allocated or its contents trusted."""

    grid: BEVGrid
    kinds: tuple[MessageKind, ...] = WIRE_KINDS
    channels: int | None = None  # SPARSE_FP32: values per cell
    segments: int | None = None  # CODES: the receiver's codebook shape
    stages: int | None = None
    bits: int | None = None
    codebook_hash: bytes | None = None


class CRCError(MalformedMessage):
    """The packet's CRC32 does not match its bytes."""


class AuthenticationError(MalformedMessage):
    """The HMAC is missing, or does not verify with the sender's key."""


class ReplayedMessage(MalformedMessage):
    """An authenticated message older than one already accepted from its sender."""


class StaleMessage(MalformedMessage):
    """An authenticated message whose capture time lies outside the receiver's freshness window."""


class CodebookMismatch(MalformedMessage):
    """The message was encoded with a different codebook than the receiver holds."""


@dataclass
class Message:
    """A decoded (or to-be-encoded) message. `cells` are flat indices row * width + col, ascending."""

    kind: MessageKind
    sender: int
    sequence: int
    capture_time: float
    pose: np.ndarray  # (4, 4) T_world_from_sender
    grid: BEVGrid
    cells: np.ndarray  # (N,) int64
    codes: np.ndarray | None = None  # (N, m, r) integers < 2**bits   (CODES)
    values: np.ndarray | None = None  # (N, C) float32                (SPARSE_FP32)
    bits: int = 0
    codebook_hash: bytes = b"\0" * 8
    packets_received: int = 0
    packets_total: int = 0
    uncertainty: np.ndarray | None = None  # (N, 2) uint8 per cell: aleatoric, epistemic (optional)
    # (K, 7) moving objects x, y, vx, vy, length, width, yaw in the stated frame; None: not sent, or its
    # packet (the first) was lost
    motion: np.ndarray | None = None

    @property
    def segments(self) -> int:
        return 0 if self.codes is None else int(self.codes.shape[1])

    @property
    def stages(self) -> int:
        return 0 if self.codes is None else int(self.codes.shape[2])


# ---------------------------------------------------------------- bit-level helpers (vectorized)

def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Non-negative integers < 2**bits -> a bit stream, `bits` per value, least significant bit first."""
    v = np.asarray(values, dtype=np.uint64).ravel()
    if v.size and int(v.max()) >= (1 << bits):
        raise ValueError(f"value {int(v.max())} does not fit in {bits} bits")
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if stream.size < count * bits:
        raise MalformedMessage(f"code section holds {stream.size} bits, {count} x {bits} needed")
    planes = stream[: count * bits].reshape(count, bits).astype(np.int64)
    return (planes << np.arange(bits, dtype=np.int64)[None, :]).sum(axis=1)


def varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes each non-negative integer takes as an LEB128 varint."""
    v = np.asarray(values, dtype=np.int64)
    n = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 9):
        n += v >= (1 << (7 * k))
    return n


def encode_varints(values: np.ndarray) -> bytes:
    v = np.asarray(values, dtype=np.int64)
    if v.size and v.min() < 0:
        raise ValueError("varints encode non-negative integers only")
    lengths = varint_lengths(v)
    out = np.zeros(int(lengths.sum()), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for k in range(int(lengths.max()) if v.size else 0):
        has = lengths > k
        byte = (v[has] >> (7 * k)) & 0x7F
        more = lengths[has] > k + 1
        out[starts[has] + k] = (byte | (more.astype(np.int64) << 7)).astype(np.uint8)
    return out.tobytes()


def decode_varints(data: bytes) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    if b.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = (b & 0x80) == 0
    if not ends[-1]:
        raise MalformedMessage("index section ends inside a varint")
    value_id = np.concatenate([[0], np.cumsum(ends)[:-1]])
    first = np.concatenate([[0], np.flatnonzero(ends)[:-1] + 1])
    position = np.arange(b.size) - first[value_id]
    if position.max() > 8:
        raise MalformedMessage("varint longer than 9 bytes")
    out = np.zeros(int(ends.sum()), dtype=np.int64)
    np.add.at(out, value_id, (b & 0x7F) << (7 * position))
    return out


# ---------------------------------------------------------------- encode

def codebook_digest(*arrays: np.ndarray) -> bytes:
    """8-byte identity of a codebook (SHA-256 of its float32 bytes and shapes)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype="<f4")
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.digest()[:8]


def pose_fields(pose: np.ndarray) -> list[float]:
    """A (4, 4) pose as the wire carries it: translation (3) and unit quaternion x, y, z, w (4)."""
    T = np.asarray(pose, dtype=np.float64)
    quat = Rotation.from_matrix(T[:3, :3]).as_quat()  # x, y, z, w
    return [*T[:3, 3].tolist(), *quat.astype(np.float32).tolist()]


def pose_from_fields(fields: Sequence[float]) -> np.ndarray:
    """Inverse of `pose_fields`; a non-finite pose or a quaternion of (near) zero norm is a `MalformedMessage`."""
    values = np.asarray(fields[:7], dtype=np.float64)
    if not np.isfinite(values).all():
        raise MalformedMessage("non-finite pose")
    T = np.eye(4)
    T[:3, 3] = values[:3]
    quat = values[3:7]
    norm = np.linalg.norm(quat)
    if norm < 1e-6:
        raise MalformedMessage("pose quaternion is not a rotation")
    T[:3, :3] = Rotation.from_quat(quat / norm).as_matrix()
    return T


def _payload_bits(msg: Message) -> int:
    if msg.kind == MessageKind.CODES:
        return msg.segments * msg.stages * msg.bits
    if msg.kind == MessageKind.SPARSE_FP32:
        return int(msg.values.shape[1]) * 32  # type: ignore[union-attr]
    return 0


def motion_bytes(motion: np.ndarray) -> bytes:
    """(K, 7) moving objects -> the motion section (count, then one `MOTION_RECORD` each), rounded to
    the stored units and clipped to what they hold."""
    m = np.asarray(motion, dtype=np.float64).reshape(-1, MOTION_FIELDS)
    if len(m) > MAX_MOTION_OBJECTS:
        raise ValueError(f"{len(m)} moving objects: at most {MAX_MOTION_OBJECTS} travel")
    if not np.isfinite(m).all():
        raise ValueError("motion: non-finite values")
    m = m.copy()
    m[:, 6] = np.mod(m[:, 6], np.pi)  # a footprint is the same turned by pi
    q = np.clip(np.round(m / MOTION_SCALE), MOTION_LIMITS[:, 0], MOTION_LIMITS[:, 1]).astype(np.int64)
    q[:, 6] %= 256
    return bytes([len(q)]) + b"".join(MOTION_RECORD.pack(*row) for row in q.tolist())


def decode_motion(data: bytes) -> np.ndarray:
    """The motion section -> (K, 7) floats; a `MalformedMessage` when its length does not match its count."""
    if not data:
        raise MalformedMessage("motion section is empty")
    count = data[0]
    if len(data) != 1 + count * MOTION_RECORD.size:
        raise MalformedMessage(f"motion section has {len(data)} bytes for {count} objects "
                               f"(expected {1 + count * MOTION_RECORD.size})")
    rows = [MOTION_RECORD.unpack_from(data, 1 + k * MOTION_RECORD.size) for k in range(count)]
    return np.asarray(rows, dtype=np.float64).reshape(-1, MOTION_FIELDS) * MOTION_SCALE


def _index_section(cells: np.ndarray) -> tuple[bytes, int]:
    """Cells of one packet (ascending) -> (bytes, flags): bitmap over their range or delta-varints."""
    start = int(cells[0])
    rel = cells - start
    bitmap_len = (int(rel[-1]) + 8) // 8
    deltas = np.diff(rel, prepend=0)
    if int(varint_lengths(deltas).sum()) < bitmap_len:
        return encode_varints(deltas), FLAG_VARINT
    bitmap = np.zeros(int(rel[-1]) + 1, dtype=np.uint8)
    bitmap[rel] = 1
    return np.packbits(bitmap, bitorder="little").tobytes(), 0


def _check_message(msg: Message) -> np.ndarray:
    if msg.kind not in WIRE_KINDS:
        raise ValueError(f"{msg.kind!r} does not travel in the wire format")
    cells = np.asarray(msg.cells, dtype=np.int64)
    if cells.ndim != 1 or (cells.size and (cells.min() < 0 or cells.max() >= msg.grid.cells)):
        raise ValueError("cells must be flat indices inside the grid")
    if cells.size > 1 and np.any(np.diff(cells) <= 0):
        raise ValueError("cells must be strictly ascending")
    if msg.kind == MessageKind.CODES:
        if msg.codes is None or msg.codes.ndim != 3 or len(msg.codes) != len(cells) or not 1 <= msg.bits <= 16:
            raise ValueError("CODES messages need codes (N, m, r) and 1 <= bits <= 16")
    elif msg.kind == MessageKind.SPARSE_FP32:
        if msg.values is None or msg.values.ndim != 2 or len(msg.values) != len(cells):
            raise ValueError("SPARSE_FP32 messages need values (N, C)")
    if msg.kind == MessageKind.REQUEST and (msg.uncertainty is not None or msg.motion is not None):
        raise ValueError("a REQUEST carries neither uncertainty nor motion")
    if msg.uncertainty is not None and (msg.uncertainty.shape != (len(cells), 2) or msg.uncertainty.dtype != np.uint8):
        raise ValueError("uncertainty must be (N, 2) uint8, one pair per cell")
    return cells


def encode_message(msg: Message, mtu: int = DEFAULT_MTU, key: bytes | None = None) -> list[bytes]:
    """Split a message into packets of at most `mtu` bytes, each decodable on its own."""
    cells = _check_message(msg)
    fixed = _HEADER.size + _CRC + (_MAC if key else 0)
    motion = motion_bytes(msg.motion) if msg.motion is not None else b""
    pbits = _payload_bits(msg) + (16 if msg.uncertainty is not None else 0)
    n = len(cells)
    # bytes of each cell's delta-varint if a packet started right before it (a packet's first delta is 0)
    cum_varint = np.concatenate([[0], np.cumsum(varint_lengths(np.diff(cells, prepend=cells[:1])))]) if n else np.zeros(1)
    chunks: list[tuple[int, int]] = []
    i = 0
    while i < n:
        j = np.arange(i + 1, n + 1)
        varint = 1 + cum_varint[j] - cum_varint[i + 1]
        bitmap = (cells[j - 1] - cells[i] + 8) // 8
        size = fixed + (len(motion) if not chunks else 0) + np.minimum(varint, bitmap) + ((j - i) * pbits + 7) // 8
        fits = int(np.searchsorted(size, mtu, side="right"))
        if fits == 0:
            with_motion = f" with the {len(motion)}-byte motion section" if motion and not chunks else ""
            raise ValueError(f"MTU {mtu} is too small for one cell{with_motion} ({int(size[0])} bytes)")
        chunks.append((i, i + fits))
        i += fits
    if not chunks:
        chunks = [(0, 0)]  # an empty message still tells the ego the sender is alive
    packets = []
    for p, (a, b) in enumerate(chunks):
        part = cells[a:b]
        if len(part):
            index_bytes, flags = _index_section(part)
            start, length = int(part[0]), int(part[-1] - part[0] + 1)
        else:
            index_bytes, flags, start, length = b"", 0, 0, 0
        if msg.kind == MessageKind.CODES:
            payload = pack_bits(msg.codes[a:b], msg.bits)  # type: ignore[index]
        elif msg.kind == MessageKind.SPARSE_FP32:
            payload = np.ascontiguousarray(msg.values[a:b], dtype="<f4").tobytes()  # type: ignore[index]
        else:
            payload = b""
        if msg.uncertainty is not None:
            payload += np.ascontiguousarray(msg.uncertainty[a:b], dtype=np.uint8).tobytes()
            flags |= FLAG_UNCERTAINTY
        if motion and p == 0:
            payload += motion
            flags |= FLAG_MOTION
        if key:
            flags |= FLAG_HMAC
        bits = msg.bits if msg.kind == MessageKind.CODES else (32 if msg.kind == MessageKind.SPARSE_FP32 else 0)
        channels = int(msg.values.shape[1]) if msg.kind == MessageKind.SPARSE_FP32 else 0  # type: ignore[union-attr]
        header = _HEADER.pack(MAGIC, VERSION, int(msg.kind), flags, bits, int(msg.sender),
                              msg.sequence & 0xFFFFFFFF, p, len(chunks), float(msg.capture_time),
                              *pose_fields(msg.pose), msg.grid.x_min, msg.grid.y_min, msg.grid.cell,
                              msg.grid.height, msg.grid.width, msg.codebook_hash, msg.segments, msg.stages, channels,
                              start, length, len(part), len(index_bytes))
        packets.append(seal(header + index_bytes + payload, key))
    return packets


def seal(body: bytes, key: bytes | None) -> bytes:
    """`body`, its CRC32 and, with `key`, the HMAC-SHA256 of both (every packet of both wire formats ends so)."""
    body += struct.pack("<I", zlib.crc32(body))
    return body + hmac.new(key, body, hashlib.sha256).digest() if key else body


def verify_signature(data: bytes, body_end: int, signed: bool, sender: int, keys: Mapping[int, bytes] | None,
                     require_auth: bool, what: str) -> None:
    """The HMAC that follows `data[:body_end]` and its CRC, checked with `sender`'s key (`signed`), or its
    absence refused (`require_auth`); `what` names the message in the `AuthenticationError`."""
    article = "an" if what[0] in "aeiou" else "a"
    if signed:
        key = (keys or {}).get(sender)
        if key is None:
            raise AuthenticationError(f"{what} from sender {sender} is signed but no key is known for it")
        mac = hmac.new(key, data[: body_end + _CRC], hashlib.sha256).digest()
        if not hmac.compare_digest(mac, data[body_end + _CRC :]):
            raise AuthenticationError(f"HMAC of {article} {what} from sender {sender} does not verify with its key")
    elif require_auth:
        raise AuthenticationError(f"{what} from sender {sender} is not signed but authentication is required")


# ---------------------------------------------------------------- decode

@dataclass
class Packet:
    """One decoded packet: header fields and its share of the cells."""

    kind: MessageKind
    sender: int
    sequence: int
    index: int
    count: int
    capture_time: float
    pose: np.ndarray
    grid: BEVGrid
    codebook_hash: bytes
    bits: int
    cells: np.ndarray
    codes: np.ndarray | None
    values: np.ndarray | None
    size: int
    uncertainty: np.ndarray | None = None
    motion: np.ndarray | None = None


def decode_packet(data: bytes, keys: Mapping[int, bytes] | None = None, codebook_hash: bytes | None = None,
                  require_auth: bool = False, expected: Expected | None = None) -> Packet:
    """Verify, validate and decode one packet. `keys` maps sender id -> HMAC key; with `require_auth` a
    packet without a valid HMAC is rejected. `codebook_hash`: the receiver's codebook identity;
    `expected`: everything the receiver can use (grid, kind, codebook shape or channels). Every
    violation is a `MalformedMessage` naming the field."""
    if expected is not None and expected.codebook_hash is not None:
        codebook_hash = expected.codebook_hash
    if len(data) < _HEADER.size + _CRC:
        raise MalformedMessage(f"packet of {len(data)} bytes is shorter than header + CRC ({_HEADER.size + _CRC})")
    if len(data) > MAX_PACKET_BYTES:
        raise MalformedMessage(f"packet of {len(data)} bytes is larger than {MAX_PACKET_BYTES}")
    fields = _HEADER.unpack_from(data)
    magic, version, kind, flags, bits, sender, sequence, index, count, t = fields[:10]
    pose_values = fields[10:17]
    x_min, y_min, cell, height, width, cb_hash, m, r, channels, start, length, n_cells, index_len = fields[17:]
    if magic != MAGIC:
        raise MalformedMessage(f"bad magic {magic!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise MalformedMessage(f"wire version {version} is not supported (expected {VERSION})")
    mac_len = _MAC if flags & FLAG_HMAC else 0
    body_end = len(data) - mac_len - _CRC
    if body_end < _HEADER.size:
        raise MalformedMessage("packet too short for its HMAC")
    (crc,) = struct.unpack_from("<I", data, body_end)
    if zlib.crc32(data[:body_end]) != crc:
        raise CRCError(f"CRC32 mismatch in packet {index} of message {sequence} from sender {sender}")
    verify_signature(data, body_end, bool(mac_len), sender, keys, require_auth, "packet")
    if kind not in WIRE_KINDS:
        raise MalformedMessage(f"message kind {kind} is not a wire-format kind (expected one of "
                               f"{', '.join(f'{k.value} {k.name}' for k in WIRE_KINDS)})")
    kind = MessageKind(kind)
    if expected is not None and kind not in expected.kinds:
        raise MalformedMessage(f"kind: {kind.name} from sender {sender}, the receiver reads "
                               f"{', '.join(k.name for k in expected.kinds)}")
    if codebook_hash is not None and kind == MessageKind.CODES and cb_hash != codebook_hash:
        raise CodebookMismatch(f"message from sender {sender} was encoded with codebook {cb_hash.hex()}, "
                               f"the receiver holds {codebook_hash.hex()}")
    if index >= count:
        raise MalformedMessage(f"packet index {index} >= packet count {count}")
    if not math.isfinite(t):
        raise MalformedMessage(f"capture time: {t} is not finite")
    if not all(math.isfinite(v) for v in pose_values):
        raise MalformedMessage("pose: not finite")
    if not (math.isfinite(x_min) and math.isfinite(y_min) and math.isfinite(cell) and cell > 0 and height and width):
        raise MalformedMessage(f"grid: x_min {x_min}, y_min {y_min}, cell {cell}, {height} x {width} is not a grid")
    grid = BEVGrid(float(x_min), float(y_min), float(cell), int(height), int(width))
    if expected is not None:
        _check_expected(expected, kind, grid, bits, m, r, channels, sender)
    if n_cells > grid.cells or length > grid.cells or start + length > grid.cells or n_cells > max(length, 0):
        raise MalformedMessage(f"cells: {n_cells} cells in [{start}, {start + length}) do not fit a grid of {grid.cells}")
    if kind == MessageKind.CODES and not 1 <= bits <= 16:
        raise MalformedMessage(f"bits: {bits} per code (1 to 16 travel)")
    pos = _HEADER.size
    index_bytes = data[pos : pos + index_len]
    if len(index_bytes) != index_len:
        raise MalformedMessage("index section runs past the end of the packet")
    pos += index_len
    if n_cells == 0:
        cells = np.zeros(0, dtype=np.int64)
    elif flags & FLAG_VARINT:
        deltas = decode_varints(index_bytes)
        # the first delta is 0 (the range starts at a cell), every later one >= 1 (ascending, no duplicate),
        # and none beyond the range: checked before summing, so nothing overflows
        if len(deltas) and (deltas[0] != 0 or (deltas[1:] < 1).any() or (deltas > length).any()):
            raise MalformedMessage("cells: delta-varint indices are not strictly ascending inside the packet's range")
        cells = start + np.cumsum(deltas)
    else:
        bitmap = np.unpackbits(np.frombuffer(index_bytes, dtype=np.uint8), bitorder="little")[:length]
        cells = start + np.flatnonzero(bitmap)
    if len(cells) != n_cells:
        raise MalformedMessage(f"index section lists {len(cells)} cells, header says {n_cells}")
    if n_cells and (cells[0] != start or cells[-1] >= start + length):
        raise MalformedMessage("cells: index outside the packet's range")
    rest = data[pos:body_end]
    if kind == MessageKind.REQUEST and flags & (FLAG_UNCERTAINTY | FLAG_MOTION):
        raise MalformedMessage("request packet claims uncertainty or motion")
    if flags & FLAG_MOTION and index != 0:
        raise MalformedMessage(f"motion section in packet {index} (only the first packet carries it)")
    if kind == MessageKind.CODES:
        if bits < 1:
            raise MalformedMessage(f"bits: {bits} per code")
        need = (n_cells * m * r * bits + 7) // 8
    elif kind == MessageKind.SPARSE_FP32:
        need = n_cells * channels * 4
    else:
        need = 0
    unc_len = 2 * n_cells if flags & FLAG_UNCERTAINTY else 0
    payload, unc_bytes, motion_section = rest[:need], rest[need : need + unc_len], rest[need + unc_len :]
    if len(payload) != need or len(unc_bytes) != unc_len or (motion_section and not flags & FLAG_MOTION):
        what = "code" if kind == MessageKind.CODES else ("value" if kind == MessageKind.SPARSE_FP32 else "request")
        raise MalformedMessage(f"{what} section: {len(rest)} bytes after the index section, expected {need}"
                               + (f" + {unc_len} of uncertainty" if unc_len else "")
                               + (" + the motion section" if flags & FLAG_MOTION else ""))
    codes = values = uncertainty = motion = None
    if kind == MessageKind.CODES:
        codes = unpack_bits(payload, n_cells * m * r, bits).reshape(n_cells, m, r)
    elif kind == MessageKind.SPARSE_FP32:
        values = np.frombuffer(payload, dtype="<f4").reshape(n_cells, channels).copy()
        if not np.isfinite(values).all():
            raise MalformedMessage(f"values: non-finite feature values from sender {sender}")
    if unc_len:
        uncertainty = np.frombuffer(unc_bytes, dtype=np.uint8).reshape(n_cells, 2).copy()
    if flags & FLAG_MOTION:
        motion = decode_motion(motion_section)
    return Packet(kind, sender, sequence, index, count, t, pose_from_fields(pose_values), grid, cb_hash, bits, cells,
                  codes, values, len(data), uncertainty, motion)


def assemble(packets: Sequence[Packet]) -> Message:
    """The packets of one message that arrived (any subset, any order) -> one Message."""
    if not packets:
        raise MalformedMessage("no packets to assemble")
    first = packets[0]
    for p in packets[1:]:
        if (p.sender, p.sequence, p.kind, p.count) != (first.sender, first.sequence, first.kind, first.count):
            raise MalformedMessage("packets of different messages cannot be assembled together")
        if (p.grid, p.bits, p.codebook_hash, p.capture_time) != (first.grid, first.bits, first.codebook_hash,
                                                                first.capture_time) \
                or not np.array_equal(p.pose, first.pose) or _row_shape(p) != _row_shape(first):
            raise MalformedMessage(f"packets of message {first.sequence} from sender {first.sender} disagree on "
                                   "its header (grid, bits, codebook, time, pose or payload shape)")
    by_index: dict[int, Packet] = {}
    for p in packets:
        if p.index in by_index and not np.array_equal(by_index[p.index].cells, p.cells):
            raise MalformedMessage(f"two different packets {p.index} of message {first.sequence} from sender {first.sender}")
        by_index[p.index] = p
    ordered = [by_index[i] for i in sorted(by_index)]
    cells = np.concatenate([p.cells for p in ordered])
    if len(cells) > 1 and (np.diff(cells) <= 0).any():
        raise MalformedMessage(f"cells: packets of message {first.sequence} from sender {first.sender} overlap")
    codes = np.concatenate([p.codes for p in ordered]) if first.kind == MessageKind.CODES else None  # type: ignore[misc]
    values = np.concatenate([p.values for p in ordered]) if first.kind == MessageKind.SPARSE_FP32 else None  # type: ignore[misc]
    with_uncertainty = [p.uncertainty is not None for p in ordered]
    if any(with_uncertainty) and not all(with_uncertainty):
        raise MalformedMessage(f"packets of message {first.sequence} from sender {first.sender} disagree on carrying "
                               "uncertainty")
    uncertainty = np.concatenate([p.uncertainty for p in ordered]) if all(with_uncertainty) else None  # type: ignore[misc]
    motion = by_index[0].motion if 0 in by_index else None
    return Message(first.kind, first.sender, first.sequence, first.capture_time, first.pose, first.grid, cells, codes,
                   values, first.bits, first.codebook_hash, len(ordered), first.count, uncertainty, motion)


def _row_shape(p: Packet) -> tuple[int, ...]:
    array = p.codes if p.codes is not None else p.values
    return tuple(array.shape[1:]) if array is not None else ()


def _check_expected(expected: Expected, kind: MessageKind, grid: BEVGrid, bits: int, segments: int, stages: int,
                    channels: int, sender: int) -> None:
    """The header against what the receiver can use (the grid compared at the float32 the wire carries)."""
    own = expected.grid
    as_sent = BEVGrid(*(float(np.float32(v)) for v in (own.x_min, own.y_min, own.cell)), own.height, own.width)
    if grid != as_sent:
        raise MalformedMessage(f"grid: sender {sender} sends {grid}, the receiver's is {as_sent}")
    if kind == MessageKind.CODES:
        claimed = {"segments": segments, "stages": stages, "bits": bits}
        for name, value in claimed.items():
            want = getattr(expected, name)
            if want is not None and value != want:
                raise MalformedMessage(f"{name}: sender {sender} sends {value}, the receiver's codebook has {want}")
    if kind == MessageKind.SPARSE_FP32 and expected.channels is not None and channels != expected.channels:
        raise MalformedMessage(f"channels: sender {sender} sends {channels}, the receiver expects {expected.channels}")


def decode_packets(packets: Sequence[bytes], **kwargs) -> Message:
    """Verify every packet (see `decode_packet`) and assemble them."""
    return assemble([decode_packet(p, **kwargs) for p in packets])

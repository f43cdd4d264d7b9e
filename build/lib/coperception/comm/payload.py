"""Uncompressed message payloads of the baseline methods, serialized to real bytes.

Every message starts with the same 72-byte header (magic, version, kind, sender, capture
time, the sender's 3x4 pose as float32, payload count) so byte counts compare fairly. The
compressed codebook format of the comm issue replaces the feature payload, not this header.
"""

from __future__ import annotations

import struct
import numpy as np

from coperception.comm.kinds import MessageKind

MAGIC = b"CPM1"
_HEADER = struct.Struct("<4sBBhid12fI")  # magic, version, kind, reserved, sender, time, pose, count


def _header(kind: MessageKind, sender: int, capture_time: float, pose: np.ndarray, count: int) -> bytes:
    return _HEADER.pack(MAGIC, 1, int(kind), 0, sender, capture_time,
                        *np.asarray(pose, dtype=np.float32)[:3, :4].ravel().tolist(), count)


def serialize_points(points: np.ndarray, sender: int, capture_time: float, pose: np.ndarray) -> bytes:
    """(N, 4) float32 x y z intensity."""
    pts = np.ascontiguousarray(points[:, :4], dtype="<f4")
    return _header(MessageKind.POINTS, sender, capture_time, pose, len(pts)) + pts.tobytes()


def serialize_boxes(boxes: np.ndarray, scores: np.ndarray, sender: int, capture_time: float, pose: np.ndarray) -> bytes:
    """(K, 7) boxes and (K,) scores as float32 rows of 8."""
    rows = np.ascontiguousarray(np.column_stack([boxes, scores]), dtype="<f4")
    return _header(MessageKind.BOXES, sender, capture_time, pose, len(rows)) + rows.tobytes()


def serialize_features(features: np.ndarray, sender: int, capture_time: float, pose: np.ndarray) -> bytes:
    """(C, H, W) float32 dense BEV features, preceded by the three dimensions as uint16."""
    feats = np.ascontiguousarray(features, dtype="<f4")
    shape = struct.pack("<3H", *feats.shape)
    return _header(MessageKind.DENSE_FP32, sender, capture_time, pose, feats.size) + shape + feats.tobytes()

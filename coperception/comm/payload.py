"""The uncompressed payload of dense intermediate messages (the whole float32 BEV map), serialized to real
bytes: a 72-byte header (magic, version, kind, sender, capture time, the sender's 3x4 pose as float32,
payload count), the map's three dimensions and its values. Sparse and codebook messages use the wire format
(`comm/wire.py`), boxes and anchors `comm/anchor_wire.py`, points `comm/point_wire.py`.
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


def serialize_features(features: np.ndarray, sender: int, capture_time: float, pose: np.ndarray) -> bytes:
    """(C, H, W) float32 dense BEV features, preceded by the three dimensions as uint16."""
    feats = np.ascontiguousarray(features, dtype="<f4")
    shape = struct.pack("<3H", *feats.shape)
    return _header(MessageKind.DENSE_FP32, sender, capture_time, pose, feats.size) + shape + feats.tobytes()

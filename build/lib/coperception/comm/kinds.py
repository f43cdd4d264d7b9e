"""What a message carries (one enum for the wire format and the baseline payloads) and the error a
message that does not decode raises."""

from __future__ import annotations

from enum import IntEnum

from coperception.errors import CoperceptionError


class MessageKind(IntEnum):
    CODES = 1  # codebook indices of selected cells (wire format)
    SPARSE_FP32 = 2  # float32 features of selected cells (wire format)
    REQUEST = 3  # cells only: what the ego already sees (wire format)
    POINTS = 4  # raw points (early fusion payload)
    BOXES = 5  # boxes + scores (late fusion payload)
    DENSE_FP32 = 6  # the whole float32 BEV map (dense intermediate payload)


class MalformedMessage(CoperceptionError):
    """A message whose bytes do not decode."""

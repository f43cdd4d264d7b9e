"""Message codecs of intermediate cooperation: how a sender's BEV features become a message.

- `dense`: the whole fp32 map. Measured as its serialized size; it is not pushed through the
  simulated channel (a 3 MB map per frame would not fit a 27 Mbit/s link at 10 Hz).
- `sparse`: the selected cells as fp32 values in the wire format (Where2comm-style).
- `codebook`: the selected cells as residual-codebook codes in the wire format.

A codec is the same object in training (`train_values`: a differentiable stand-in for what the
receiver decodes) and at evaluation (`payload` / `vectors`: the message's contents and back).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from coperception.comm.codebook import ResidualVQ
from coperception.comm.kinds import MessageKind
from coperception.comm.payload import serialize_features
from coperception.comm.wire import Expected, Message
from coperception.config import CodebookSettings
from coperception.grid import BEVGrid
from coperception.registry import Registry


class MessageCodec(nn.Module):
    """What every codec offers: its training stand-in and the identity of its code tables."""

    sparse: ClassVar[bool] = False  # sends the selected cells (a `CellCodec`), else the whole map

    def __init__(self, channels: int, settings: CodebookSettings):
        super().__init__()
        self.channels = channels

    def train_values(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(K, C) selected cell features -> what the receiver will decode (differentiably), and an
        auxiliary loss (None when there is none)."""
        return cells, None

    def digest(self) -> bytes | None:
        """The identity of the code tables the receiver must hold (None: no tables)."""
        return None


class CellCodec(MessageCodec, abc.ABC):
    """A codec of selected cells, carried in the wire format."""

    sparse = True

    @abc.abstractmethod
    def expected(self, grid: BEVGrid) -> Expected:
        """What a receiver holding this codec can decode (anything else is rejected on arrival)."""

    @abc.abstractmethod
    def payload(self, vectors: torch.Tensor) -> dict[str, Any]:
        """(K, C) cell features -> the payload fields of a wire `Message` (the sender adds the header
        fields and the codebook hash, `digest()`)."""

    @abc.abstractmethod
    def vectors(self, msg: Message) -> torch.Tensor:
        """A decoded wire message -> (K, C) cell features."""


CODECS: Registry[type[MessageCodec]] = Registry("comm.codec")


@CODECS.register("dense")
class DenseCodec(MessageCodec):
    def dense_bytes(self, features: torch.Tensor, sender: int, capture_time: float, pose: np.ndarray) -> int:
        """Serialized size of a whole (C, H, W) map."""
        return len(serialize_features(features.detach().cpu().numpy(), sender, capture_time, pose))


@CODECS.register("sparse")
class SparseFp32Codec(CellCodec):
    def expected(self, grid: BEVGrid) -> Expected:
        return Expected(grid, (MessageKind.SPARSE_FP32,), channels=self.channels)

    def payload(self, vectors: torch.Tensor) -> dict[str, Any]:
        return {"kind": MessageKind.SPARSE_FP32, "values": vectors.detach().cpu().numpy().astype(np.float32)}

    def vectors(self, msg: Message) -> torch.Tensor:
        assert msg.values is not None
        return torch.from_numpy(msg.values)


@CODECS.register("codebook")
class CodebookCodec(CellCodec):
    def __init__(self, channels: int, settings: CodebookSettings):
        super().__init__(channels, settings)
        self.quantizer = ResidualVQ(channels, settings.segments, settings.stages, settings.codes, settings.decay,
                                    settings.commitment)

    def train_values(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.quantizer(cells)
        return q.quantized, q.commitment_loss

    def digest(self) -> bytes | None:
        return self.quantizer.digest()

    def expected(self, grid: BEVGrid) -> Expected:
        q = self.quantizer
        return Expected(grid, (MessageKind.CODES,), segments=q.segments, stages=q.stages, bits=q.bits,
                        codebook_hash=q.digest())

    def payload(self, vectors: torch.Tensor) -> dict[str, Any]:
        return self.payload_codes(self.quantizer.encode(vectors))

    def payload_codes(self, codes: torch.Tensor, vectors: torch.Tensor | None = None) -> dict[str, Any]:
        """(K, m, r) codes computed elsewhere (an exported agent graph) -> the payload fields. A cell whose
        codes are negative (not computed there) is coded here from its row of `vectors` (K, C)."""
        missing = (codes < 0).flatten(1).any(dim=1)
        if bool(missing.any()):
            if vectors is None:
                raise ValueError(f"{int(missing.sum())} cells without codes and no features to code them from")
            codes = codes.clone()
            codes[missing] = self.quantizer.encode(vectors[missing].to(self.quantizer.codebook.device)).to(codes.device)
        return {"kind": MessageKind.CODES, "codes": codes.cpu().numpy().astype(np.int64), "bits": self.quantizer.bits}

    def vectors(self, msg: Message) -> torch.Tensor:
        assert msg.codes is not None
        return self.quantizer.decode(torch.from_numpy(msg.codes).to(self.quantizer.codebook.device))

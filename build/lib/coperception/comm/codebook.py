"""Residual multi-codebook vector quantization of BEV cell features.

A cell's C-dim feature is split into m segments of C/m; each segment is quantized by r residual
stages, each with its own K codes: stage s quantizes what stages < s left over. A cell is then
m x r integers of log2 K bits. Training starts from a k-means fit on the messages of many training
samples (`fit`), then uses the straight-through estimator (gradients pass to the
encoder as if quantization were the identity), a commitment loss pulling features towards their
codes, codebooks updated by exponential moving averages of the assigned vectors, and dead codes
(EMA usage below a threshold) re-seeded from vectors of the current batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from coperception.comm.wire import codebook_digest


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (N, C): straight-through in training, the decoded codes otherwise
    codes: torch.Tensor  # (N, m, r) int64
    commitment_loss: torch.Tensor  # scalar


class ResidualVQ(nn.Module):
    def __init__(self, channels: int, segments: int = 4, stages: int = 2, codes: int = 256, decay: float = 0.99,
                 commitment: float = 0.25, dead_usage: float = 0.03, eps: float = 1e-5):
        super().__init__()
        if channels % segments:
            raise ValueError(f"channels {channels} must be divisible by segments {segments}")
        if codes < 2 or codes & (codes - 1):
            raise ValueError(f"codes must be a power of two >= 2, got {codes}")
        self.channels, self.segments, self.stages, self.codes = channels, segments, stages, codes
        self.dim = channels // segments
        self.decay, self.commitment, self.dead_usage, self.eps = decay, commitment, dead_usage, eps
        self.register_buffer("codebook", torch.randn(segments, stages, codes, self.dim) * 0.01)
        self.register_buffer("ema_count", torch.ones(segments, stages, codes))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @property
    def bits(self) -> int:
        return int(math.log2(self.codes))

    def digest(self) -> bytes:
        """The codebook's identity on the wire (changes whenever a code changes)."""
        return codebook_digest(self.codebook.detach().cpu().numpy())

    def _nearest(self, residual: torch.Tensor, stage: int) -> torch.Tensor:
        """residual (N, m, d) -> (N, m) index of the nearest code of `stage` in each segment."""
        book = self.codebook[:, stage]  # (m, K, d)
        dist = (residual.pow(2).sum(-1, keepdim=True) - 2 * torch.einsum("nmd,mkd->nmk", residual, book)
                + book.pow(2).sum(-1)[None])
        return dist.argmin(dim=-1)

    def _stage(self, residual: torch.Tensor, stage: int, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One residual stage: (N, m, d) -> the (N, m) nearest codes of `stage` and what they leave over.
        With `chunk`, distances are computed that many vectors at a time (a k-means set's would not fit)."""
        parts = residual.split(chunk) if chunk else (residual,)
        index = torch.cat([self._nearest(part, stage) for part in parts])
        return index, residual - self._lookup(stage, index)

    def _assign(self, residual: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every stage in turn on (N, m, d): the (N, m, r) codes and the residual each stage quantized."""
        codes, inputs = [], []
        for s in range(self.stages):
            inputs.append(residual)
            index, residual = self._stage(residual, s)
            codes.append(index)
        return torch.stack(codes, dim=-1), inputs

    def _lookup(self, stage: int, index: torch.Tensor) -> torch.Tensor:
        """(N, m) indices -> (N, m, d) code vectors of `stage`."""
        seg = torch.arange(self.segments, device=index.device)[None, :].expand_as(index)
        return self.codebook[seg, stage, index]

    @torch.no_grad()
    def fit(self, x: torch.Tensor, iterations: int = 25, generator: torch.Generator | None = None,
            chunk: int = 8192) -> float:
        """Fit every stage by k-means on `x` (N, C), stage by stage on what the earlier stages leave;
        returns the relative squared reconstruction error. A far better start than codes drawn from
        one batch: online EMA updates on small batches settle in poor local optima."""
        if len(x) == 0:
            raise ValueError("k-means needs at least one vector")
        x = x.detach()
        residual = x.reshape(-1, self.segments, self.dim).clone()
        for s in range(self.stages):
            if len(residual) >= self.codes:
                pick = torch.randperm(len(residual), generator=generator)[: self.codes]
            else:  # fewer vectors than codes: duplicates, which training re-seeds as dead codes
                pick = torch.randint(0, len(residual), (self.codes,), generator=generator)
            self.codebook[:, s] = residual[pick].transpose(0, 1)
            for _ in range(iterations):
                index = torch.cat([self._nearest(part, s) for part in residual.split(chunk)])
                onehot = torch.nn.functional.one_hot(index, self.codes).to(residual.dtype)  # (N, m, K)
                count = onehot.sum(0)
                total = torch.einsum("nmk,nmd->mkd", onehot, residual)
                empty = count == 0
                if empty.any():  # restart empty codes on random vectors
                    seg_idx, code_idx = torch.nonzero(empty, as_tuple=True)
                    total[seg_idx, code_idx] = residual[torch.randint(0, len(residual), (len(seg_idx),), generator=generator), seg_idx]
                    count[seg_idx, code_idx] = 1.0
                self.codebook[:, s] = total / count[..., None]
            _, residual = self._stage(residual, s, chunk)
        self.ema_sum.copy_(self.codebook)
        self.ema_count.fill_(1.0)
        self.initialised.fill_(True)
        return float(residual.pow(2).sum() / x.pow(2).sum().clamp(min=1e-12))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) features -> (N, m, r) integer codes (nearest code at every stage)."""
        return self._assign(x.reshape(-1, self.segments, self.dim))[0]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, m, r) integer codes -> (N, C) features rebuilt from this codebook."""
        out = sum(self._lookup(s, codes[..., s]) for s in range(self.stages))
        return out.reshape(-1, self.channels)  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> QuantizerOutput:
        if x.numel() == 0:
            return QuantizerOutput(x, torch.zeros(0, self.segments, self.stages, dtype=torch.long, device=x.device),
                                   x.new_zeros(()))
        if self.training and not bool(self.initialised):  # no k-means fit before training: start from this batch
            self.fit(x, iterations=1, generator=generator)
        segments = x.reshape(-1, self.segments, self.dim)
        codes_t, residuals = self._assign(segments.detach())
        if self.training:
            self._ema_update(residuals, list(codes_t.unbind(-1)), generator)
        quantized = self.decode(codes_t).reshape(-1, self.segments, self.dim)
        commitment = self.commitment * (segments - quantized.detach()).pow(2).mean()
        out = segments + (quantized - segments).detach() if self.training else quantized
        return QuantizerOutput(out.reshape(-1, self.channels), codes_t, commitment)

    @torch.no_grad()
    def _ema_update(self, residuals: list[torch.Tensor], codes: list[torch.Tensor], generator: torch.Generator | None) -> None:
        for s, (residual, index) in enumerate(zip(residuals, codes)):
            onehot = torch.nn.functional.one_hot(index, self.codes).to(residual.dtype)  # (N, m, K)
            count = onehot.sum(0)  # (m, K)
            total = torch.einsum("nmk,nmd->mkd", onehot, residual)
            self.ema_count[:, s].mul_(self.decay).add_(count, alpha=1 - self.decay)
            self.ema_sum[:, s].mul_(self.decay).add_(total, alpha=1 - self.decay)
            n = self.ema_count[:, s].sum(-1, keepdim=True)
            smoothed = (self.ema_count[:, s] + self.eps) / (n + self.codes * self.eps) * n
            self.codebook[:, s] = self.ema_sum[:, s] / smoothed[..., None]
            dead = self.ema_count[:, s] < self.dead_usage
            if dead.any():  # re-seed unused codes with vectors of this batch
                seg_idx, code_idx = torch.nonzero(dead, as_tuple=True)
                pick = torch.randint(0, len(residual), (len(seg_idx),), generator=generator, device=residual.device)
                fresh = residual[pick, seg_idx]
                self.codebook[seg_idx, s, code_idx] = fresh
                self.ema_sum[seg_idx, s, code_idx] = fresh
                self.ema_count[seg_idx, s, code_idx] = 1.0

    def usage(self) -> np.ndarray:
        """(m, r) fraction of codes whose EMA usage is above the dead threshold."""
        return (self.ema_count > self.dead_usage).float().mean(-1).cpu().numpy()

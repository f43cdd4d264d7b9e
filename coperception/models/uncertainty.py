"""Per-cell uncertainty of an agent's own BEV features (the sender side of uncertainty-trust fusion).

A small head with dropout predicts, per anchor, an objectness logit and the log-variance of the box
regression in x, y and yaw (aleatoric uncertainty, trained with a Gaussian negative log-likelihood of
the detector's own regression error). Several stochastic passes with dropout left on (MC dropout)
give the spread of the objectness (epistemic uncertainty). `estimate` reduces both to two numbers per
cell; `quantize` / `dequantize` are what travels: one byte each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from coperception.models.heads import HeadOutput
from coperception.models.losses import sigmoid_focal_loss

REG_DIMS = (0, 1, 6)  # x, y, yaw of the 7 box residuals
LOG_STD_RANGE = (-8.0, 8.0)  # aleatoric std is sent as log(std) in this range, 256 steps
EPISTEMIC_MAX = 0.5  # the std of a probability is at most 0.5


class UncertaintyHead(nn.Module):
    def __init__(self, channels: int, anchors_per_cell: int, hidden: int = 64, dropout: float = 0.2, passes: int = 4):
        super().__init__()
        self.r, self.passes, self.dropout = anchors_per_cell, passes, dropout
        self.body = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.cls = nn.Conv2d(hidden, anchors_per_cell, 1)
        self.log_var = nn.Conv2d(hidden, anchors_per_cell * len(REG_DIMS), 1)
        nn.init.constant_(self.cls.bias, -math.log(99.0))
        nn.init.zeros_(self.log_var.weight)
        nn.init.zeros_(self.log_var.bias)

    def one_pass(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass with dropout on (training and MC sampling alike) over the body's output `hidden`:
        (N, R, H, W) logits, (N, R, 3, H, W) log-var. The body before the dropout is the same for every pass."""
        dropped = F.dropout(hidden, self.dropout, training=True)
        N, _, H, W = hidden.shape
        return self.cls(dropped), self.log_var(dropped).view(N, self.r, len(REG_DIMS), H, W)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.one_pass(self.body(features))

    @torch.no_grad()
    def estimate(self, features: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) -> (N, 2, H, W): aleatoric std (mean over x, y, yaw of the most confident anchor)
        and epistemic std of the objectness over `passes` MC-dropout passes; `hidden`: the body's output
        on `features` when the caller has it already."""
        probs, log_vars = [], []
        hidden = self.body(features) if hidden is None else hidden
        for _ in range(self.passes):
            logits, log_var = self.one_pass(hidden)
            probs.append(torch.sigmoid(logits))  # (N, R, H, W)
            log_vars.append(log_var)
        p = torch.stack(probs)  # (T, N, R, H, W)
        anchor = p.mean(0).argmax(dim=1, keepdim=True)  # the most confident anchor of each cell
        log_var = torch.stack(log_vars).mean(0)  # (N, R, 3, H, W)
        picked = torch.gather(log_var, 1, anchor[:, :, None].expand(-1, 1, len(REG_DIMS), -1, -1))[:, 0]
        aleatoric = torch.exp(0.5 * picked).mean(dim=1)
        epistemic = p.amax(dim=2).std(dim=0, unbiased=False)
        return torch.stack([aleatoric, epistemic], dim=1)


def quantize(uncertainty: torch.Tensor) -> torch.Tensor:
    """(..., 2, H, W)-shaped or (K, 2) values -> uint8 codes along the size-2 axis given by the caller's layout:
    log aleatoric std in `LOG_STD_RANGE`, epistemic std in [0, `EPISTEMIC_MAX`], 256 steps each."""
    lo, hi = LOG_STD_RANGE
    aleatoric, epistemic = uncertainty.unbind(dim=-1)
    a = ((torch.log(aleatoric.clamp(min=1e-12)) - lo) / (hi - lo) * 255).round().clamp(0, 255)
    e = (epistemic / EPISTEMIC_MAX * 255).round().clamp(0, 255)
    return torch.stack([a, e], dim=-1).to(torch.uint8)


def dequantize(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 2) -> float (..., 2) aleatoric std and epistemic std."""
    lo, hi = LOG_STD_RANGE
    a, e = codes.to(torch.float32).unbind(dim=-1)
    return torch.stack([torch.exp(lo + a / 255 * (hi - lo)), e / 255 * EPISTEMIC_MAX], dim=-1)


def most_uncertain(like: torch.Tensor) -> torch.Tensor:
    """An (N, 2, H, W) map like `like` at the largest aleatoric and epistemic uncertainty one byte each can
    carry: what a view without any uncertainty counts as."""
    top = dequantize(torch.full((2,), 255, dtype=torch.uint8)).to(like.device, like.dtype)
    return top[None, :, None, None].expand_as(like).clone()


def as_sent(uncertainty: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) -> the same after the one-byte quantization the wire applies (training sees what travels)."""
    moved = uncertainty.movedim(1, -1)
    return dequantize(quantize(moved)).to(uncertainty.dtype).movedim(-1, 1)


def uncertainty_loss(logits: torch.Tensor, log_var: torch.Tensor, head: HeadOutput, labels: torch.Tensor,
                     residuals: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss of the objectness plus the Gaussian NLL of the detector's (detached) x, y, yaw
    regression error at positive anchors. `logits` (N, R, H, W), `log_var` (N, R, 3, H, W); `head` the
    detector on the same N views, `labels` (N, A), `residuals` (N, A, 7) in anchor order (H, W, R)."""
    N = logits.shape[0]
    flat_logits = logits.permute(0, 2, 3, 1).reshape(N, -1)
    flat_log_var = log_var.permute(0, 3, 4, 1, 2).reshape(N, -1, len(REG_DIMS))
    positive = labels == 1
    care = labels >= 0
    n_pos = positive.sum().clamp(min=1).to(flat_logits.dtype)
    cls = (sigmoid_focal_loss(flat_logits, positive.to(flat_logits.dtype), alpha, gamma) * care).sum() / n_pos
    pred = head.reg.detach()[positive]
    target = residuals[positive]
    error = pred[:, list(REG_DIMS)] - target[:, list(REG_DIMS)]
    error[:, 2] = torch.sin(pred[:, 6] - target[:, 6])
    s = flat_log_var[positive]
    nll = 0.5 * (torch.exp(-s) * error.pow(2) + s)
    return cls + nll.sum() / n_pos

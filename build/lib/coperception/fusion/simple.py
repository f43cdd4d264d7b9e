"""Element-wise fusions over agents: max and mean of the valid cells."""

from __future__ import annotations

import torch

from coperception.fusion.base import Fusion, FusionMeta, register_fusion


@register_fusion("max")
class MaxFusion(Fusion):
    """Per cell and channel, the largest value among agents whose message covers the cell (a
    non-finite value counts as not covering it, so it cannot wipe out the others)."""

    def forward(self, features: torch.Tensor, valid: torch.Tensor, meta: FusionMeta) -> torch.Tensor:
        masked = features.masked_fill(~valid[:, :, None] | ~torch.isfinite(features), float("-inf"))
        fused = masked.amax(dim=1)
        return torch.where(torch.isfinite(fused), fused, torch.zeros_like(fused))


@register_fusion("mean")
class MeanFusion(Fusion):
    """Per cell and channel, the mean over agents whose message covers the cell with a finite value."""

    def forward(self, features: torch.Tensor, valid: torch.Tensor, meta: FusionMeta) -> torch.Tensor:
        w = valid[:, :, None] & torch.isfinite(features)
        total = features.masked_fill(~w, 0.0).sum(dim=1)
        return total / w.sum(dim=1).clamp(min=1).to(features.dtype)

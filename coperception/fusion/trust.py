"""Uncertainty-trust fusion (after CoDynTrust): every sender's cells are weighted by a learned trust.

Each sender sends, with its cells, their aleatoric and epistemic uncertainty (`models.uncertainty`).
Per cell a small network maps the detector's confidence of the sender's feature, both uncertainties
and the message's age to a trust in [0, 1]; the fused feature is the element-wise max of the ego's own
feature and every sender's feature scaled by its trust. The ego trusts itself fully, so a lone ego (or
senders trusted at 0) gives exactly the ego-only feature, and trust 1 everywhere gives max fusion.
Features are non-negative (ReLU), so scaling by trust only ever weakens a message.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from coperception.fusion.base import Fusion, FusionMeta, masked_max, register_fusion, usable_cells

TRUST_INPUTS = 4  # confidence, log aleatoric std, epistemic std, age


@register_fusion("uncertainty_trust")
class UncertaintyTrustFusion(Fusion):
    needs_confidence = True
    needs_uncertainty = True

    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        hidden: int = Field(16, ge=1)  # width of the trust network
        max_age_s: float = Field(0.5, gt=0)  # ages are scaled by this before the trust network
        initial_trust: float = Field(0.9, gt=0, lt=1)  # where training starts: near max fusion
        dropout: float = Field(0.2, ge=0, lt=1)  # of the senders' uncertainty head (MC dropout)
        passes: int = Field(4, ge=1)  # MC-dropout passes of a sender per frame

    def __init__(self, channels: int, settings: BaseModel | None = None):
        super().__init__(channels, settings)
        s = self.settings
        self.max_age = s.max_age_s
        self.trust = nn.Sequential(nn.Conv2d(TRUST_INPUTS, s.hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(s.hidden, 1, 1))
        nn.init.zeros_(self.trust[2].weight)
        nn.init.constant_(self.trust[2].bias, math.log(s.initial_trust / (1 - s.initial_trust)))

    def trust_of(self, meta: FusionMeta, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """(B, L, H, W) trust of every agent's cells (the ego's is 1)."""
        B, L, _, H, W = shape
        conf = meta.confidence if meta.confidence is not None else like.new_zeros(B, L, H, W)
        unc = meta.uncertainty if meta.uncertainty is not None else like.new_zeros(B, L, 2, H, W)
        age = (meta.age.to(like.device, like.dtype) / self.max_age)[:, :, None, None].expand(B, L, H, W)
        x = torch.stack([conf.to(like.dtype), torch.log(unc[:, :, 0].to(like.dtype) + 1e-3), unc[:, :, 1].to(like.dtype),
                         age], dim=2)
        trust = torch.sigmoid(self.trust(x.flatten(0, 1))).view(B, L, H, W)
        return torch.cat([torch.ones_like(trust[:, :1]), trust[:, 1:]], dim=1)

    def forward(self, features: torch.Tensor, valid: torch.Tensor, meta: FusionMeta) -> torch.Tensor:
        if features.shape[1] == 1:
            return features[:, 0]
        mask, clean = usable_cells(features, valid)
        return masked_max(clean * self.trust_of(meta, features.shape, features)[:, :, None], mask)

"""Attention fusion: per cell, the ego's feature attends over every agent's feature at that cell.

Scaled dot-product attention with `heads` heads; the query is a projection of the ego's feature, the
keys projections of each agent's feature (of the cell alone, or of its neighbourhood: `context`) plus a
learned embedding of its kind (vehicle, roadside unit) and of its message age.

With `base: none` the values are the agents' features themselves and the output is their attention-
weighted mean, so a cell that only the ego covers keeps the ego's feature exactly. With `base: max`
(the default) the attention reads projected values and its output, through a zero-initialised
projection, is added to the element-wise max of the valid features: training starts from max fusion
and learns what to add where agents disagree (a lone ego still gets exactly its own feature, because
the attention then reads only the ego's value and the correction it learned for the ego alone is
masked to cells where another agent arrived).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from coperception.fusion.base import Fusion, FusionMeta, masked_max, register_fusion, usable_cells

AGENT_KINDS = 2  # 0 vehicle, 1 rsu


@register_fusion("attention")
class AttentionFusion(Fusion):
    class Settings(BaseModel):
        model_config = ConfigDict(extra="forbid")
        heads: int = Field(4, ge=1)  # must divide the feature channels
        key_channels: int = Field(32, ge=1)  # per head
        max_age_s: float = Field(0.5, gt=0)  # ages are scaled by this before their embedding
        base: Literal["none", "max"] = "max"  # what the attention output is added to (see the module docstring)
        # kernel size of the query and key projections: 1 compares cells alone, 3 each cell's 3x3 neighbourhood
        # (what lies around a cell tells whether an agent's feature there is an object or its blurred edge)
        context: int = Field(1, ge=1)

        @field_validator("context")
        @classmethod
        def _odd(cls, value: int) -> int:
            if value % 2 == 0:
                raise ValueError(f"must be odd (a neighbourhood centred on the cell), got {value}")
            return value

    def __init__(self, channels: int, settings: BaseModel | None = None):
        super().__init__(channels, settings)
        s = self.settings
        if channels % s.heads:
            raise ValueError(f"attention fusion: heads {s.heads} must divide the {channels} feature channels")
        self.heads, self.dk, self.max_age = s.heads, s.key_channels, s.max_age_s
        self.query = nn.Conv2d(channels, s.heads * s.key_channels, s.context, padding=s.context // 2)
        self.key = nn.Conv2d(channels, s.heads * s.key_channels, s.context, padding=s.context // 2)
        self.kind_embedding = nn.Embedding(AGENT_KINDS, s.heads * s.key_channels)
        self.age_embedding = nn.Linear(1, s.heads * s.key_channels)
        self.base = s.base
        if self.base == "max":
            self.value = nn.Conv2d(channels, channels, 1)
            self.out = nn.Conv2d(channels, channels, 1)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, features: torch.Tensor, valid: torch.Tensor, meta: FusionMeta) -> torch.Tensor:
        B, L, C, H, W = features.shape
        hk = self.heads * self.dk
        mask, features = usable_cells(features, valid)
        q = self.query(features[:, 0]).view(B, self.heads, self.dk, H, W)
        k = self.key(features.flatten(0, 1)).view(B, L, hk, H, W)
        kind = meta.kind.to(features.device).clamp(0, AGENT_KINDS - 1)
        age = (meta.age.to(features.device, features.dtype) / self.max_age)[..., None]
        k = k + (self.kind_embedding(kind) + self.age_embedding(age))[..., None, None]
        k = k.view(B, L, self.heads, self.dk, H, W)
        scores = (q[:, None] * k).sum(dim=3) / math.sqrt(self.dk)  # (B, L, heads, H, W)
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        weights = torch.softmax(scores, dim=1)  # over agents
        if self.base == "none":
            v = features.view(B, L, self.heads, C // self.heads, H, W)
            return (weights[:, :, :, None] * v).sum(dim=1).reshape(B, C, H, W)
        v = self.value(features.flatten(0, 1)).view(B, L, self.heads, C // self.heads, H, W)
        attended = (weights[:, :, :, None] * v).sum(dim=1).reshape(B, C, H, W)
        base = masked_max(features, mask)
        others = mask[:, 1:].any(dim=1, keepdim=True)  # cells where something beyond the ego arrived
        return base + self.out(attended) * others.to(base.dtype)

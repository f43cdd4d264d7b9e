"""Anchor head: per-cell class scores, box residuals and direction bins for R anchors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class HeadOutput:
    """Flattened per anchor (anchor order H, W, R): cls (B, A), reg (B, A, 7), direction logits (B, A, 2)."""

    cls: torch.Tensor
    reg: torch.Tensor
    direction: torch.Tensor


class AnchorHead(nn.Module):
    def __init__(self, in_channels: int, anchors_per_cell: int, prior: float = 0.01):
        super().__init__()
        self.r = anchors_per_cell
        self.cls = nn.Conv2d(in_channels, anchors_per_cell, 1)
        self.reg = nn.Conv2d(in_channels, anchors_per_cell * 7, 1)
        self.dir = nn.Conv2d(in_channels, anchors_per_cell * 2, 1)
        nn.init.constant_(self.cls.bias, -float(np.log((1 - prior) / prior)))  # focal-loss prior
        nn.init.normal_(self.reg.weight, std=0.001)
        nn.init.zeros_(self.reg.bias)

    def forward(self, features: torch.Tensor) -> HeadOutput:
        B, _, H, W = features.shape
        cls = self.cls(features).permute(0, 2, 3, 1).reshape(B, H * W * self.r)
        reg = self.reg(features).permute(0, 2, 3, 1).reshape(B, H * W * self.r, 7)
        direction = self.dir(features).permute(0, 2, 3, 1).reshape(B, H * W * self.r, 2)
        return HeadOutput(cls, reg, direction)

    def confidence_map(self, features: torch.Tensor) -> torch.Tensor:
        """(B, H, W) max over anchors of the sigmoid class score (what a sender's selection uses)."""
        return torch.sigmoid(self.cls(features)).amax(dim=1)

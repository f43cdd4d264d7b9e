"""Ego side of intermediate cooperation: what arrived -> warp once -> fuse. Training and evaluation
both end here; they differ only in how the `Delivery` was made (directly in training, through the
wire format and the channel at evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from coperception.fusion.base import Fusion, FusionMeta
from coperception.fusion.warp import warp_to_ego
from coperception.grid import BEVGrid
from coperception.types import group_views


@dataclass
class Delivery:
    """Per view (each sample's ego first): the features the ego holds for it, in the view's own frame."""

    features: torch.Tensor  # (N_total, C, H, W), zeros where nothing arrived
    arrived: torch.Tensor | None  # (N_total, H, W) bool; None: every cell
    record_len: list[int]
    T_ego_from_agent: torch.Tensor  # (N_total, 4, 4) with the pose the message carries
    age: torch.Tensor  # (N_total,) seconds between the message's capture and the ego's
    kind: torch.Tensor  # (N_total,) 0 vehicle, 1 rsu

    @staticmethod
    def cat(parts: Sequence["Delivery"]) -> "Delivery":
        """One delivery for a batch of samples' deliveries."""
        if len(parts) == 1:
            return parts[0]
        arrived = None
        if any(p.arrived is not None for p in parts):
            arrived = torch.cat([p.arrived if p.arrived is not None else
                                 torch.ones(p.features.shape[0], *p.features.shape[-2:], dtype=torch.bool,
                                            device=p.features.device) for p in parts])
        return Delivery(torch.cat([p.features for p in parts]), arrived, [n for p in parts for n in p.record_len],
                        torch.cat([p.T_ego_from_agent for p in parts]), torch.cat([p.age for p in parts]),
                        torch.cat([p.kind for p in parts]))


class EgoSide(nn.Module):
    """Warp every delivered map into the ego frame once, then the configured fusion -> (B, C, H, W)."""

    def __init__(self, fusion: Fusion, grid: BEVGrid):
        super().__init__()
        self.fusion = fusion
        self.grid = grid

    def forward(self, delivery: Delivery) -> torch.Tensor:
        d = delivery
        device = d.features.device
        T = d.T_ego_from_agent.to(device)
        warped, valid = warp_to_ego(d.features, d.record_len, T, self.grid, d.arrived)
        eye = torch.eye(4, dtype=T.dtype, device=device)
        meta = FusionMeta(group_views(d.age.to(device), d.record_len), group_views(d.kind.to(device), d.record_len),
                          group_views(T, d.record_len, eye))
        return self.fusion(warped, valid, meta)

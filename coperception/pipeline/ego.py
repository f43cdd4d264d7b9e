"""Ego side of intermediate cooperation: what arrived -> warp once -> fuse. Training and evaluation
both end here; they differ only in how the `Delivery` was made (directly in training, through the
wire format and the channel at evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from coperception.config import MotionSettings
from coperception.fusion.base import Fusion, FusionMeta
from coperception.fusion.warp import warp_to_ego
from coperception.grid import BEVGrid
from coperception.models.uncertainty import most_uncertain
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
    # per cell of each view, what its sender sent of its uncertainty (aleatoric std, epistemic std); the
    # ego's own computed locally; None when the fusion does not use it
    uncertainty: torch.Tensor | None = None  # (N_total, 2, H, W)
    # motion compensation: per view, the moving objects its message carried ((K, 7) x, y, vx, vy, length,
    # width, yaw in the view's frame), None for a view without (the ego's own, or motion not sent)
    motion: list[torch.Tensor | None] | None = None

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
        uncertainty = None
        if any(p.uncertainty is not None for p in parts):  # a part without any counts as most uncertain
            uncertainty = torch.cat([p.uncertainty if p.uncertainty is not None else
                                     most_uncertain(p.features.new_empty(p.features.shape[0], 2, *p.features.shape[-2:]))
                                     for p in parts])
        motion = None
        if any(p.motion is not None for p in parts):
            motion = [m for p in parts for m in (p.motion if p.motion is not None else [None] * p.features.shape[0])]
        return Delivery(torch.cat([p.features for p in parts]), arrived, [n for p in parts for n in p.record_len],
                        torch.cat([p.T_ego_from_agent for p in parts]), torch.cat([p.age for p in parts]),
                        torch.cat([p.kind for p in parts]), uncertainty, motion)


class EgoSide(nn.Module):
    """Warp every delivered map (and the per-cell uncertainty that came with it) into the ego frame once,
    moving late messages forward by their age when they carry motion, then the configured fusion ->
    (B, C, H, W)."""

    def __init__(self, fusion: Fusion, grid: BEVGrid, motion: MotionSettings | None = None):
        """`motion`: how late messages that carry moving objects are moved (footprint margin, whole-cell
        moves); whether senders send them at all is decided on their side."""
        super().__init__()
        self.fusion = fusion
        self.grid = grid
        self.motion = motion if motion is not None else MotionSettings()

    def forward(self, delivery: Delivery, confidence: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
        """`confidence`: (n, C, H, W) -> (n, H, W), the detector's confidence (for fusions that need it)."""
        d = delivery
        device = d.features.device
        T = d.T_ego_from_agent.to(device)
        C = d.features.shape[1]
        carried = d.features
        if self.fusion.needs_uncertainty and d.uncertainty is not None:
            carried = torch.cat([carried, d.uncertainty.to(device, carried.dtype)], dim=1)
        warped, valid = warp_to_ego(carried, d.record_len, T, self.grid, d.arrived, d.motion, d.age,
                                    self.motion.margin_m, self.motion.snap_to_cells)
        warped, uncertainty = warped[:, :, :C], (warped[:, :, C:] if warped.shape[2] > C else None)
        eye = torch.eye(4, dtype=T.dtype, device=device)
        conf = None
        if self.fusion.needs_confidence and confidence is not None:
            conf = confidence(warped.flatten(0, 1)).view(*warped.shape[:2], *warped.shape[-2:]).detach()
        meta = FusionMeta(group_views(d.age.to(device), d.record_len), group_views(d.kind.to(device), d.record_len),
                          group_views(T, d.record_len, eye), conf, uncertainty)
        return self.fusion(warped, valid, meta)

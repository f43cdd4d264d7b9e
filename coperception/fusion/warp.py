"""Warp once: per-agent BEV features in their own frames -> ego-aligned `(B, L, C, H, W)` + `valid`."""

from __future__ import annotations

from typing import Sequence

import torch

from coperception.fusion.motion import compensate
from coperception.grid import BEVGrid, sample, sampling_grid
from coperception.types import group_views


def warp_to_ego(features: torch.Tensor, record_len: Sequence[int], T_ego_from_agent: torch.Tensor, grid: BEVGrid,
                arrived: torch.Tensor | None = None, motion: list[torch.Tensor | None] | None = None,
                age: torch.Tensor | None = None, margin: float = 1.0, snap: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-agent features (N_total, C, H, W) in their own frames -> (B, L, C, H, W) in the ego frame and
    valid (B, L, H, W): the cell arrived (`arrived`, (N_total, H, W), default all) and lies in the
    sender's grid. The ego's identity warp samples cell centres exactly, so it passes unchanged.
    With `motion` (per view, (K, 7) moving objects in its frame, or None) and `age` (N_total,) seconds,
    each message is moved forward by its age in the same resampling (`fusion.motion.compensate`, with its
    footprint `margin` and `snap`)."""
    N, C, H, W = features.shape
    mask_src = torch.ones(N, 1, H, W, device=features.device) if arrived is None else arrived[:, None].float()
    sampling = sampling_grid(T_ego_from_agent, grid, features.device)
    left = None
    if motion is not None and age is not None:
        sampling, left = compensate(sampling, motion, age, grid, margin, snap)
    warped = sample(features, sampling, "bilinear")
    valid = sample(mask_src, sampling, "nearest")[:, 0] > 0.5
    if left is not None:
        valid &= ~left
    return group_views(warped, record_len), group_views(valid, record_len, False)

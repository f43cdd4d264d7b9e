"""Warp once: per-agent BEV features in their own frames -> ego-aligned `(B, L, C, H, W)` + `valid`."""

from __future__ import annotations

from typing import Sequence

import torch

from coperception.grid import BEVGrid, warp
from coperception.types import group_views


def warp_to_ego(features: torch.Tensor, record_len: Sequence[int], T_ego_from_agent: torch.Tensor, grid: BEVGrid,
                arrived: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-agent features (N_total, C, H, W) in their own frames -> (B, L, C, H, W) in the ego frame and
    valid (B, L, H, W): the cell arrived (`arrived`, (N_total, H, W), default all) and lies in the
    sender's grid. The ego's identity warp samples cell centres exactly, so it passes unchanged."""
    N, C, H, W = features.shape
    mask_src = torch.ones(N, 1, H, W, device=features.device) if arrived is None else arrived[:, None].float()
    warped = warp(features, T_ego_from_agent, grid, "bilinear")
    valid = warp(mask_src, T_ego_from_agent, grid, "nearest")[:, 0] > 0.5
    return group_views(warped, record_len), group_views(valid, record_len, False)

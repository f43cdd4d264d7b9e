"""A sender's message against the ego's own evidence: a defence against well-formed lies.

Signatures prove who sent a message, not that it is true: an agent with a valid key can send
fabricated features. The ego can contradict a claim only where it has looked itself. Its evidence
is free space: every LiDAR ray that reached the ground crossed empty cells on its way (BEV cells
between the sensor and the ground return, and the return's own cell), minus cells holding any
return above the ground (something may stand there). For each decoded message the ego runs its own
head on its features combined (element-wise max) with the sender's, warped into the ego frame: cells
confident only with the message are the sender's claims. A claim in free space where the ego's own
confidence is low is contradicted. A message with many contradicted claims is dropped for that frame
and counted (`InconsistentMessage`). Objects the ego cannot see (occluded, beyond its ground
returns) contradict nothing, so cooperation keeps what it is for; a liar who places ghosts only
where the ego is blind is not caught — the check bounds the harm to what the ego cannot verify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from coperception.config import ConsistencySettings
from coperception.grid import BEVGrid, warp


@dataclass
class Verdict:
    claims: int  # cells confident only with the sender's features (ego frame)
    conflicts: int  # of those, cells the ego saw free and finds empty itself
    consistent: bool


def _cells(xy: np.ndarray, grid: BEVGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols = np.floor((xy[:, 0] - grid.x_min) / grid.cell).astype(np.int64)
    rows = np.floor((xy[:, 1] - grid.y_min) / grid.cell).astype(np.int64)
    inside = (rows >= 0) & (rows < grid.height) & (cols >= 0) & (cols < grid.width)
    return rows, cols, inside


def free_space(points: np.ndarray, grid: BEVGrid, ground_z: float) -> torch.Tensor:
    """(H, W) bool: cells the ego's LiDAR (at the origin of `points`' frame) saw to be empty."""
    free = np.zeros((grid.height, grid.width), dtype=bool)
    ground = points[:, 2] < ground_z
    if ground.any():
        rows, cols, inside = _cells(points[ground, :2], grid)
        ends = np.unique(rows[inside] * grid.width + cols[inside])
        x, y = grid.centres()
        end_xy = np.column_stack([x.ravel()[ends], y.ravel()[ends]])
        steps = int(np.ceil(np.hypot(end_xy[:, 0], end_xy[:, 1]).max() / (grid.cell / 2))) + 1
        t = np.linspace(0.0, 1.0, steps)
        samples = (t[None, :, None] * end_xy[:, None, :]).reshape(-1, 2)
        r, c, ok = _cells(samples, grid)
        free[r[ok], c[ok]] = True
    above = ~ground
    if above.any():
        r, c, ok = _cells(points[above, :2], grid)
        free[r[ok], c[ok]] = False  # something stands there: no evidence of emptiness
    return torch.from_numpy(free)


def check_message(settings: ConsistencySettings, features: torch.Tensor, arrived: torch.Tensor,
                  T_ego_from_sender: torch.Tensor, ego_features: torch.Tensor, ego_confidence: torch.Tensor,
                  ego_free: torch.Tensor, confidence: Callable[[torch.Tensor], torch.Tensor], grid: BEVGrid) -> Verdict:
    """features (C, H, W) and arrived (H, W) in the sender's frame; the ego's features, confidence and
    free space on the ego's grid."""
    T = T_ego_from_sender[None].to(features.device)
    warped = warp(features[None], T, grid)[0]
    landed = warp(arrived[None, None].to(features.dtype), T, grid, mode="nearest")[0, 0] > 0.5
    combined = torch.where(landed[None], torch.maximum(ego_features, warped), ego_features)
    with_message = confidence(combined[None])[0]
    claims = (with_message > settings.claim_threshold) & (ego_confidence <= settings.claim_threshold)
    conflicts = claims & ego_free.to(claims.device) & (ego_confidence < settings.ego_threshold)
    n_claims, n_conflicts = int(claims.sum()), int(conflicts.sum())
    bad = n_conflicts >= settings.min_conflicts and n_conflicts > settings.max_conflict_fraction * n_claims
    return Verdict(n_claims, n_conflicts, not bad)

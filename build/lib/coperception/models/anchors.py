"""Anchors and the residual box coder (SECOND / PointPillars style)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from coperception.grid import BEVGrid

DIR_OFFSET = np.pi / 4  # direction bins are split at 45 degrees, away from the common headings


def make_anchors(grid: BEVGrid, size: Sequence[float], z_centre: float, yaws: Sequence[float]) -> np.ndarray:
    """Anchors (H, W, R, 7) at every cell centre, one per yaw."""
    x, y = grid.centres()
    H, W = x.shape
    R = len(yaws)
    anchors = np.zeros((H, W, R, 7), dtype=np.float32)
    anchors[..., 0] = x[..., None]
    anchors[..., 1] = y[..., None]
    anchors[..., 2] = z_centre
    anchors[..., 3:6] = size
    anchors[..., 6] = np.asarray(yaws, dtype=np.float32)
    return anchors


def encode_boxes(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Residuals of boxes (K, 7) relative to their anchors (K, 7)."""
    diag = np.sqrt(anchors[:, 3] ** 2 + anchors[:, 4] ** 2)
    return np.column_stack([
        (boxes[:, 0] - anchors[:, 0]) / diag,
        (boxes[:, 1] - anchors[:, 1]) / diag,
        (boxes[:, 2] - anchors[:, 2]) / anchors[:, 5],
        np.log(boxes[:, 3] / anchors[:, 3]),
        np.log(boxes[:, 4] / anchors[:, 4]),
        np.log(boxes[:, 5] / anchors[:, 5]),
        boxes[:, 6] - anchors[:, 6],
    ]).astype(np.float32)


def decode_boxes(residuals: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_boxes` for tensors (..., 7)."""
    diag = torch.sqrt(anchors[..., 3] ** 2 + anchors[..., 4] ** 2)
    x = residuals[..., 0] * diag + anchors[..., 0]
    y = residuals[..., 1] * diag + anchors[..., 1]
    z = residuals[..., 2] * anchors[..., 5] + anchors[..., 2]
    l = torch.exp(residuals[..., 3].clamp(max=4)) * anchors[..., 3]  # noqa: E741
    w = torch.exp(residuals[..., 4].clamp(max=4)) * anchors[..., 4]
    h = torch.exp(residuals[..., 5].clamp(max=4)) * anchors[..., 5]
    yaw = residuals[..., 6] + anchors[..., 6]
    return torch.stack([x, y, z, l, w, h, yaw], dim=-1)


def direction_bin(yaw: np.ndarray) -> np.ndarray:
    """0/1: which half-turn (offset by DIR_OFFSET) a heading lies in."""
    return (np.mod(yaw - DIR_OFFSET, 2 * np.pi) >= np.pi).astype(np.int64)


def apply_direction(yaw: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Fold a regressed yaw into [DIR_OFFSET, DIR_OFFSET + pi) and add pi for direction bin 1."""
    folded = torch.remainder(yaw - DIR_OFFSET, np.pi) + DIR_OFFSET
    return folded + np.pi * direction.to(yaw.dtype)

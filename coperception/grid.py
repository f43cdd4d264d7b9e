"""The one BEV grid type and the one warp between agent frames on it.

A `BEVGrid` is a raster of `height` x `width` square cells of `cell` metres whose cell (row, col)
covers x in [x_min + col*cell, x_min + (col+1)*cell) and y likewise (H along y, W along x). The
detector's grids, the selection maps and the wire format all use this type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BEVGrid:
    x_min: float
    y_min: float
    cell: float
    height: int
    width: int

    @classmethod
    def from_range(cls, point_range: Sequence[float], cell: float) -> "BEVGrid":
        """The grid over the x/y extent of `[xmin, ymin, zmin, xmax, ymax, zmax]` with `cell` metres per pixel."""
        r = [float(v) for v in point_range]
        return cls(r[0], r[1], float(cell), int(round((r[4] - r[1]) / cell)), int(round((r[3] - r[0]) / cell)))

    @property
    def x_max(self) -> float:
        return self.x_min + self.width * self.cell

    @property
    def y_max(self) -> float:
        return self.y_min + self.height * self.cell

    @property
    def cells(self) -> int:
        return self.height * self.width

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) x and y of every cell centre."""
        xs = self.x_min + (np.arange(self.width) + 0.5) * self.cell
        ys = self.y_min + (np.arange(self.height) + 0.5) * self.cell
        x, y = np.meshgrid(xs, ys)
        return x, y


def affine_to_source(T_dst_from_src: torch.Tensor, grid: BEVGrid) -> torch.Tensor:
    """(N, 4, 4) -> (N, 2, 3) `affine_grid` matrices mapping normalised destination-grid coordinates
    to the source grid's (the yaw and x/y translation of each transform; heights are ignored)."""
    T = torch.linalg.inv(T_dst_from_src.detach().cpu().double())  # src <- dst
    R = T[:, :2, :2]
    t = T[:, :2, 3]
    centre = torch.tensor([(grid.x_min + grid.x_max) / 2, (grid.y_min + grid.y_max) / 2], dtype=torch.float64)
    half = torch.tensor([(grid.x_max - grid.x_min) / 2, (grid.y_max - grid.y_min) / 2], dtype=torch.float64)
    S, S_inv = torch.diag(half), torch.diag(1 / half)
    A = S_inv @ R @ S
    b = (S_inv @ ((R @ centre[:, None]).squeeze(-1) + t - centre).T).T
    return torch.cat([A, b[..., None]], dim=-1).float().to(T_dst_from_src.device)


def sampling_grid(T_dst_from_src: torch.Tensor, grid: BEVGrid, device: torch.device | str) -> torch.Tensor:
    """(N, H, W, 2) where each destination cell centre lies in each source grid, as `grid_sample`
    coordinates (x, y in [-1, 1] across the grid)."""
    theta = affine_to_source(T_dst_from_src, grid).to(device)
    return F.affine_grid(theta, [theta.shape[0], 1, grid.height, grid.width], align_corners=False)


def sample(values: torch.Tensor, sampling: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """(N, C, H, W) read at `sampling` (N, H, W, 2), zeros outside the source grid."""
    return F.grid_sample(values, sampling.to(values.dtype), mode=mode, padding_mode="zeros", align_corners=False)


def warp(values: torch.Tensor, T_dst_from_src: torch.Tensor, grid: BEVGrid, mode: str = "bilinear") -> torch.Tensor:
    """Maps (N, C, H, W) on `grid` in their source frames -> the destination frames, zeros where a
    destination cell falls outside the source grid. An identity transform samples cell centres
    exactly, so it returns the input unchanged."""
    return sample(values, sampling_grid(T_dst_from_src, grid, values.device), mode)

"""PointPillars encoder: pillar feature net (PFN) and scatter to a BEV pseudo-image."""

from __future__ import annotations

import torch
from torch import nn

from coperception.grid import BEVGrid


class PillarFeatureNet(nn.Module):
    """Points of a pillar (x, y, z, i) + offsets to the pillar mean and centre -> one feature vector.

    Input: voxels (P, N, 4), num_points (P,), coords (P, 4) as (batch, z, y, x).
    """

    def __init__(self, out_channels: int, grid: BEVGrid, z_range: tuple[float, float]):
        super().__init__()
        self.grid = grid
        self.z_centre = (z_range[0] + z_range[1]) / 2
        self.linear = nn.Linear(10, out_channels, bias=False)
        self.norm = nn.BatchNorm1d(out_channels, eps=1e-3, momentum=0.1)

    def forward(self, voxels: torch.Tensor, num_points: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        n = voxels.shape[1]
        mask = (torch.arange(n, device=voxels.device)[None, :] < num_points[:, None]).to(voxels.dtype)  # (P, N)
        xyz = voxels[..., :3]
        mean = (xyz * mask[..., None]).sum(dim=1, keepdim=True) / num_points.clamp(min=1)[:, None, None].to(voxels.dtype)
        cx = self.grid.x_min + (coords[:, 3].to(voxels.dtype) + 0.5) * self.grid.cell
        cy = self.grid.y_min + (coords[:, 2].to(voxels.dtype) + 0.5) * self.grid.cell
        centre = torch.stack([cx, cy, torch.full_like(cx, self.z_centre)], dim=-1)[:, None, :]
        feats = torch.cat([voxels, xyz - mean, xyz - centre], dim=-1) * mask[..., None]
        x = self.linear(feats)  # (P, N, C)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        x = torch.relu(x) * mask[..., None]
        return x.max(dim=1).values  # (P, C)


def scatter_to_bev(pillar_features: torch.Tensor, coords: torch.Tensor, batch_size: int, grid: BEVGrid) -> torch.Tensor:
    """(P, C) features at (batch, z, y, x) coords -> (B, C, H, W) with zeros elsewhere."""
    C = pillar_features.shape[1]
    H, W = grid.height, grid.width
    canvas = pillar_features.new_zeros(batch_size, H * W, C)
    flat = coords[:, 2].long() * W + coords[:, 3].long()
    canvas[coords[:, 0].long(), flat] = pillar_features
    return canvas.view(batch_size, H, W, C).permute(0, 3, 1, 2).contiguous()

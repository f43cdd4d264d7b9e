"""The shared warp step and the fusion interface/registry.

`warp_to_ego` turns per-agent BEV features into ego-aligned `features[B, L, C, H, W]` and
`valid[B, L, H, W]`; every fusion module is then `fuse(features, valid, meta) -> [B, C, H, W]`
with the ego at index 0.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from coperception.errors import ConfigError
from coperception.models.anchors import BEVGrid


@dataclass
class FusionMeta:
    """Per agent slot (B, L): message age in seconds, agent kind (0 vehicle, 1 rsu), T_ego_from_agent."""

    age: torch.Tensor  # (B, L)
    kind: torch.Tensor  # (B, L) int64
    T_ego_from_agent: torch.Tensor  # (B, L, 4, 4)


def affine_to_agent(T_ego_from_agent: torch.Tensor, grid: BEVGrid) -> torch.Tensor:
    """(N, 4, 4) -> (N, 2, 3) `affine_grid` matrices mapping ego-normalised BEV coordinates to the agent's."""
    T = torch.linalg.inv(T_ego_from_agent.double())  # agent <- ego
    R = T[:, :2, :2]
    t = T[:, :2, 3]
    r = grid.point_range
    centre = torch.tensor([(r[0] + r[3]) / 2, (r[1] + r[4]) / 2], dtype=torch.float64)
    half = torch.tensor([(r[3] - r[0]) / 2, (r[4] - r[1]) / 2], dtype=torch.float64)
    S, S_inv = torch.diag(half), torch.diag(1 / half)
    A = S_inv @ R @ S
    b = (S_inv @ ((R @ centre[:, None]).squeeze(-1) + t - centre).T).T
    return torch.cat([A, b[..., None]], dim=-1).float()


def warp_to_ego(features: torch.Tensor, record_len: list[int], T_ego_from_agent: torch.Tensor, grid: BEVGrid,
                arrived: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-agent features (N_total, C, H, W) in their own frames -> (B, L, C, H, W) in the ego frame and
    valid (B, L, H, W): the cell arrived (`arrived`, (N_total, H, W), default all) and lies in the
    sender's grid. The ego's identity warp samples cell centres exactly, so it passes unchanged."""
    N, C, H, W = features.shape
    theta = affine_to_agent(T_ego_from_agent, grid).to(features.device)
    sampling = F.affine_grid(theta, [N, C, H, W], align_corners=False)
    mask_src = torch.ones(N, 1, H, W, device=features.device) if arrived is None else arrived[:, None].float()
    warped = F.grid_sample(features, sampling, mode="bilinear", padding_mode="zeros", align_corners=False)
    valid = F.grid_sample(mask_src, sampling, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0] > 0.5
    # one gather into (B, L): slot l of sample b is row start_b + l, or the zero row beyond the end
    B, L = len(record_len), max(record_len)
    index = torch.full((B, L), N, dtype=torch.long)
    starts = torch.cumsum(torch.tensor([0] + list(record_len[:-1])), 0)
    for b, n in enumerate(record_len):
        index[b, :n] = starts[b] + torch.arange(n)
    padded = torch.cat([warped, warped.new_zeros(1, C, H, W)])
    padded_valid = torch.cat([valid, valid.new_zeros(1, H, W)])
    return padded[index], padded_valid[index]


class Fusion(nn.Module, abc.ABC):
    """Base class: `forward(features, valid, meta) -> (B, C, H, W)`; built with the feature channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    @abc.abstractmethod
    def forward(self, features: torch.Tensor, valid: torch.Tensor, meta: FusionMeta) -> torch.Tensor:
        """Fuse ego-aligned agent features; index 0 of L is the ego."""


FUSIONS: dict[str, Callable[[int], Fusion]] = {}


def register_fusion(name: str) -> Callable:
    def wrap(cls: Callable[[int], Fusion]) -> Callable[[int], Fusion]:
        FUSIONS[name] = cls
        return cls
    return wrap


def build_fusion(name: str, channels: int) -> Fusion:
    if name not in FUSIONS:
        raise ConfigError(f"fusion.method {name!r} is not a feature fusion; known: {', '.join(sorted(FUSIONS))}")
    return FUSIONS[name](channels)



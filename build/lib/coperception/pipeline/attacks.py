"""Malicious but well-formed senders, for measuring what the ego's defences bound (`bench attack`).

The attacker holds a valid key and speaks the wire format correctly; only what it says is false.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coperception.grid import BEVGrid


@dataclass
class GhostAttack:
    """One sender fabricates vehicles near the ego (where a false obstacle does harm): its own most
    confident feature vector (what a car looks like to the shared encoder) is written into `ghosts`
    cells it picks at random among those within `radius_m` of the ego where it sees nothing, and those
    cells are sent as selected. The ego's position is public: every agent receives its pose."""

    ghosts: int = 30
    radius_m: float = 40.0
    sender_slot: int = 1  # which view of a sample attacks: 1 is the first sender after the ego
    seed: int = 0

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def attacks(self, slot: int) -> bool:
        return slot == self.sender_slot

    def __call__(self, features: torch.Tensor, confidence: torch.Tensor, mask: torch.Tensor, grid: BEVGrid,
                 ego_xy: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """features (C, H, W) on `grid`, its confidence and selection (H, W), the ego's position in the
        features' frame -> the lie and its selection."""
        C, H, W = features.shape
        flat_conf = confidence.flatten()
        template = features.flatten(1)[:, int(flat_conf.argmax())]
        x, y = (torch.from_numpy(a).flatten() for a in grid.centres())
        near = torch.hypot(x - ego_xy[0], y - ego_xy[1]) < self.radius_m
        empty = torch.nonzero((flat_conf.cpu() < 0.05) & near, as_tuple=True)[0]
        if len(empty) == 0:
            return features, mask
        pick = empty[torch.randperm(len(empty), generator=self.generator)[: self.ghosts]].to(features.device)
        lie = features.flatten(1).clone()
        lie[:, pick] = template[:, None]
        sent = mask.flatten().clone()
        sent[pick] = True
        return lie.view(C, H, W), sent.view(H, W)

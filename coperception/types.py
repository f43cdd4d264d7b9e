"""Core types exchanged between the stages (DESIGN §9): collated agent inputs and anchor targets.

The dataset stage builds them, the model stage reads them; neither imports the other. The
per-sample readers' types (`AgentObservation`, `CooperativeSample`) live in `datasets.types`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


def renumbered_slots(slots: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """(n,) new slot of each item whose view slot is `slots`, when only the views `views` (ascending) are
    kept and renumbered 0..len(views)-1; -1 where its view is not kept (on the CPU)."""
    views, slots = views.cpu(), slots.cpu()
    size = max(int(slots.max()) + 1 if len(slots) else 0, int(views.max()) + 1 if len(views) else 0)
    slot_map = torch.full((size,), -1, dtype=torch.long)  # old slot -> new slot
    slot_map[views] = torch.arange(len(views))
    return slot_map[slots]


@dataclass
class PillarBatch:
    """LiDAR input of every view: points grouped into pillars/voxels."""

    voxels: torch.Tensor  # (P, N, 4) x y z intensity, zero padded
    num_points: torch.Tensor  # (P,)
    coords: torch.Tensor  # (P, 4): view slot in the batch, z, y, x

    def to(self, device: torch.device | str) -> "PillarBatch":
        return PillarBatch(self.voxels.to(device), self.num_points.to(device), self.coords.to(device))

    def subset(self, views: torch.Tensor) -> "PillarBatch":
        """The pillars of the views `views` (ascending slots), renumbered 0..len(views)-1."""
        new_slot = renumbered_slots(self.coords[:, 0], views).to(self.coords.device)
        keep = new_slot >= 0
        coords = self.coords[keep].clone()
        coords[:, 0] = new_slot[keep]
        return PillarBatch(self.voxels[keep], self.num_points[keep], coords)


@dataclass
class CameraBatch:
    """Camera input of every view: its images, each with its calibration in the view's frame."""

    images: torch.Tensor  # (M, 3, H, W) uint8 RGB
    intrinsics: torch.Tensor  # (M, 3, 3) pixel coordinates of the images as they are here
    T_view_from_camera: torch.Tensor  # (M, 4, 4) OpenCV camera axes -> the frame the view is encoded in
    view: torch.Tensor  # (M,) view slot in the batch each image belongs to
    depth_bins: torch.Tensor | None = None  # (M, h, w) training depth target per feature pixel, -1 where none

    def to(self, device: torch.device | str) -> "CameraBatch":
        return CameraBatch(self.images.to(device), self.intrinsics.to(device), self.T_view_from_camera.to(device),
                           self.view.to(device), None if self.depth_bins is None else self.depth_bins.to(device))

    def subset(self, views: torch.Tensor) -> "CameraBatch":
        """The images of the views `views` (ascending slots), renumbered 0..len(views)-1."""
        new_slot = renumbered_slots(self.view, views).to(self.view.device)
        keep = new_slot >= 0
        return CameraBatch(self.images[keep], self.intrinsics[keep], self.T_view_from_camera[keep], new_slot[keep],
                           None if self.depth_bins is None else self.depth_bins[keep.to(self.depth_bins.device)])


@dataclass
class AgentBatch:
    """Collated views of a batch of samples, ego first in each sample. Optional per-view inputs are
    None when no encoder of the run reads them."""

    record_len: list[int]  # views per sample
    T_ego_from_agent: torch.Tensor  # (N_total, 4, 4) where each view's frame sits in its ego's frame
    age: torch.Tensor  # (N_total,) seconds between the view's capture and the ego's
    kind: torch.Tensor  # (N_total,) 0 vehicle, 1 rsu
    lidar: PillarBatch | None = None
    cameras: CameraBatch | None = None
    # training with `train.true_motion`: per view, the true moving objects (K, 7) x, y, vx, vy, length,
    # width, yaw in its frame that move its late message forward (None for a view that is not late)
    motion: list[torch.Tensor | None] | None = None

    def to(self, device: torch.device | str) -> "AgentBatch":
        """The per-view tensors on `device` (record_len stays a list)."""
        return AgentBatch(self.record_len, self.T_ego_from_agent.to(device), self.age.to(device), self.kind.to(device),
                          self.lidar.to(device) if self.lidar is not None else None,
                          self.cameras.to(device) if self.cameras is not None else None,
                          None if self.motion is None else [m if m is None else m.to(device) for m in self.motion])

    @property
    def n_agents(self) -> int:
        return int(sum(self.record_len))

    @property
    def ego_index(self) -> torch.Tensor:
        """(B,) row of each sample's ego view among the N_total views."""
        return torch.cumsum(torch.tensor([0] + self.record_len[:-1]), 0)

    @property
    def is_ego(self) -> torch.Tensor:
        """(N_total,) bool, true on each sample's ego view."""
        ego = torch.zeros(self.n_agents, dtype=torch.bool)
        ego[self.ego_index] = True
        return ego

    def subset_views(self, views: torch.Tensor) -> "AgentBatch":
        """The views `views` (ascending rows) taken out of their samples, each as a sample of its own."""
        cpu = views.cpu()
        return AgentBatch([1] * len(cpu), self.T_ego_from_agent[views.to(self.T_ego_from_agent.device)],
                          self.age[cpu], self.kind[cpu], self.lidar.subset(views) if self.lidar is not None else None,
                          self.cameras.subset(views) if self.cameras is not None else None,
                          None if self.motion is None else [self.motion[int(v)] for v in cpu])

    def sample_of_view(self) -> torch.Tensor:
        """(N_total,) index of the sample each view belongs to."""
        return torch.repeat_interleave(torch.arange(len(self.record_len)), torch.tensor(self.record_len))


def view_slots(record_len: Sequence[int]) -> torch.Tensor:
    """(B, L) row of slot l of sample b among the N_total views, or N_total where the sample has fewer
    than L = max(record_len) views."""
    n_total, L = int(sum(record_len)), max(record_len)
    starts = torch.cumsum(torch.tensor([0] + list(record_len[:-1])), 0)
    slots = torch.arange(L)
    index = starts[:, None] + slots[None, :]
    return torch.where(slots[None, :] < torch.tensor(list(record_len))[:, None], index, torch.full_like(index, n_total))


def group_views(values: torch.Tensor, record_len: Sequence[int], pad: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-view values (N_total, ...) -> per-sample (B, L, ...), slots past a sample's views filled
    with `pad` (a scalar or a tensor of one view's shape)."""
    filler = torch.as_tensor(pad, dtype=values.dtype, device=values.device).expand(1, *values.shape[1:])
    padded = torch.cat([values, filler])
    return padded[view_slots(record_len).to(values.device)]


@dataclass
class AnchorSet:
    """Some of one view's anchors as its detector decoded them: boxes (K, 7) in the view's frame, score
    logits (K,), the flat index of each one's cell in the feature grid (K,)."""

    boxes: torch.Tensor
    logits: torch.Tensor
    cells: torch.Tensor


@dataclass
class AnchorTargets:
    """Per anchor (flattened H*W*R): label 1 positive / 0 negative / -1 ignored, residuals, direction bin."""

    labels: np.ndarray  # (A,) int64
    residuals: np.ndarray  # (A, 7) float32, zero where not positive
    direction: np.ndarray  # (A,) int64


@dataclass
class TargetBatch:
    labels: torch.Tensor  # (B, A)
    residuals: torch.Tensor  # (B, A, 7)
    direction: torch.Tensor  # (B, A)
    gt_boxes: list[torch.Tensor] | None = None  # per sample (K, 7) in its ego frame (as augmented)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TargetBatch":
        return TargetBatch(self.labels.to(device, non_blocking=non_blocking),
                           self.residuals.to(device, non_blocking=non_blocking),
                           self.direction.to(device, non_blocking=non_blocking),
                           None if self.gt_boxes is None else [g.to(device) for g in self.gt_boxes])

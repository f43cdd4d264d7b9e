"""Typed data passed from the dataset stage to the models (DESIGN §9)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from coperception.geometry import invert

AgentKind = Literal["vehicle", "rsu"]


@dataclass
class Camera:
    """One camera of an agent. `T_agent_from_camera` maps OpenCV optical coordinates
    (x right, y down, z forward) into the agent's LiDAR frame."""

    name: str
    intrinsics: np.ndarray  # (3, 3)
    T_agent_from_camera: np.ndarray  # (4, 4)
    image_path: str
    image: np.ndarray | None = None  # (H, W, 3) uint8 when loaded

    def project(self, points_agent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Agent-frame points (N, >=3) -> pixel coordinates (N, 2) and depth along the optical axis (N,)."""
        return project(points_agent, self.intrinsics, self.T_agent_from_camera)


def project(points: np.ndarray, intrinsics: np.ndarray, T_frame_from_camera: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points (N, >=3) in a frame -> pixel coordinates (N, 2) and depth along the optical axis (N,) of the
    pinhole camera `intrinsics` (3, 3) placed in that frame by `T_frame_from_camera` (OpenCV axes)."""
    T = invert(T_frame_from_camera)
    cam = points[:, :3] @ T[:3, :3].T + T[:3, 3]
    z = cam[:, 2]
    uvw = cam @ np.asarray(intrinsics).T
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = uvw[:, :2] / uvw[:, 2:3]
    return uv, z


@dataclass
class AgentObservation:
    """What one agent sensed at its capture time, in its own LiDAR frame."""

    agent_id: str
    kind: AgentKind
    capture_time: float  # seconds
    T_world_from_agent: np.ndarray  # (4, 4) float64, right-handed
    points: np.ndarray  # (N, 4) float32 x y z intensity in [0, 1]
    cameras: list[Camera] = field(default_factory=list)


@dataclass
class CooperativeSample:
    """One cooperative frame: agents (ego first) and ground truth in the ego LiDAR frame."""

    dataset: str
    scenario: str
    frame: str
    agents: list[AgentObservation]
    gt_boxes: np.ndarray  # (M, 7) x y z l w h yaw
    gt_ids: np.ndarray  # (M,) int64
    gt_classes: list[str]
    # fetch the same agents `k` frames earlier (None for an agent without such a frame)
    earlier: Callable[[int], list[AgentObservation | None]] | None = None
    # training only: the ground truth `k` frames earlier in this sample's ego frame, (boxes (M, 7), ids (M,));
    # what moves delayed senders' messages by their objects' true motion (`train.true_motion`)
    earlier_truth: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def ego(self) -> AgentObservation:
        return self.agents[0]

    def T_ego_from_agent(self, index: int) -> np.ndarray:
        return invert(self.ego.T_world_from_agent) @ self.agents[index].T_world_from_agent

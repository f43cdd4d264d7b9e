"""From cooperative samples to model inputs: per-agent pillars, anchor targets, collation.

Which agents' points are encoded, and in which frame, depends on the cooperation method:
- `ego`: the ego's own points (no fusion; late fusion trains this way);
- `merged`: every agent's points moved into the ego frame, one cloud (early fusion in training); the
  ego's own points (`AgentInput.points`) and what each sender sends (`sent_points`) are kept, so at
  evaluation the comm session merges what arrived instead (`Projector.merged`);
- `all`: every agent's points in its own frame (late fusion at inference; intermediate fusion
  without projection);
- `projected`: every agent's points moved into the ego frame, each agent still encoded on its own
  (intermediate fusion, OpenCOOD's `proj_first`, in training): BEV features of all agents share the
  ego's axes and a feature's yaw means the same for every agent. Training projects with the ego's
  true pose (there is no channel in training);
- `senders_project`: the views of `all`, with each sender's raw points kept (`AgentInput.points`):
  at evaluation the comm session projects them into the ego pose the sender received from the ego's
  broadcast (`Projector`), or keeps the own-frame view when it has received none.
Each agent's points are lifted to the ego's height datum (z + height of the agent above the
ego) so a roadside LiDAR on a pole uses the same pillar z range as a car. An agent's cameras (where its
kind carries one, `dataset.sensors`) follow every move of its points; an agent without a LiDAR sends
an empty point cloud.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from coperception.config import DatasetConfig, ModelConfig
from coperception.datasets.cameras import CameraViews
from coperception.datasets.types import AgentObservation, CooperativeSample
from coperception.errors import ConfigError
from coperception.datasets.voxelize import VOXELIZERS, Voxels
from coperception.geometry import invert, transform_points
from coperception.types import AgentBatch, AnchorTargets, CameraBatch, PillarBatch, TargetBatch

TargetFn = Callable[[np.ndarray], AnchorTargets]  # ground-truth boxes in the ego frame -> anchor targets

InputMode = Literal["ego", "merged", "all", "projected", "senders_project"]


@dataclass
class AgentInput:
    """One encoded view: pillars in the view's own frame and where that frame sits in the ego frame."""

    voxels: Voxels
    T_ego_from_frame: np.ndarray  # (4, 4); z lift already applied to the points
    kind: int  # 0 vehicle, 1 rsu
    age: float  # seconds between this view's capture and the ego's
    sender: int
    capture_time: float
    T_world_from_agent: np.ndarray  # (4, 4) the agent's true world pose at capture (unaugmented)
    T_world_from_frame: np.ndarray  # (4, 4) world pose of the frame the view is encoded in (unaugmented)
    # `senders_project`: the sender's raw points in its own frame; `merged`: the ego's own points
    points: np.ndarray | None = None
    cameras: CameraViews | None = None  # where the agent's kind carries a camera: calibrated in the view's frame
    own_cameras: CameraViews | None = None  # `senders_project`: the sender's cameras in its own frame
    # training with `train.true_motion`: the true moving objects (K, 7) of a late view, in its frame
    motion: np.ndarray | None = None


@dataclass
class PreparedSample:
    agents: list[AgentInput]  # ego (or the merged cloud) first
    gt_boxes: np.ndarray
    targets: AnchorTargets | None
    frame_key: str
    # early fusion: what each non-ego agent sends, (sender, capture time, pose, points in its frame)
    sent_points: list[tuple[int, float, np.ndarray, np.ndarray]]


def sender_id(agent_id: str) -> int:
    """The integer sender id the wire format carries: the id itself, or a stable CRC32 of a name
    (Python's `hash` of a string changes from process to process)."""
    try:
        return int(agent_id)
    except ValueError:
        return zlib.crc32(agent_id.encode()) & 0x7FFFFFFF


def voxel_cap(mcfg: ModelConfig, training: bool) -> int:
    """Pillars kept per view: `max_voxels` in training, `max_voxels_test` (default the same) otherwise."""
    return mcfg.max_voxels if training or mcfg.max_voxels_test is None else mcfg.max_voxels_test


def lift_to_ego_datum(points: np.ndarray, T_ego_from_agent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shift points by the agent's height above the ego; return them and the matching transform."""
    dz = float(T_ego_from_agent[2, 3])
    lifted = points.copy()
    lifted[:, 2] += dz
    T = T_ego_from_agent.copy()
    T[2, 3] = 0.0
    return lifted, T


def augment_scene(points: list[np.ndarray], transforms: list[np.ndarray], gt: np.ndarray, rng: np.random.Generator
                  ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Apply A = R(theta) * s * F (F an optional y mirror) to the whole scene in the ego frame, keeping
    every agent's transform rigid: points_k <- s F points_k, T_k <- R (F T_k F, translation * s); the
    ego's rotation is folded into its own points so its transform stays the identity. Also returns the
    (4, 4) map each agent's own-frame points went through (its cameras follow it)."""
    theta = rng.uniform(-np.pi / 4, np.pi / 4)
    s = rng.uniform(0.95, 1.05)
    mirror = rng.random() < 0.5
    F = np.diag([1.0, -1.0 if mirror else 1.0, 1.0, 1.0])
    R = np.eye(4)
    R[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    new_points, new_transforms, maps = [], [], []
    sF = F.copy()
    sF[:3, :3] *= s
    for k, (p, T) in enumerate(zip(points, transforms)):
        q = p.copy()
        q[:, :3] = (q[:, :3] @ F[:3, :3].T) * s
        T_f = F @ T @ F
        T_f[:3, 3] *= s
        T_new = R @ T_f
        maps.append(sF)
        if k == 0:
            q = transform_points(T_new, q).astype(np.float32)
            maps[0] = T_new @ sF
            T_new = np.eye(4)
        new_points.append(q)
        new_transforms.append(T_new)
    boxes = gt.copy()
    A = R[:3, :3] @ F[:3, :3] * s
    boxes[:, :3] = gt[:, :3] @ A.T
    boxes[:, 3:6] = gt[:, 3:6] * s
    yaw = -gt[:, 6] if mirror else gt[:, 6]
    boxes[:, 6] = np.arctan2(np.sin(yaw + theta), np.cos(yaw + theta))
    return new_points, new_transforms, boxes, maps


def sensed(agent: AgentObservation, dcfg: DatasetConfig, mcfg: ModelConfig, with_cameras: bool = True
           ) -> tuple[np.ndarray, CameraViews | None]:
    """The agent's points (empty when its kind carries no LiDAR) and its cameras (None when it carries none,
    or when they are not wanted)."""
    sensors = dcfg.sensors_of(agent.kind)
    points = agent.points if "lidar" in sensors else np.zeros((0, 4), dtype=np.float32)
    cameras = CameraViews.from_cameras(agent.cameras, mcfg.camera.image_size, agent.agent_id) \
        if with_cameras and "camera" in sensors else None
    return points, cameras


def z_shift(dz: float) -> np.ndarray:
    T = np.eye(4)
    T[2, 3] = dz
    return T


def prepare_sample(sample: CooperativeSample, mode: InputMode, dcfg: DatasetConfig, mcfg: ModelConfig,
                   targets: TargetFn | None = None, rng: np.random.Generator | None = None,
                   training: bool = False, pillar_rng: np.random.Generator | None = None,
                   motion: list[np.ndarray | None] | None = None) -> PreparedSample:
    """Voxelize the views `mode` asks for and (with `targets`) assign training targets to the ground truth.

    With `rng`, training augmentation is applied to the whole cooperative scene in the ego frame:
    a random flip across the x axis and a rotation in [-pi/4, pi/4] with scaling in [0.95, 1.05].
    Views with more pillars than the cap (`voxel_cap`) keep a random subset, drawn from `pillar_rng` or,
    without it, from a generator seeded by the frame (the same pillars on every evaluation).
    `motion`: per agent, moving objects (K, 7) in the (unaugmented) ego frame or None; each encoded view
    (not early fusion's merged cloud) carries its agent's, moved into the view's frame."""
    frame_key = f"{sample.scenario}/{sample.frame}"
    cap = voxel_cap(mcfg, training)
    draw = pillar_rng if pillar_rng is not None else np.random.default_rng(zlib.crc32(frame_key.encode()))

    def _voxelize(points: np.ndarray, dcfg: DatasetConfig, mcfg: ModelConfig) -> Voxels:
        return VOXELIZERS[mcfg.voxelizer](points, dcfg.point_cloud_range, mcfg.voxel_size, mcfg.max_points_per_voxel,
                                          cap, draw)

    ego_time = sample.ego.capture_time
    transforms = [sample.T_ego_from_agent(k) for k in range(len(sample.agents))]
    # `ego` encodes the ego's view alone: the others' images are not prepared (their points still move the scene)
    n_views = 1 if mode == "ego" else len(sample.agents)
    points, cameras = map(list, zip(*(sensed(agent, dcfg, mcfg, with_cameras=k < n_views)
                                      for k, agent in enumerate(sample.agents))))
    gt = sample.gt_boxes
    maps = [np.eye(4)] * len(points)
    if rng is not None:
        points, transforms, gt, maps = augment_scene(points, transforms, gt, rng)
        cameras = [c.mapped(M) if c is not None else None for c, M in zip(cameras, maps)]
    if training and mcfg.camera.depth_loss_weight > 0:
        cameras = [c.with_depth_targets(transform_points(M, agent.points), mcfg.camera.stride, mcfg.camera.depth_centres())
                   if c is not None else None for c, M, agent in zip(cameras, maps, sample.agents)]
    views: list[AgentInput] = []
    sent_points = []
    if mode == "merged" and any(c is not None for c in cameras):
        raise ConfigError("early fusion merges the agents' point clouds into one; it cannot carry camera images "
                          "(dataset.sensors gives an agent kind a camera)")
    if mode == "merged":
        sent_points = [(sender_id(a.agent_id), a.capture_time, T, p)
                       for a, T, p in zip(sample.agents[1:], transforms[1:], points[1:])]
        merged = np.concatenate([transform_points(T, p) for T, p in zip(transforms, points)])
        views.append(AgentInput(_voxelize(merged, dcfg, mcfg), np.eye(4), 0, 0.0, sender_id(sample.ego.agent_id),
                                ego_time, sample.ego.T_world_from_agent, sample.ego.T_world_from_agent, points[0]))
    elif mode == "projected":
        for k, agent in enumerate(sample.agents):
            projected = transform_points(transforms[k], points[k]).astype(np.float32) if k else points[k]
            views.append(AgentInput(_voxelize(projected, dcfg, mcfg), np.eye(4), int(agent.kind == "rsu"),
                                    float(ego_time - agent.capture_time), sender_id(agent.agent_id), agent.capture_time,
                                    agent.T_world_from_agent, sample.ego.T_world_from_agent,
                                    cameras=cameras[k].moved(transforms[k]) if cameras[k] is not None else None))
    else:
        for k in range(n_views):
            agent = sample.agents[k]
            lifted, T = lift_to_ego_datum(points[k], transforms[k])
            sends_raw = mode == "senders_project" and k > 0
            cams = cameras[k]
            lift = z_shift(float(transforms[k][2, 3]))
            # the lifted points' frame: the agent's, shifted down by the lift (its boxes' z are then right)
            views.append(AgentInput(_voxelize(lifted, dcfg, mcfg), T, int(agent.kind == "rsu"),
                                    float(ego_time - agent.capture_time), sender_id(agent.agent_id), agent.capture_time,
                                    agent.T_world_from_agent, agent.T_world_from_agent @ invert(lift),
                                    points[k] if sends_raw else None,
                                    cams.moved(lift) if cams is not None else None,
                                    cams if sends_raw else None))
    if motion is not None and mode != "merged":
        A = maps[0]  # the augmentation of the ego frame (the ego's own points went through it)
        for view, records in zip(views, motion):
            if records is not None:
                view.motion = mapped_motion(records, invert(view.T_ego_from_frame) @ A)
    return PreparedSample(views, gt, targets(gt) if targets is not None else None, frame_key, sent_points)


def mapped_motion(records: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Motion records (K, 7) x, y, vx, vy, length, width, yaw in another frame, `M` (4, 4) mapping into it
    (a rotation with uniform scale and maybe a mirror, as the scene augmentation and the poses are)."""
    L = M[:2, :2]
    heading = np.column_stack([np.cos(records[:, 6]), np.sin(records[:, 6])]) @ L.T
    return np.column_stack([records[:, :2] @ L.T + M[:2, 3], records[:, 2:4] @ L.T,
                            records[:, 4:6] * np.sqrt(abs(np.linalg.det(L))), np.arctan2(heading[:, 1], heading[:, 0])])


@dataclass(frozen=True)
class Projector:
    """Voxelizes a sender's own-frame points moved into another frame (the comm session's projection
    into the ego pose the sender received), with the evaluation voxel cap; pillars kept above the cap
    are drawn from a generator seeded by the frame and the sender."""

    dataset: DatasetConfig
    model: ModelConfig

    def __call__(self, points: np.ndarray, T_frame_from_agent: np.ndarray, frame_key: str, sender: int) -> Voxels:
        moved = transform_points(T_frame_from_agent, points).astype(np.float32)
        return self._voxelize(moved, np.random.default_rng([zlib.crc32(frame_key.encode()), sender & 0xFFFFFFFF]))

    def merged(self, points: np.ndarray, frame_key: str) -> Voxels:
        """Early fusion's one cloud in the ego frame, voxelized as `prepare_sample` voxelizes it at evaluation
        (pillars above the cap drawn from the frame's generator)."""
        return self._voxelize(points.astype(np.float32), np.random.default_rng(zlib.crc32(frame_key.encode())))

    def _voxelize(self, points: np.ndarray, draw: np.random.Generator) -> Voxels:
        return VOXELIZERS[self.model.voxelizer](points, self.dataset.point_cloud_range, self.model.voxel_size,
                                                self.model.max_points_per_voxel, voxel_cap(self.model, False), draw)


def views_batch(samples: Sequence[Sequence[AgentInput]]) -> AgentBatch:
    """One batch of the views of several samples (each sample's views in order, ego first)."""
    voxels, nums, coords, transforms, ages, kinds, record_len = [], [], [], [], [], [], []
    motion: list[torch.Tensor | None] = []
    images, intrinsics, extrinsics, image_view, depth_bins = [], [], [], [], []
    slot = 0
    for views in samples:
        record_len.append(len(views))
        for view in views:
            if view.cameras is not None:
                images.append(torch.from_numpy(view.cameras.images).permute(0, 3, 1, 2))
                intrinsics.append(torch.from_numpy(view.cameras.intrinsics.astype(np.float32)))
                extrinsics.append(torch.from_numpy(view.cameras.T_frame_from_camera.astype(np.float32)))
                image_view.append(torch.full((len(view.cameras.images),), slot, dtype=torch.int64))
                depth_bins.append(None if view.cameras.depth_bins is None else torch.from_numpy(view.cameras.depth_bins))
            v = view.voxels
            voxels.append(torch.from_numpy(v.voxels))
            nums.append(torch.from_numpy(v.num_points))
            c = torch.from_numpy(v.coords.astype(np.int64))
            coords.append(torch.cat([torch.full((len(c), 1), slot, dtype=torch.int64), c], dim=1))
            transforms.append(torch.from_numpy(view.T_ego_from_frame.astype(np.float32)))
            ages.append(view.age)
            kinds.append(view.kind)
            motion.append(None if view.motion is None else torch.from_numpy(view.motion.astype(np.float32)))
            slot += 1
    cameras = None
    if images:
        targets = torch.cat(depth_bins) if all(d is not None for d in depth_bins) else None  # type: ignore[arg-type]
        cameras = CameraBatch(torch.cat(images).contiguous(), torch.cat(intrinsics), torch.cat(extrinsics),
                              torch.cat(image_view), targets)
    return AgentBatch(record_len, torch.stack(transforms), torch.tensor(ages, dtype=torch.float32),
                      torch.tensor(kinds, dtype=torch.int64),
                      lidar=PillarBatch(torch.cat(voxels), torch.cat(nums), torch.cat(coords)), cameras=cameras,
                      motion=motion if any(m is not None for m in motion) else None)


def collate(batch: Sequence[PreparedSample]) -> tuple[AgentBatch, TargetBatch | None, list[PreparedSample]]:
    agent_batch = views_batch([p.agents for p in batch])
    targets = None
    if all(p.targets is not None for p in batch):
        targets = TargetBatch(torch.from_numpy(np.stack([p.targets.labels for p in batch])),
                              torch.from_numpy(np.stack([p.targets.residuals for p in batch])),
                              torch.from_numpy(np.stack([p.targets.direction for p in batch])),
                              [torch.from_numpy(np.asarray(p.gt_boxes, dtype=np.float32).reshape(-1, 7)) for p in batch])
    return agent_batch, targets, list(batch)

"""OPV2V (and V2XSet) reader: `<root>/<split>/<scenario>/<cav_id>/<frame>.{pcd,yaml}` (DESIGN §3).

Files are in CARLA's left-handed axes; everything returned is right-handed (y mirrored).
Two upstream quirks are deliberately not copied: yaw is taken from the rotation matrix
(not an average of atan2 values, which turns boxes by 90 degrees near +-180), and box
sizes are 2 x extent (not shrunk for pitched or rolled objects).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from coperception.config import DatasetConfig
from coperception.datasets.cooperative import crop_in_ego_frame, merge_ground_truth, opv2v_agent_order, remove_body_points, select_agents
from coperception.datasets.pcd import read_lidar_points
from coperception.datasets.types import AgentObservation, Camera, CooperativeSample
from coperception.errors import DataFormatError
from coperception.geometry import CV_TO_BODY, FLIP_Y, carla_pose_to_matrix, carla_to_rh, invert
from coperception.io import read_yaml, validate

Vec3 = Annotated[list[FiniteFloat], Field(min_length=3, max_length=3)]
Vec6 = Annotated[list[FiniteFloat], Field(min_length=6, max_length=6)]
Mat3 = Annotated[list[Vec3], Field(min_length=3, max_length=3)]
Row4 = Annotated[list[FiniteFloat], Field(min_length=4, max_length=4)]
Mat4 = Annotated[list[Row4], Field(min_length=4, max_length=4)]

FRAME_SECONDS = 0.05  # frame numbers count CARLA ticks of 50 ms; the release keeps every other one


class Opv2vVehicle(BaseModel):
    model_config = ConfigDict(extra="allow")
    location: Vec3
    center: Vec3
    extent: Vec3
    angle: Vec3
    speed: float = 0.0


class Opv2vCamera(BaseModel):
    model_config = ConfigDict(extra="allow")
    cords: Vec6
    intrinsic: Mat3
    extrinsic: Mat4 | None = None


class Opv2vFrame(BaseModel):
    model_config = ConfigDict(extra="allow")
    lidar_pose: Vec6
    vehicles: dict[int, Opv2vVehicle] = Field(default_factory=dict)
    RSU: bool = False
    ego_speed: float = 0.0
    camera0: Opv2vCamera | None = None
    camera1: Opv2vCamera | None = None
    camera2: Opv2vCamera | None = None
    camera3: Opv2vCamera | None = None


def load_frame_yaml(path: Path) -> Opv2vFrame:
    data: Any = read_yaml(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, f"expected a mapping at the top level, got {type(data).__name__}")
    return validate(Opv2vFrame, data, path)


def vehicles_in_frame(frame: Opv2vFrame, T_frame_from_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frame's `vehicles` as (M, 7) boxes in a right-handed frame given by `T_frame_from_world`
    (right-handed world), and their ids."""
    if not frame.vehicles:
        return np.zeros((0, 7)), np.zeros(0, dtype=np.int64)
    ids = np.array(list(frame.vehicles), dtype=np.int64)
    loc = np.array([v.location for v in frame.vehicles.values()])
    ctr = np.array([v.center for v in frame.vehicles.values()])
    ext = np.array([v.extent for v in frame.vehicles.values()])
    ang = np.array([v.angle for v in frame.vehicles.values()])  # roll, yaw, pitch (deg)
    centre_world = (loc + ctr) * np.array([1.0, -1.0, 1.0])  # CARLA -> right-handed
    centre = centre_world @ T_frame_from_world[:3, :3].T + T_frame_from_world[:3, 3]
    yaws = np.empty(len(ids))
    for i, (roll, yaw, pitch) in enumerate(ang):
        R = (FLIP_Y[:3, :3] @ carla_pose_to_matrix([0, 0, 0, roll, yaw, pitch])[:3, :3] @ FLIP_Y[:3, :3])
        R = T_frame_from_world[:3, :3] @ R
        yaws[i] = np.arctan2(R[1, 0], R[0, 0])
    boxes = np.column_stack([centre, 2 * ext, yaws])
    return boxes, ids


class OPV2VDataset:
    """Cooperative samples of one OPV2V split."""

    def __init__(self, root: str | Path, split: str, cfg: DatasetConfig | None = None):
        self.cfg = cfg or DatasetConfig(format="opv2v", root=str(root))
        self.root = Path(root)
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataFormatError(split_dir, f"split folder '{split}' does not exist under {self.root}")
        self.split = split
        self.scenarios: dict[str, dict[str, list[str]]] = {}  # scenario -> cav id -> sorted frame names
        self.index: list[tuple[str, int]] = []
        for scenario_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            cavs = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in scenario_dir.iterdir() if p.is_dir()}
            cavs = {k: v for k, v in cavs.items() if v}
            if not cavs:
                raise DataFormatError(scenario_dir, "scenario has no CAV folder with frame YAML files")
            self.scenarios[scenario_dir.name] = cavs
            first = opv2v_agent_order(list(cavs))[0]
            self.index += [(scenario_dir.name, i) for i in range(len(cavs[first]))]

    def __len__(self) -> int:
        return len(self.index)

    def _frames(self, scenario: str) -> list[str]:
        cavs = self.scenarios[scenario]
        return cavs[opv2v_agent_order(list(cavs))[0]]

    def _observation(self, scenario: str, cav: str, frame_name: str, meta: Opv2vFrame) -> AgentObservation:
        folder = self.root / self.split / scenario / cav
        T_lidar_lh = carla_pose_to_matrix(meta.lidar_pose)
        points = read_lidar_points(folder / f"{frame_name}.pcd")
        points[:, 1] *= -1.0  # CARLA -> right-handed
        if not meta.RSU:
            points = remove_body_points(points)
        cameras = []
        for c in range(4):
            cam = getattr(meta, f"camera{c}")
            if cam is None:
                continue
            T_lidar_cam = carla_to_rh(invert(T_lidar_lh) @ carla_pose_to_matrix(cam.cords)) @ CV_TO_BODY
            path = folder / f"{frame_name}_camera{c}.png"
            image = None
            if self.cfg.reads_images:
                if not path.is_file():
                    raise DataFormatError(path, "camera image listed in the frame YAML is missing")
                image = np.asarray(Image.open(path).convert("RGB"))
            cameras.append(Camera(f"camera{c}", np.array(cam.intrinsic, dtype=np.float64), T_lidar_cam, str(path), image))
        return AgentObservation(
            agent_id=cav,
            kind="rsu" if meta.RSU or cav.startswith("-") else "vehicle",
            capture_time=int(frame_name) * FRAME_SECONDS,
            T_world_from_agent=carla_to_rh(T_lidar_lh),
            points=points,
            cameras=cameras,
        )

    def _crop(self, agents: list[AgentObservation], T_ego_from_world: np.ndarray) -> None:
        for agent in agents:
            agent.points = crop_in_ego_frame(agent.points, T_ego_from_world @ agent.T_world_from_agent,
                                             self.cfg.point_cloud_range)

    def _meta(self, scenario: str, cav: str, frame_name: str) -> Opv2vFrame:
        return _cached_frame_yaml(self.root / self.split / scenario / cav / f"{frame_name}.yaml")

    def __getitem__(self, index: int) -> CooperativeSample:
        scenario, frame_idx = self.index[index]
        frame_name = self._frames(scenario)[frame_idx]
        cavs = self.scenarios[scenario]
        present = [c for c in opv2v_agent_order(list(cavs)) if frame_name in cavs[c]]
        metas = {c: self._meta(scenario, c, frame_name) for c in present}
        positions = {c: carla_to_rh(carla_pose_to_matrix(m.lidar_pose))[:3, 3] for c, m in metas.items()}
        kept = select_agents(present, positions, self.cfg.comm_range, self.cfg.max_agents)
        agents = [self._observation(scenario, c, frame_name, metas[c]) for c in kept]
        T_ego_from_world = invert(agents[0].T_world_from_agent)
        self._crop(agents, T_ego_from_world)
        exclude = {int(kept[0])} if not kept[0].startswith("-") else set()
        gt_range = self.cfg.gt_range(self.cfg.point_cloud_range)

        def truth(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
            """The vehicles the kept agents present at frame `name` list, in the ego frame, merged."""
            per_agent = []
            for c in kept:
                if name in cavs[c]:
                    boxes, ids = vehicles_in_frame(self._meta(scenario, c, name), T_ego_from_world)
                    per_agent.append((boxes, ids, ["vehicle"] * len(ids)))
            return merge_ground_truth(per_agent, exclude, gt_range)

        def earlier_name(k: int) -> str | None:
            return self._frames(scenario)[frame_idx - k] if frame_idx - k >= 0 else None

        gt_boxes, gt_ids, gt_classes = truth(frame_name)

        def earlier(k: int) -> list[AgentObservation | None]:
            name = earlier_name(k)
            if name is None:
                return [None] * len(kept)
            old = [self._observation(scenario, c, name, self._meta(scenario, c, name)) if name in cavs[c] else None
                   for c in kept]
            self._crop([a for a in old if a is not None], T_ego_from_world)
            return old

        def earlier_truth(k: int) -> tuple[np.ndarray, np.ndarray]:
            name = earlier_name(k)
            if name is None:
                return np.zeros((0, 7)), np.zeros(0, dtype=np.int64)
            boxes, ids, _ = truth(name)
            return boxes, ids

        return CooperativeSample("opv2v", scenario, frame_name, agents, gt_boxes, gt_ids, gt_classes, earlier,
                                 earlier_truth)


@lru_cache(maxsize=64)
def _cached_frame_yaml(path: Path) -> Opv2vFrame:
    # the same YAML is read once per agent per sample and again for history; cache a few
    return load_frame_yaml(path)

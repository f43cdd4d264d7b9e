"""DAIR-V2X-C reader: vehicle (ego) + one roadside unit, cooperative labels in the world frame.

Calibration chains (DESIGN §3), every rotation orthonormalised:
- vehicle:   world <- novatel <- lidar (`novatel_to_world`, `lidar_to_novatel.transform`)
- roadside:  world <- virtual lidar (`virtuallidar_to_world`), with the record's
  `system_error_offset` added to its x/y translation before chaining to the vehicle.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, field_validator

from coperception.config import DatasetConfig
from coperception.datasets.cooperative import crop_in_ego_frame, merge_ground_truth, remove_body_points, select_agents
from coperception.datasets.pcd import read_lidar_points
from coperception.datasets.types import AgentObservation, Camera, CooperativeSample
from coperception.errors import DataFormatError
from coperception.geometry import corners_to_boxes, invert, orthonormalize
from coperception.io import read_json, validate

VEHICLE_CLASSES = {"Car", "Van", "Truck", "Bus"}

Vec3 = Annotated[list[FiniteFloat], Field(min_length=3, max_length=3)]
Mat3 = Annotated[list[Vec3], Field(min_length=3, max_length=3)]


class Offset(BaseModel):
    delta_x: float
    delta_y: float


class CooperativeRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    vehicle_pointcloud_path: str
    infrastructure_pointcloud_path: str
    vehicle_image_path: str
    infrastructure_image_path: str
    cooperative_label_path: str
    system_error_offset: Offset | Annotated[str, Field(max_length=0)] = ""


class RigidJson(BaseModel):
    model_config = ConfigDict(extra="allow")
    rotation: Mat3
    translation: Annotated[list[Any], Field(min_length=3, max_length=3)]  # [x, y, z] or [[x], [y], [z]]

    @field_validator("translation")
    @classmethod
    def _three_numbers(cls, value: list[Any]) -> list[float]:
        flat = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in flat):
            raise ValueError(f"expected three finite numbers, got {value!r}")
        return [float(v) for v in flat]

    @field_validator("rotation")
    @classmethod
    def _a_rotation(cls, value: list[list[float]]) -> list[list[float]]:
        # calibrations are not exactly orthonormal (they are orthonormalised on reading), but a degenerate
        # matrix (e.g. all zeros) is no rotation at all and must not silently become the identity
        if abs(np.linalg.det(np.array(value, dtype=np.float64))) < 0.5:
            raise ValueError("rotation is degenerate (|det| < 0.5), not a rotation matrix")
        return value

    def matrix(self) -> np.ndarray:
        T = np.eye(4)
        T[:3, :3] = orthonormalize(np.array(self.rotation, dtype=np.float64))
        T[:3, 3] = self.translation
        return T


class NestedRigidJson(BaseModel):
    model_config = ConfigDict(extra="allow")
    transform: RigidJson


class Intrinsics(BaseModel):
    model_config = ConfigDict(extra="allow")
    cam_K: Annotated[list[float], Field(min_length=9, max_length=9)]


class Dimensions(BaseModel):
    h: FiniteFloat
    w: FiniteFloat
    l: FiniteFloat  # noqa: E741 (the file's own key)


class Location(BaseModel):
    x: FiniteFloat
    y: FiniteFloat
    z: FiniteFloat


class SideLabel(BaseModel):
    """A vehicle- or infrastructure-side label; numbers may be written as strings."""

    model_config = ConfigDict(extra="allow")
    type: str
    dimensions: Dimensions = Field(alias="3d_dimensions")
    location: Location = Field(alias="3d_location")
    rotation: FiniteFloat


class WorldLabel(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    world_8_points: Annotated[list[Vec3], Field(min_length=8, max_length=8)]


class SideInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    pointcloud_path: str
    pointcloud_timestamp: str | int | float
    batch_id: str | int | None = None


def _rigid(path: Path) -> np.ndarray:
    return validate(RigidJson, read_json(path), path).matrix()


def read_side_labels(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """A side label file -> (M, 7) boxes in that side's LiDAR frame and their type strings."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, f"expected a list of labels, got {type(data).__name__}")
    labels = [validate(SideLabel, item, f"{path}[{i}]") for i, item in enumerate(data)]
    boxes = np.array([[lb.location.x, lb.location.y, lb.location.z, lb.dimensions.l, lb.dimensions.w,
                       lb.dimensions.h, lb.rotation] for lb in labels], dtype=np.float64).reshape(-1, 7)
    return boxes, [lb.type for lb in labels]


def read_world_labels(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """A cooperative label file -> (M, 8, 3) world corners and type strings."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, f"expected a list of labels, got {type(data).__name__}")
    labels = [validate(WorldLabel, item, f"{path}[{i}]") for i, item in enumerate(data)]
    corners = np.array([lb.world_8_points for lb in labels], dtype=np.float64).reshape(-1, 8, 3)
    return corners, [lb.type for lb in labels]


def read_split_ids(path: Path, split: str) -> set[str]:
    """Vehicle frame ids of `split` from a split file: a JSON list (ours, CoAlign/HEAL's `train.json` /
    `val.json`), or the official DAIR-V2X split file, whose `cooperative_split` maps `train`/`val`/`test`
    to lists (`validate` is looked up as `val` there)."""
    data = read_json(path)
    if isinstance(data, dict):
        table = data.get("cooperative_split", data)
        names = [split] + (["val"] if split == "validate" else [])
        found = next((table[n] for n in names if isinstance(table, dict) and n in table), None)
        if found is None:
            keys = sorted(table) if isinstance(table, dict) else []
            raise DataFormatError(path, f"no list for split '{split}' in this split file (it has {keys})")
        data = found
    if not isinstance(data, list) or not all(isinstance(w, (str, int)) and not isinstance(w, bool) for w in data):
        raise DataFormatError(path, "expected a list of vehicle frame ids (strings such as \"000010\")")
    return {str(w) for w in data}


class DairV2XDataset:
    """Cooperative samples of DAIR-V2X-C. The split is a JSON list of vehicle frame ids at
    `<root>/split/<split>.json`, or `all` for every record of `cooperative/data_info.json`."""

    def __init__(self, root: str | Path, split: str, cfg: DatasetConfig | None = None):
        self.cfg = cfg or DatasetConfig(format="dair-v2x", root=str(root))  # DAIR's ranges, 100 m comm range
        self.root = Path(root)
        info_path = self.root / "cooperative" / "data_info.json"
        raw = read_json(info_path)
        if not isinstance(raw, list):
            raise DataFormatError(info_path, f"expected a list of records, got {type(raw).__name__}")
        records = [validate(CooperativeRecord, r, f"{info_path}[{i}]") for i, r in enumerate(raw)]
        if split != "all":
            wanted_set = read_split_ids(self._split_path(split), split)
            records = [r for r in records if Path(r.vehicle_pointcloud_path).stem in wanted_set]
        self.split = split
        self.records = records
        self._vehicle_info = self._side_info("vehicle-side")
        self._infra_info = self._side_info("infrastructure-side")

    def _split_path(self, split: str) -> Path:
        given = self.cfg.split_files.get(split)
        if given is None:
            path = self.root / "split" / f"{split}.json"
            if not path.is_file():
                raise DataFormatError(path, f"split '{split}' has no file here; give its file with "
                                            f"dataset.split_files.{split}=<path to the JSON list of vehicle frame ids>")
            return path
        path = Path(given)
        if not path.is_absolute() and not path.is_file() and (self.root / path).is_file():
            path = self.root / path  # relative to the dataset root
        if not path.is_file():
            raise DataFormatError(path, f"dataset.split_files.{split}: split file does not exist")
        return path

    def _side_info(self, side: str) -> dict[str, SideInfo]:
        path = self.root / side / "data_info.json"
        if not path.is_file():  # optional: only timestamps and history need it
            return {}
        raw = read_json(path)
        if not isinstance(raw, list):
            raise DataFormatError(path, "expected a list of records")
        infos = [validate(SideInfo, r, f"{path}[{i}]") for i, r in enumerate(raw)]
        return {Path(s.pointcloud_path).stem: s for s in infos}

    def __len__(self) -> int:
        return len(self.records)

    def _vehicle(self, frame_id: str) -> AgentObservation:
        side = self.root / "vehicle-side"
        nov_path = side / "calib" / "lidar_to_novatel" / f"{frame_id}.json"
        T_novatel_lidar = validate(NestedRigidJson, read_json(nov_path), nov_path).transform.matrix()
        T_world_novatel = _rigid(side / "calib" / "novatel_to_world" / f"{frame_id}.json")
        T_world_lidar = T_world_novatel @ T_novatel_lidar
        points = remove_body_points(read_lidar_points(side / "velodyne" / f"{frame_id}.pcd"))
        camera = self._camera(side, frame_id, "lidar_to_camera", side / "image" / f"{frame_id}.jpg")
        return AgentObservation(frame_id, "vehicle", self._time(self._vehicle_info, frame_id), T_world_lidar, points,
                                [camera] if camera else [])

    def _infrastructure(self, frame_id: str, offset: Offset | str) -> AgentObservation:
        side = self.root / "infrastructure-side"
        T_world_lidar = _rigid(side / "calib" / "virtuallidar_to_world" / f"{frame_id}.json")
        if isinstance(offset, Offset):
            T_world_lidar[0, 3] += offset.delta_x
            T_world_lidar[1, 3] += offset.delta_y
        points = read_lidar_points(side / "velodyne" / f"{frame_id}.pcd")
        camera = self._camera(side, frame_id, "virtuallidar_to_camera", side / "image" / f"{frame_id}.jpg")
        return AgentObservation(frame_id, "rsu", self._time(self._infra_info, frame_id), T_world_lidar, points,
                                [camera] if camera else [])

    def _camera(self, side: Path, frame_id: str, extrinsic_dir: str, image_path: Path) -> Camera | None:
        ext_path = side / "calib" / extrinsic_dir / f"{frame_id}.json"
        int_path = side / "calib" / "camera_intrinsic" / f"{frame_id}.json"
        if not ext_path.is_file() and not self.cfg.reads_images:
            return None
        T_cam_lidar = _rigid(ext_path)
        K = np.array(validate(Intrinsics, read_json(int_path), int_path).cam_K, dtype=np.float64).reshape(3, 3)
        image = None
        if self.cfg.reads_images:
            if not image_path.is_file():
                raise DataFormatError(image_path, "camera image is missing")
            image = np.asarray(Image.open(image_path).convert("RGB"))
        return Camera("front", K, invert(T_cam_lidar), str(image_path), image)

    def _crop(self, agents: list[AgentObservation], T_ego_from_world: np.ndarray) -> None:
        for agent in agents:
            agent.points = crop_in_ego_frame(agent.points, T_ego_from_world @ agent.T_world_from_agent,
                                             self.cfg.point_cloud_range)

    @staticmethod
    def _time(info: dict[str, SideInfo], frame_id: str) -> float:
        entry = info.get(frame_id)
        return float(entry.pointcloud_timestamp) / 1e6 if entry is not None else 0.0

    def _earlier_id(self, info: dict[str, SideInfo], frame_id: str, k: int) -> str | None:
        """The frame id `k` captures before `frame_id` in the same batch (by timestamp)."""
        entry = info.get(frame_id)
        if entry is None:
            return None
        same = sorted((float(s.pointcloud_timestamp), fid) for fid, s in info.items() if s.batch_id == entry.batch_id)
        pos = [fid for _, fid in same].index(frame_id) - k
        return same[pos][1] if pos >= 0 else None

    def __getitem__(self, index: int) -> CooperativeSample:
        record = self.records[index]
        vid = Path(record.vehicle_pointcloud_path).stem
        iid = Path(record.infrastructure_pointcloud_path).stem
        vehicle = self._vehicle(vid)
        infra = self._infrastructure(iid, record.system_error_offset)
        candidates = {"vehicle": vehicle, "infrastructure": infra}
        positions = {k: a.T_world_from_agent[:3, 3] for k, a in candidates.items()}
        kept = select_agents(["vehicle", "infrastructure"], positions, self.cfg.comm_range, self.cfg.max_agents)
        agents = [candidates[k] for k in kept]
        T_ego_world = invert(vehicle.T_world_from_agent)
        self._crop(agents, T_ego_world)
        label_path = self.root / record.cooperative_label_path
        corners, types = read_world_labels(label_path)
        is_vehicle = np.array([t in VEHICLE_CLASSES for t in types], dtype=bool)
        ego_corners = corners[is_vehicle] @ T_ego_world[:3, :3].T + T_ego_world[:3, 3]
        boxes = corners_to_boxes(ego_corners)
        ids = np.arange(len(boxes), dtype=np.int64)
        gt_boxes, gt_ids, gt_classes = merge_ground_truth([(boxes, ids, ["vehicle"] * len(ids))], set(),
                                                          self.cfg.gt_range(self.cfg.point_cloud_range))

        def earlier(k: int) -> list[AgentObservation | None]:
            out: list[AgentObservation | None] = []
            for name in kept:
                if name == "vehicle":
                    fid = self._earlier_id(self._vehicle_info, vid, k)
                    out.append(self._vehicle(fid) if fid else None)
                else:
                    fid = self._earlier_id(self._infra_info, iid, k)
                    out.append(self._infrastructure(fid, record.system_error_offset) if fid else None)
            self._crop([a for a in out if a is not None], T_ego_world)
            return out

        info = self._vehicle_info.get(vid)
        scenario = f"batch_{info.batch_id}" if info is not None and info.batch_id is not None else "dair-v2x"
        return CooperativeSample("dair-v2x", scenario, vid, agents, gt_boxes, gt_ids, gt_classes, earlier)

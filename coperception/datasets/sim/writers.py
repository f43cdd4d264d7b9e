"""Write simulated scenarios in the exact OPV2V and DAIR-V2X-C layouts (DESIGN §3).

The simulator's world is right-handed; OPV2V files are in CARLA's left-handed axes, so
everything written there is mirrored in y (`FLIP_Y`), exactly as the released data is.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from coperception.config import SimulatorConfig
from coperception.datasets.pcd import pack_opv2v_intensity, write_pcd
from coperception.datasets.sim import world as W
from coperception.datasets.sim.sensors import camera_intrinsics, render_camera, scan_lidar
from coperception.geometry import CV_TO_BODY, boxes_to_corners, carla_to_rh, invert, matrix_to_carla_pose, pose_matrix, transform_boxes
from coperception.io import atomic_write_bytes, write_json, write_yaml

FRAME_DT = 0.1  # 10 Hz
OPV2V_FIRST_FRAME = 68  # the released frames are numbered in steps of 2
DAIR_EPOCH = 1_700_000_000.0
DAIR_VIRTUAL_LIDAR_HEIGHT = 1.7

# OPV2V cameras: 0 front, 1 right, 2 left, 3 rear; (x, y, z, yaw) relative to the vehicle centre
OPV2V_CAMERA_MOUNTS = ((1.0, 0.0, 1.6, 0.0), (0.0, -0.9, 1.6, -np.pi / 2), (0.0, 0.9, 1.6, np.pi / 2),
                       (-1.8, 0.0, 1.6, np.pi))
RSU_CAMERA_PITCH = np.radians(12.0)  # RSU cameras look down onto the junction
# DAIR-V2X-C: the vehicle's one front camera, and the roadside unit's one camera under its LiDAR
DAIR_VEHICLE_CAMERA_MOUNT = ((1.0, 0.0, 1.5, 0.0),)
DAIR_RSU_CAMERA_MOUNT = ((0.0, 0.0, 0.0, 0.0),)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _rounded(values: np.ndarray | list[float]) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def _matrix_rows(M: np.ndarray) -> list[list[float]]:
    return [[float(v) for v in row] for row in np.asarray(M, dtype=np.float64)]


@dataclass
class Truth:
    """What the simulator knows and the files must reproduce; filled by the writers for tests.

    `T_world_lidar[(agent_key, frame)]`: the LiDAR (DAIR: virtual LiDAR) pose, right-handed world;
    `hits[(agent_key, frame)]`: vehicle id -> number of that agent's returns from it;
    `capture_time[(agent_key, frame)]`: scene time of the capture (s)."""

    T_world_lidar: dict = field(default_factory=dict)
    hits: dict = field(default_factory=dict)
    capture_time: dict = field(default_factory=dict)

    def record(self, key: tuple[str, str], T: np.ndarray, hit_ids: np.ndarray, t: float) -> None:
        self.T_world_lidar[key] = T.copy()
        ids, counts = np.unique(hit_ids[hit_ids >= 0], return_counts=True)
        self.hits[key] = dict(zip(ids.tolist(), counts.tolist()))
        self.capture_time[key] = t


@dataclass
class SensorRig:
    """World transforms of an agent's sensors at one instant (right-handed)."""

    T_world_lidar: np.ndarray
    T_world_body: np.ndarray  # vehicle centre on the ground (or RSU pole foot)
    cameras_world_from_cv: list[np.ndarray]


def _rig(scene: W.Scene, agent: W.Agent, t: float, cfg: SimulatorConfig, camera_mounts: tuple) -> SensorRig:
    x, y, z, yaw = scene.agent_lidar_pose(agent, t, cfg.lidar.mount_height, cfg.lidar.rsu_mount_height)
    T_lidar = pose_matrix(x, y, z, yaw)
    if agent.kind == "rsu":
        T_body = pose_matrix(x, y, 0.0, yaw)
        cams = [pose_matrix(x, y, z - 0.2, yaw + myaw, pitch=RSU_CAMERA_PITCH) @ CV_TO_BODY
                for (_, _, _, myaw) in camera_mounts]
    else:
        box = scene.vehicles[agent.vehicle_index].box_at(t)
        T_body = pose_matrix(box[0], box[1], 0.0, box[6])
        cams = [T_body @ pose_matrix(mx, my, mz, myaw) @ CV_TO_BODY for (mx, my, mz, myaw) in camera_mounts]
    return SensorRig(T_lidar, T_body, cams)


def _lh_pose(T_rh: np.ndarray) -> list[float]:
    """A right-handed world transform -> CARLA `[x, y, z, roll, yaw, pitch]`."""
    return matrix_to_carla_pose(carla_to_rh(T_rh))  # the y mirror is its own inverse


def _carla_yaw_deg(yaw_rh: float, rng: np.random.Generator) -> float:
    """CARLA yaw in degrees; sometimes on the far side of +-180 as in the released logs."""
    deg = float(np.degrees(-yaw_rh))
    deg = (deg + 180.0) % 360.0 - 180.0
    if abs(deg) > 170 and rng.random() < 0.5:
        deg += 360.0 if deg < 0 else -360.0
    return deg


def _scan(scene: W.Scene, t: float, rig: SensorRig, cfg: SimulatorConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x, y, z = rig.T_world_lidar[:3, 3]
    yaw = float(np.arctan2(rig.T_world_lidar[1, 0], rig.T_world_lidar[0, 0]))
    return scan_lidar(scene, t, np.array([x, y, z, yaw]), cfg.lidar, rng)


def write_opv2v_scenario(scene: W.Scene, scenario_dir: Path, cfg: SimulatorConfig, frames: int, rng: np.random.Generator,
                         seed: int, truth: Truth | None = None) -> None:
    """One scenario in the OPV2V layout: a folder per CAV with PCD, YAML and 4 PNGs per frame."""
    write_yaml(scenario_dir / "data_protocol.yaml", {
        "generator": "coperception synthetic world",
        "seed": int(seed),
        "world": {"sync_mode": True, "fixed_delta_seconds": FRAME_DT / 2, "client_port": 2000},
    })
    K = camera_intrinsics(cfg.camera)
    boxes_by_frame = [scene.vehicle_boxes(k * FRAME_DT) for k in range(frames)]
    ids = scene.vehicle_ids()
    speeds = np.array([v.speed for v in scene.vehicles])
    for k in range(frames):
        t = k * FRAME_DT
        boxes = boxes_by_frame[k]
        frame_name = f"{OPV2V_FIRST_FRAME + 2 * k:06d}"
        for agent in scene.agents:
            folder = scenario_dir / str(agent.aid)
            rig = _rig(scene, agent, t, cfg, OPV2V_CAMERA_MOUNTS)
            pts, hit_ids = _scan(scene, t, rig, cfg, rng)
            if truth is not None:
                truth.record((str(agent.aid), frame_name), rig.T_world_lidar, hit_ids, t)
            cloud = np.zeros(len(pts), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4")])
            cloud["x"], cloud["y"], cloud["z"] = pts[:, 0], -pts[:, 1], pts[:, 2]  # CARLA axes
            cloud["rgb"] = pack_opv2v_intensity(pts[:, 3])
            write_pcd(folder / f"{frame_name}.pcd", cloud, data="ascii", ascii_formats={"x": "%.4f", "y": "%.4f", "z": "%.4f", "rgb": "%.9g"})
            params: dict = {"RSU": agent.kind == "rsu"}
            for c, T_cv in enumerate(rig.cameras_world_from_cv):
                T_cam_body = T_cv @ invert(CV_TO_BODY)  # UE4 camera frame, right-handed version
                render = render_camera(scene, t, T_cv, K, cfg.camera.width, cfg.camera.height)
                atomic_write_bytes(folder / f"{frame_name}_camera{c}.png", _png(render.rgb))
                extrinsic = carla_to_rh(invert(T_cam_body) @ rig.T_world_lidar)  # lidar -> camera, CARLA axes
                params[f"camera{c}"] = {"cords": _rounded(_lh_pose(T_cam_body)), "intrinsic": _matrix_rows(K),
                                        "extrinsic": _matrix_rows(extrinsic)}
            own = agent.vehicle_index
            ego_speed = speeds[own] * 3.6 if agent.kind == "vehicle" else 0.0
            params["ego_speed"] = float(ego_speed)
            params["lidar_pose"] = _rounded(_lh_pose(rig.T_world_lidar))
            true_pos = _lh_pose(rig.T_world_body)
            params["true_ego_pos"] = _rounded(true_pos)
            params["predicted_ego_pos"] = _rounded(np.asarray(true_pos) + np.r_[rng.normal(0, 0.05, 3), 0, rng.normal(0, 0.1), 0])
            params["plan_trajectory"] = []
            lidar_xy = rig.T_world_lidar[:2, 3]
            listed = np.nonzero(np.hypot(*(boxes[:, :2] - lidar_xy).T) <= cfg.label_radius)[0]
            vehicles = {}
            for i in listed:
                if i == own and agent.kind == "vehicle":
                    continue
                b = boxes[i]
                centre_offset = rng.uniform(-0.05, 0.05, 2)
                vehicles[int(ids[i])] = {
                    "angle": [0.0, _carla_yaw_deg(b[6], rng), 0.0],
                    "center": [float(centre_offset[0]), float(-centre_offset[1]), float(b[5] / 2)],
                    "extent": _rounded(b[3:6] / 2),
                    "location": [float(b[0] - centre_offset[0]), float(-(b[1] - centre_offset[1])), 0.0],
                    "speed": float(speeds[i] * 3.6),
                }
            params["vehicles"] = vehicles
            write_yaml(folder / f"{frame_name}.yaml", params)


@dataclass
class DairCounters:
    vehicle_frame: int = 0
    infra_frame: int = 0
    batch: int = 0


def _calib_rotation(R: np.ndarray) -> list[list[float]]:
    """Released calibration rotations are slightly non-orthonormal; so are ours (a 2e-4 scale)."""
    return _matrix_rows(R * (1.0 + 2e-4))


def _column(t: np.ndarray) -> list[list[float]]:
    return [[float(v)] for v in t]


def _dair_label(box: np.ndarray, kind: str, as_strings: bool) -> dict:
    fmt = (lambda v: str(v)) if as_strings else (lambda v: v)
    return {
        "type": {"car": "Car", "van": "Van", "truck": "Truck"}[kind],
        "truncated_state": fmt(0),
        "occluded_state": fmt(0),
        "alpha": fmt(0),
        "3d_dimensions": {"h": float(box[5]), "w": float(box[4]), "l": float(box[3])},
        "3d_location": {"x": float(box[0]), "y": float(box[1]), "z": float(box[2])},
        "rotation": float(box[6]),
    }


def write_dair_scenario(scene: W.Scene, root: Path, cfg: SimulatorConfig, frames: int, rng: np.random.Generator,
                        counters: DairCounters, truth: Truth | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """One scenario (a 'batch') in the DAIR-V2X-C layout. Returns the cooperative, vehicle-side and
    infrastructure-side data_info records it adds."""
    ego = next(a for a in scene.agents if a.kind == "vehicle")
    rsu = next(a for a in scene.agents if a.kind == "rsu")
    kinds = [v.kind for v in scene.vehicles]
    lag = rng.uniform(*cfg.dair_async_ms) / 1000.0  # the RSU captures this much earlier
    offset = rng.uniform(-0.8, 0.8, 2) if rng.random() < cfg.dair_offset_probability else None
    K = camera_intrinsics(cfg.camera)
    batch_id = f"{counters.batch:04d}"
    base_time = DAIR_EPOCH + counters.batch * 1000.0
    coop, vinfo, iinfo = [], [], []
    v_start, i_start = counters.vehicle_frame, counters.infra_frame
    for k in range(frames):
        tv = k * FRAME_DT
        ti = tv - lag
        vid, iid = f"{counters.vehicle_frame:06d}", f"{counters.infra_frame:06d}"
        counters.vehicle_frame += 1
        counters.infra_frame += 1
        # vehicle side
        vrig = _rig(scene, ego, tv, cfg, DAIR_VEHICLE_CAMERA_MOUNT)
        vpts, vhits = _scan(scene, tv, vrig, cfg, rng)
        if truth is not None:
            truth.record(("vehicle", vid), vrig.T_world_lidar, vhits, tv)
        vcloud = np.zeros(len(vpts), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "u1"), ("timestamp", "<f8")])
        vcloud["x"], vcloud["y"], vcloud["z"] = vpts[:, 0], vpts[:, 1], vpts[:, 2]
        vcloud["intensity"] = np.clip(np.round(vpts[:, 3] * 255), 0, 255).astype(np.uint8)
        vcloud["timestamp"] = base_time + tv
        write_pcd(root / f"vehicle-side/velodyne/{vid}.pcd", vcloud, data="binary_compressed")
        T_world_novatel = vrig.T_world_body @ pose_matrix(0, 0, 0.4, 0)
        T_novatel_lidar = invert(T_world_novatel) @ vrig.T_world_lidar
        write_json(root / f"vehicle-side/calib/lidar_to_novatel/{vid}.json",
                   {"transform": {"rotation": _calib_rotation(T_novatel_lidar[:3, :3]), "translation": _column(T_novatel_lidar[:3, 3])}})
        write_json(root / f"vehicle-side/calib/novatel_to_world/{vid}.json",
                   {"rotation": _calib_rotation(T_world_novatel[:3, :3]), "translation": _column(T_world_novatel[:3, 3])})
        T_cv_lidar = invert(vrig.cameras_world_from_cv[0]) @ vrig.T_world_lidar
        write_json(root / f"vehicle-side/calib/lidar_to_camera/{vid}.json",
                   {"rotation": _matrix_rows(T_cv_lidar[:3, :3]), "translation": _column(T_cv_lidar[:3, 3])})
        write_json(root / f"vehicle-side/calib/camera_intrinsic/{vid}.json",
                   {"cam_K": _rounded(K), "cam_D": [0.0] * 5, "width": cfg.camera.width, "height": cfg.camera.height})
        render = render_camera(scene, tv, vrig.cameras_world_from_cv[0], K, cfg.camera.width, cfg.camera.height)
        atomic_write_bytes(root / f"vehicle-side/image/{vid}.jpg", _jpg(render.rgb))
        vboxes = scene.vehicle_boxes(tv)
        in_v = invert(vrig.T_world_lidar)
        near_v = np.hypot(*(vboxes[:, :2] - vrig.T_world_lidar[:2, 3]).T) <= 100
        near_v[ego.vehicle_index] = False
        vlabels = [_dair_label(transform_boxes(in_v, b)[0], kinds[i], False) for i, b in enumerate(vboxes) if near_v[i]]
        write_json(root / f"vehicle-side/label/lidar/{vid}.json", vlabels)
        # infrastructure side, captured `lag` seconds earlier
        irig = _rig(scene, rsu, ti, cfg, DAIR_RSU_CAMERA_MOUNT)
        ipts, ihits = _scan(scene, ti, irig, cfg, rng)
        # DAIR's 'virtual LiDAR' is a ground-parallel frame about 1.7 m above the road (the
        # released infrastructure labels sit near z = -0.9); express the scan there
        lift = irig.T_world_lidar[2, 3] - DAIR_VIRTUAL_LIDAR_HEIGHT
        ipts[:, 2] += lift
        irig.T_world_lidar = irig.T_world_lidar.copy()
        irig.T_world_lidar[2, 3] = DAIR_VIRTUAL_LIDAR_HEIGHT
        if truth is not None:
            truth.record(("infrastructure", iid), irig.T_world_lidar, ihits, ti)
        icloud = np.zeros(len(ipts), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4")])
        icloud["x"], icloud["y"], icloud["z"], icloud["intensity"] = ipts.T
        write_pcd(root / f"infrastructure-side/velodyne/{iid}.pcd", icloud, data="binary_compressed")
        written_t = irig.T_world_lidar[:3, 3].copy()
        if offset is not None:  # the stored calibration is off by -offset; the record's offset corrects it
            written_t[:2] -= offset
        write_json(root / f"infrastructure-side/calib/virtuallidar_to_world/{iid}.json",
                   {"rotation": _calib_rotation(irig.T_world_lidar[:3, :3]), "translation": _column(written_t)})
        T_cv_ilidar = invert(irig.cameras_world_from_cv[0]) @ irig.T_world_lidar
        write_json(root / f"infrastructure-side/calib/virtuallidar_to_camera/{iid}.json",
                   {"rotation": _matrix_rows(T_cv_ilidar[:3, :3]), "translation": _column(T_cv_ilidar[:3, 3])})
        write_json(root / f"infrastructure-side/calib/camera_intrinsic/{iid}.json",
                   {"cam_K": _rounded(K), "cam_D": [0.0] * 5, "width": cfg.camera.width, "height": cfg.camera.height})
        render = render_camera(scene, ti, irig.cameras_world_from_cv[0], K, cfg.camera.width, cfg.camera.height)
        atomic_write_bytes(root / f"infrastructure-side/image/{iid}.jpg", _jpg(render.rgb))
        iboxes = scene.vehicle_boxes(ti)
        in_i = invert(irig.T_world_lidar)
        near_i = np.hypot(*(iboxes[:, :2] - irig.T_world_lidar[:2, 3]).T) <= 100
        ilabels = [_dair_label(transform_boxes(in_i, b)[0], kinds[i], True) for i, b in enumerate(iboxes) if near_i[i]]
        write_json(root / f"infrastructure-side/label/virtuallidar/{iid}.json", ilabels)
        # cooperative label: world frame, vehicle capture time, 8 corners only
        coop_mask = near_v | (np.hypot(*(vboxes[:, :2] - irig.T_world_lidar[:2, 3]).T) <= 100)
        coop_mask[ego.vehicle_index] = False
        corners = boxes_to_corners(vboxes[coop_mask])
        coop_kinds = [kinds[i] for i in np.nonzero(coop_mask)[0]]
        write_json(root / f"cooperative/label_world/{vid}.json",
                   [{"type": {"car": "Car", "van": "Van", "truck": "Truck"}[kd], "world_8_points": _matrix_rows(c)}
                    for kd, c in zip(coop_kinds, corners)])
        coop.append({
            "infrastructure_image_path": f"infrastructure-side/image/{iid}.jpg",
            "infrastructure_pointcloud_path": f"infrastructure-side/velodyne/{iid}.pcd",
            "vehicle_image_path": f"vehicle-side/image/{vid}.jpg",
            "vehicle_pointcloud_path": f"vehicle-side/velodyne/{vid}.pcd",
            "cooperative_label_path": f"cooperative/label_world/{vid}.json",
            "system_error_offset": {"delta_x": float(offset[0]), "delta_y": float(offset[1])} if offset is not None else "",
        })
        common = {"batch_id": batch_id, "intersection_loc": "sim", "batch_start_id": None, "batch_end_id": None}
        vinfo.append({"image_path": f"image/{vid}.jpg", "image_timestamp": str(int(round((base_time + tv) * 1e6))),
                      "pointcloud_path": f"velodyne/{vid}.pcd", "pointcloud_timestamp": str(int(round((base_time + tv) * 1e6))),
                      "calib_lidar_to_novatel_path": f"calib/lidar_to_novatel/{vid}.json",
                      "calib_novatel_to_world_path": f"calib/novatel_to_world/{vid}.json",
                      "calib_lidar_to_camera_path": f"calib/lidar_to_camera/{vid}.json",
                      "calib_camera_intrinsic_path": f"calib/camera_intrinsic/{vid}.json",
                      "label_lidar_std_path": f"label/lidar/{vid}.json", **common})
        iinfo.append({"image_path": f"image/{iid}.jpg", "image_timestamp": str(int(round((base_time + ti) * 1e6))),
                      "pointcloud_path": f"velodyne/{iid}.pcd", "pointcloud_timestamp": str(int(round((base_time + ti) * 1e6))),
                      "calib_virtuallidar_to_world_path": f"calib/virtuallidar_to_world/{iid}.json",
                      "calib_virtuallidar_to_camera_path": f"calib/virtuallidar_to_camera/{iid}.json",
                      "calib_camera_intrinsic_path": f"calib/camera_intrinsic/{iid}.json",
                      "label_lidar_std_path": f"label/virtuallidar/{iid}.json", **common})
    for record in vinfo:
        record["batch_start_id"], record["batch_end_id"] = f"{v_start:06d}", f"{counters.vehicle_frame - 1:06d}"
    for record in iinfo:
        record["batch_start_id"], record["batch_end_id"] = f"{i_start:06d}", f"{counters.infra_frame - 1:06d}"
    counters.batch += 1
    return coop, vinfo, iinfo

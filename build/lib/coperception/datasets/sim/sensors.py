"""Ray casting of the synthetic scene: LiDAR scans and camera images with true occlusion.

Rays from one sensor origin are tested only against objects whose bounding circle falls
in the ray's azimuth window, so the cost is close to the number of rays that can hit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coperception.config import CameraConfig, LidarConfig
from coperception.datasets.sim import world as W
from coperception.geometry import pose_matrix

_EPS = 1e-9


@dataclass
class Hits:
    """Per ray: distance (inf = no hit), material, object id (vehicle id or -1)."""

    t: np.ndarray
    material: np.ndarray
    object_id: np.ndarray


def _azimuth_window(origin: np.ndarray, centre_xy: np.ndarray, radius: float, ray_az: np.ndarray) -> np.ndarray:
    """Indices of rays whose azimuth can reach a circle (all rays when the origin is inside it)."""
    d = float(np.hypot(*(centre_xy - origin[:2])))
    if d <= radius + 0.5:
        return np.arange(len(ray_az))
    phi = np.arctan2(centre_xy[1] - origin[1], centre_xy[0] - origin[0])
    half = np.arcsin(min(1.0, radius / d)) + 1e-3
    diff = (ray_az - phi + np.pi) % (2 * np.pi) - np.pi
    return np.nonzero(np.abs(diff) <= half)[0]


def _ray_box(origin: np.ndarray, dirs: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Entry distance of rays into an upright box (inf where missed or origin inside)."""
    c, s = np.cos(box[6]), np.sin(box[6])
    rel = origin - box[:3]
    o = np.array([c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2]])
    d = np.column_stack([c * dirs[:, 0] + s * dirs[:, 1], -s * dirs[:, 0] + c * dirs[:, 1], dirs[:, 2]])
    d = np.where(np.abs(d) < _EPS, _EPS, d)
    half = box[3:6] / 2
    t1 = (-half - o) / d
    t2 = (half - o) / d
    t_near = np.minimum(t1, t2).max(axis=1)
    t_far = np.maximum(t1, t2).min(axis=1)
    hit = (t_far >= t_near) & (t_near > 0)
    return np.where(hit, t_near, np.inf)


def _ray_cylinder(origin: np.ndarray, dirs: np.ndarray, cyl: np.ndarray) -> np.ndarray:
    """Entry distance of rays into a vertical cylinder (side or top cap)."""
    cx, cy, r, z0, z1 = cyl
    ox, oy = origin[0] - cx, origin[1] - cy
    a = dirs[:, 0] ** 2 + dirs[:, 1] ** 2
    b = 2 * (ox * dirs[:, 0] + oy * dirs[:, 1])
    cc = ox * ox + oy * oy - r * r
    disc = b * b - 4 * a * cc
    ok = (disc >= 0) & (a > _EPS)
    t_side = np.where(ok, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * np.maximum(a, _EPS)), np.inf)
    z_side = origin[2] + t_side * dirs[:, 2]
    t_side = np.where((t_side > 0) & (z_side >= z0) & (z_side <= z1), t_side, np.inf)
    dz = np.where(np.abs(dirs[:, 2]) < _EPS, -_EPS, dirs[:, 2])
    t_cap = (z1 - origin[2]) / dz
    px, py = ox + t_cap * dirs[:, 0], oy + t_cap * dirs[:, 1]
    cap_ok = (t_cap > 0) & (px * px + py * py <= r * r) & (origin[2] > z1)
    return np.minimum(t_side, np.where(cap_ok, t_cap, np.inf))


def cast_rays(scene: W.Scene, t: float, origin: np.ndarray, dirs: np.ndarray, max_range: float,
              skip_vehicle: int = -1) -> Hits:
    """Cast unit-direction rays from one origin into the scene at time t."""
    n = len(dirs)
    best = np.full(n, np.inf)
    material = np.full(n, W.SKY, dtype=np.int8)
    object_id = np.full(n, -1, dtype=np.int64)
    ray_az = np.arctan2(dirs[:, 1], dirs[:, 0])

    # ground plane z = 0
    down = dirs[:, 2] < -_EPS
    tg = np.where(down, -origin[2] / np.where(down, dirs[:, 2], -1.0), np.inf)
    tg_finite = np.where(down, tg, 0.0)
    gx, gy = origin[0] + tg_finite * dirs[:, 0], origin[1] + tg_finite * dirs[:, 1]
    on_road = (np.abs(gx) <= W.KERB) | (np.abs(gy) <= W.KERB)
    hit_ground = tg < np.inf
    best[hit_ground] = tg[hit_ground]
    material[hit_ground] = np.where(on_road[hit_ground], W.ASPHALT, W.SIDEWALK)

    def consider(idx: np.ndarray, dist: np.ndarray, mat: int, oid: int) -> None:
        closer = dist < best[idx]
        sel = idx[closer]
        best[sel] = dist[closer]
        material[sel] = mat
        object_id[sel] = oid

    vehicle_boxes = scene.vehicle_boxes(t)
    ids = scene.vehicle_ids()
    groups = [(scene.buildings, W.BUILDING, None), (vehicle_boxes, W.VEHICLE, ids)]
    for boxes, mat, oids in groups:
        for k, box in enumerate(boxes):
            if oids is not None and k == skip_vehicle:
                continue
            radius = 0.5 * float(np.hypot(box[3], box[4]))
            if np.hypot(*(box[:2] - origin[:2])) - radius > max_range:
                continue
            idx = _azimuth_window(origin, box[:2], radius, ray_az)
            if len(idx):
                consider(idx, _ray_box(origin, dirs[idx], box), mat, int(oids[k]) if oids is not None else -1)
    for cylinders, mat in ((scene.trees, W.TREE), (scene.poles, W.POLE)):
        for cyl in cylinders:
            if np.hypot(*(cyl[:2] - origin[:2])) - cyl[2] > max_range:
                continue
            idx = _azimuth_window(origin, cyl[:2], float(cyl[2]), ray_az)
            if len(idx):
                consider(idx, _ray_cylinder(origin, dirs[idx], cyl), mat, -1)
    best[best > max_range] = np.inf
    material[~np.isfinite(best)] = W.SKY
    object_id[~np.isfinite(best)] = -1
    return Hits(best, material, object_id)


def lidar_directions(cfg: LidarConfig) -> np.ndarray:
    """Unit ray directions in the LiDAR frame, (beams * azimuth_steps, 3)."""
    elev = np.radians(np.linspace(cfg.vertical_fov[0], cfg.vertical_fov[1], cfg.beams))
    az = np.linspace(-np.pi, np.pi, cfg.azimuth_steps, endpoint=False)
    el, a = np.meshgrid(elev, az, indexing="ij")
    return np.stack([np.cos(el) * np.cos(a), np.cos(el) * np.sin(a), np.sin(el)], axis=-1).reshape(-1, 3)


def scan_lidar(scene: W.Scene, t: float, lidar_pose_xyzyaw: np.ndarray, cfg: LidarConfig,
               rng: np.random.Generator, skip_vehicle: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """One LiDAR sweep. Returns points (N, 4) `x y z intensity` in the LiDAR frame and the
    vehicle id each point hit (-1 for background).

    The sensor's own vehicle is part of the scene (its roof returns are real, as in the
    released datasets, and removed by the loader's ego-body mask)."""
    x, y, z, yaw = lidar_pose_xyzyaw
    local = lidar_directions(cfg)
    R = pose_matrix(0, 0, 0, yaw)[:3, :3]
    world_dirs = local @ R.T
    origin = np.array([x, y, z])
    hits = cast_rays(scene, t, origin, world_dirs, cfg.max_range, skip_vehicle=skip_vehicle)
    keep = np.isfinite(hits.t) & (rng.random(len(local)) >= cfg.dropout)
    dist = hits.t[keep] + rng.normal(0.0, cfg.range_noise, int(keep.sum()))
    pts = local[keep] * dist[:, None]
    refl = W.REFLECTANCE[hits.material[keep]]
    intensity = np.clip(refl * np.exp(-dist / 150.0) + rng.normal(0.0, cfg.intensity_noise, len(dist)), 0.0, 1.0)
    return np.column_stack([pts, intensity]).astype(np.float32), hits.object_id[keep]


# RGB palette (0-255) for each material; vehicles get a colour of their own
_PALETTE = np.array([[135, 180, 230], [70, 70, 75], [150, 150, 140], [170, 140, 120], [50, 120, 50],
                     [200, 40, 40], [120, 120, 120]], dtype=np.float64)
_VEHICLE_COLOURS = np.array([[200, 40, 40], [40, 60, 200], [230, 230, 230], [30, 30, 30], [220, 180, 40],
                             [60, 160, 200], [150, 40, 150]], dtype=np.float64)


def camera_intrinsics(cfg: CameraConfig) -> np.ndarray:
    """Pinhole K from horizontal field of view and resolution (square pixels)."""
    fx = (cfg.width / 2) / np.tan(np.radians(cfg.fov_deg) / 2)
    return np.array([[fx, 0, cfg.width / 2], [0, fx, cfg.height / 2], [0, 0, 1.0]])


@dataclass
class Render:
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) metres along the ray, inf = sky
    object_id: np.ndarray  # (H, W) vehicle id or -1


def render_camera(scene: W.Scene, t: float, T_world_from_cv: np.ndarray, K: np.ndarray, width: int, height: int,
                  max_range: float = 250.0) -> Render:
    """Ray-cast one pinhole image. `T_world_from_cv` maps OpenCV camera coordinates to the world."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1).reshape(-1, 3)
    cam /= np.linalg.norm(cam, axis=1, keepdims=True)
    dirs = cam @ T_world_from_cv[:3, :3].T
    origin = T_world_from_cv[:3, 3]
    hits = cast_rays(scene, t, origin, dirs, max_range)
    colour = _PALETTE[hits.material]
    is_vehicle = hits.object_id >= 0
    colour[is_vehicle] = _VEHICLE_COLOURS[hits.object_id[is_vehicle] % len(_VEHICLE_COLOURS)]
    # lane markings: dashed white lines between lanes
    finite = np.isfinite(hits.t)
    p = origin + dirs * np.where(finite, hits.t, 0.0)[:, None]
    on_asphalt = hits.material == W.ASPHALT
    for coord, other in ((p[:, 1], p[:, 0]), (p[:, 0], p[:, 1])):
        line = (np.abs(np.abs(coord) % 3.5) < 0.12) & (np.abs(coord) < W.ROAD_HALF_WIDTH - 0.5)
        dashed = (np.abs(other) % 6.0) < 3.0
        outside_junction = np.abs(other) > W.KERB
        colour[on_asphalt & line & dashed & outside_junction] = 235
    fog = np.clip(np.where(finite, hits.t, max_range) / max_range, 0, 1)[:, None] * 0.6
    colour = colour * (1 - fog) + _PALETTE[W.SKY] * fog
    colour[~finite] = _PALETTE[W.SKY]
    return Render(colour.reshape(height, width, 3).astype(np.uint8), hits.t.reshape(height, width),
                  hits.object_id.reshape(height, width))

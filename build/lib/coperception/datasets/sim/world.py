"""A synthetic cooperative traffic scene: an intersection, buildings, trees and vehicles.

Everything is in a right-handed world frame (x east, y north, z up) with the ground at
z = 0 and the intersection at the origin. The x road carries moving traffic; the y road
queues at a red light and carries traffic leaving the junction, so boxes never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from coperception.config import SimulatorConfig

ROAD_HALF_WIDTH = 7.0  # two 3.5 m lanes per direction
PARKING_CENTRE = 8.3  # parked cars on a strip beside the carriageway
KERB = 9.6  # asphalt (carriageway + parking) ends here
SIDEWALK_TREES = 11.2
BUILDING_SETBACK = 13.0
WORLD_HALF = 170.0
LANE_CENTRES = (1.75, 5.25)

# materials (index into the reflectance and colour tables)
SKY, ASPHALT, SIDEWALK, BUILDING, TREE, VEHICLE, POLE = range(7)
REFLECTANCE = np.array([0.0, 0.12, 0.30, 0.45, 0.25, 0.65, 0.55])

VEHICLE_TYPES = {  # name: (probability, (l range), (w range), (h range))
    "car": (0.7, (3.8, 4.8), (1.7, 2.0), (1.4, 1.7)),
    "van": (0.2, (4.9, 5.8), (1.9, 2.1), (1.9, 2.5)),
    "truck": (0.1, (6.5, 10.0), (2.3, 2.6), (2.8, 3.6)),
}


@dataclass
class Vehicle:
    """A vehicle moving at constant velocity along its heading (speed 0 = parked/waiting)."""

    vid: int
    kind: str
    size: np.ndarray  # (3,) l, w, h
    start: np.ndarray  # (2,) x, y at t = 0
    yaw: float
    speed: float  # m/s

    def box_at(self, t: float) -> np.ndarray:
        heading = np.array([np.cos(self.yaw), np.sin(self.yaw)])
        xy = self.start + heading * self.speed * t
        return np.array([xy[0], xy[1], self.size[2] / 2, *self.size, self.yaw])


@dataclass
class Agent:
    """A connected agent: a vehicle (`vehicle_index` into the scene's vehicles) or a roadside unit."""

    aid: int
    kind: str  # "vehicle" | "rsu"
    vehicle_index: int = -1
    rsu_pose: np.ndarray | None = None  # (x, y, z, yaw) of the RSU LiDAR
    lidar_offset: np.ndarray = field(default_factory=lambda: np.array([-0.5, 0.0]))  # from box centre, body frame


@dataclass
class Scene:
    """Static geometry plus vehicles and agents; `dynamic_boxes(t)` gives the vehicles at time t."""

    buildings: np.ndarray  # (B, 7) boxes
    trees: np.ndarray  # (T, 5) cylinders cx, cy, r, z0, z1 (canopies and trunks)
    poles: np.ndarray  # (P, 5) cylinders
    vehicles: list[Vehicle]
    agents: list[Agent]

    def vehicle_boxes(self, t: float) -> np.ndarray:
        return np.array([v.box_at(t) for v in self.vehicles]).reshape(-1, 7)

    def vehicle_ids(self) -> np.ndarray:
        return np.array([v.vid for v in self.vehicles], dtype=np.int64)

    def agent_lidar_pose(self, agent: Agent, t: float, mount_height: float, rsu_height: float) -> np.ndarray:
        """(x, y, z, yaw) of an agent's LiDAR in the world at time t."""
        if agent.kind == "rsu":
            x, y, _, yaw = agent.rsu_pose
            return np.array([x, y, rsu_height, yaw])
        box = self.vehicles[agent.vehicle_index].box_at(t)
        c, s = np.cos(box[6]), np.sin(box[6])
        dx, dy = agent.lidar_offset
        return np.array([box[0] + c * dx - s * dy, box[1] + s * dx + c * dy, mount_height, box[6]])


def _sample_size(rng: np.random.Generator, kind: str | None = None) -> tuple[str, np.ndarray]:
    names = list(VEHICLE_TYPES)
    if kind is None:
        kind = names[rng.choice(len(names), p=[VEHICLE_TYPES[n][0] for n in names])]
    _, lr, wr, hr = VEHICLE_TYPES[kind]
    return kind, np.array([rng.uniform(*lr), rng.uniform(*wr), rng.uniform(*hr)])


def _fill_line(rng: np.random.Generator, lo: float, hi: float, gap: tuple[float, float], count: int) -> list[tuple[float, str, np.ndarray]]:
    """Place up to `count` vehicles along [lo, hi] with random gaps; returns (centre, kind, size)."""
    out = []
    pos = lo + rng.uniform(0, 8)
    while len(out) < count:
        kind, size = _sample_size(rng)
        centre = pos + size[0] / 2
        if centre + size[0] / 2 > hi:
            break
        out.append((centre, kind, size))
        pos = centre + size[0] / 2 + rng.uniform(*gap)
    return out


def _aabb_half(size: np.ndarray, yaw: float) -> np.ndarray:
    c, s = abs(np.cos(yaw)), abs(np.sin(yaw))
    return np.array([c * size[0] + s * size[1], s * size[0] + c * size[1]]) / 2


def _footprints_touch(v: Vehicle, xy: tuple[float, float], size: np.ndarray, yaw: float, margin: float) -> bool:
    """Axis-aligned overlap test (all vehicles here are aligned with a road)."""
    gap = np.abs(v.start - np.asarray(xy)) - _aabb_half(v.size, v.yaw) - _aabb_half(size, yaw)
    return bool((gap < margin).all())


def _buildings(rng: np.random.Generator, cfg: SimulatorConfig) -> np.ndarray:
    """Rows of buildings along both roads in the four quadrants."""
    boxes = []
    for sx in (-1, 1):
        for sy in (-1, 1):
            for along_x in (True, False):
                pos = BUILDING_SETBACK + rng.uniform(0, 4)
                n = rng.integers(cfg.buildings_per_block[0], cfg.buildings_per_block[1] + 1)
                for _ in range(n * 3):
                    width = rng.uniform(10, 28)
                    depth = rng.uniform(10, 22)
                    setback = BUILDING_SETBACK + rng.uniform(0, 5)
                    height = rng.uniform(5, 20)
                    if pos + width > WORLD_HALF:
                        break
                    if rng.random() < 0.2:  # open lots let some lines of sight through
                        pos += width + rng.uniform(3, 10)
                        continue
                    a = pos + width / 2  # along the road
                    b = setback + depth / 2  # away from the road
                    if along_x:
                        boxes.append([sx * a, sy * b, height / 2, width, depth, height, 0.0])
                    else:
                        boxes.append([sx * b, sy * a, height / 2, depth, width, height, 0.0])
                    pos += width + rng.uniform(3, 10)
    boxes = np.array(boxes).reshape(-1, 7)
    # drop buildings that overlap one placed before them (the two rows of a quadrant meet at its corner)
    keep: list[int] = []
    for i, b in enumerate(boxes):
        lo, hi = b[:2] - b[3:5] / 2, b[:2] + b[3:5] / 2
        if all(np.any(lo >= boxes[j, :2] + boxes[j, 3:5] / 2) or np.any(hi <= boxes[j, :2] - boxes[j, 3:5] / 2) for j in keep):
            keep.append(i)
    return boxes[keep]


def _trees(rng: np.random.Generator, cfg: SimulatorConfig) -> np.ndarray:
    n = int(rng.integers(cfg.trees[0], cfg.trees[1] + 1))
    along = rng.uniform(14, 140, n) * rng.choice([-1, 1], n)
    side = SIDEWALK_TREES * rng.choice([-1, 1], n)
    on_x_road = rng.random(n) < 0.6
    cx = np.where(on_x_road, along, side)
    cy = np.where(on_x_road, side, along)
    canopy_r = rng.uniform(1.4, 2.6, n)
    canopy = np.column_stack([cx, cy, canopy_r, rng.uniform(2.2, 3.0, n), rng.uniform(5.0, 8.0, n)])
    trunk = np.column_stack([cx, cy, np.full(n, 0.25), np.zeros(n), canopy[:, 3]])
    return np.concatenate([canopy, trunk])


def generate_scene(rng: np.random.Generator, cfg: SimulatorConfig, with_rsu: bool, n_agents: int, next_id: int) -> Scene:
    """Build one scenario. Vehicle ids start at `next_id`; `n_agents` includes the RSU if any."""
    vehicles: list[Vehicle] = []

    def add(kind: str, size: np.ndarray, xy: tuple[float, float], yaw: float, speed: float) -> None:
        vehicles.append(Vehicle(next_id + len(vehicles), kind, size, np.array(xy, dtype=np.float64), yaw, speed))

    n_moving = int(rng.integers(cfg.moving_vehicles[0], cfg.moving_vehicles[1] + 1))
    n_parked = int(rng.integers(cfg.parked_vehicles[0], cfg.parked_vehicles[1] + 1))
    # x road: four lanes of moving traffic, one speed per lane so nobody overtakes
    per_lane = max(1, n_moving // 6)
    for direction in (1, -1):
        for lane in LANE_CENTRES:
            y = -direction * lane  # drive on the right
            speed = rng.uniform(6.0, 13.0)
            for centre, kind, size in _fill_line(rng, -110, 110, (8, 30), per_lane):
                add(kind, size, (centre, y), 0.0 if direction > 0 else np.pi, speed)
    # y road: queues waiting at the red light, and traffic leaving the junction
    for sign in (1, -1):
        x_lane = sign * LANE_CENTRES[0]
        heading = -np.pi / 2 if sign > 0 else np.pi / 2  # approaching the junction
        for centre, kind, size in _fill_line(rng, ROAD_HALF_WIDTH + 3.0, 90, (1.5, 4.0), max(1, n_moving // 8)):
            add(kind, size, (x_lane, sign * centre), heading, 0.0)
        for centre, kind, size in _fill_line(rng, ROAD_HALF_WIDTH + 6.0, 120, (10, 30), max(1, n_moving // 10)):
            add(kind, size, (-x_lane, sign * centre), heading + np.pi, rng.uniform(5.0, 10.0))
    # parked vehicles on both roads' parking strips
    for i in range(n_parked):
        on_x = rng.random() < 0.6
        side = rng.choice([-1, 1])
        along = rng.uniform(14, 120) * rng.choice([-1, 1])
        kind, size = _sample_size(rng, "car" if rng.random() < 0.8 else "van")
        xy = (along, side * PARKING_CENTRE) if on_x else (side * PARKING_CENTRE, along)
        yaw = (0.0 if side < 0 else np.pi) if on_x else (np.pi / 2 if side > 0 else -np.pi / 2)
        if any(_footprints_touch(v, xy, size, yaw, margin=0.5) for v in vehicles if v.speed == 0):
            continue
        add(kind, size, xy, yaw, 0.0)

    # connected agents: cars near the junction, spread over both roads so that each sees what the
    # corner buildings hide from the others; optionally an RSU on a pole at a corner
    n_vehicle_agents = n_agents - (1 if with_rsu else 0)

    def pool(on_x_road: bool) -> list[int]:
        """Cars that stay near the junction for the whole scenario: on the x road approaching it
        from 8-45 m (they cross it while recording), on the y road waiting in the queue."""
        out = []
        for i, v in enumerate(vehicles):
            if v.kind != "car":
                continue
            if on_x_road and abs(v.start[1]) < ROAD_HALF_WIDTH:
                approaching = -v.start[0] * np.cos(v.yaw)  # distance still to drive to the junction
                if 8 < approaching < 45:
                    out.append(i)
            elif not on_x_road and abs(v.start[0]) < ROAD_HALF_WIDTH and v.speed == 0 and abs(v.start[1]) < 40:
                out.append(i)
        return out

    def insert_approaching_car() -> int | None:
        """Put a car into a gap of an x-road lane, 10-40 m before the junction; its index or None."""
        for _ in range(20):
            direction = rng.choice([-1, 1])
            lane_y = -direction * LANE_CENTRES[int(rng.integers(0, 2))]
            yaw = 0.0 if direction > 0 else np.pi
            _, size = _sample_size(rng, "car")
            xy = (-direction * rng.uniform(10, 40), lane_y)
            if any(_footprints_touch(v, xy, size, yaw, margin=2.0) for v in vehicles):
                continue
            lane_speed = [v.speed for v in vehicles if abs(v.start[1] - lane_y) < 0.1 and v.yaw == yaw]
            speed = lane_speed[0] if lane_speed else rng.uniform(6.0, 13.0)
            add("car", size, xy, yaw, speed)
            return len(vehicles) - 1
        return None

    x_pool, y_pool = pool(True), pool(False)
    chosen: list[int] = []
    for k in range(n_vehicle_agents):
        first = x_pool if k % 2 == 0 else y_pool
        options = [i for i in first if i not in chosen]
        if not options and k % 2 == 0:
            inserted = insert_approaching_car()
            options = [inserted] if inserted is not None else []
        if not options:
            options = [i for i in x_pool + y_pool if i not in chosen]
        if not options:
            options = [i for i, v in enumerate(vehicles)
                       if v.kind == "car" and i not in chosen and np.hypot(*v.start) < 45]
        if not options:
            break
        chosen.append(int(rng.choice(options)))
    agents = [Agent(aid=vehicles[i].vid, kind="vehicle", vehicle_index=int(i)) for i in chosen]
    poles = np.zeros((0, 5))
    if with_rsu:
        cx, cy = rng.choice([-1, 1]) * 10.6, rng.choice([-1, 1]) * 10.6
        yaw = np.arctan2(-cy, -cx) + rng.uniform(-0.3, 0.3)  # looking across the junction
        agents.append(Agent(aid=-(1 + int(rng.integers(0, 999))), kind="rsu", rsu_pose=np.array([cx, cy, 0.0, yaw])))
        poles = np.array([[cx, cy, 0.18, 0.0, cfg.lidar.rsu_mount_height - 0.3]])
    return Scene(_buildings(rng, cfg), _trees(rng, cfg), poles, vehicles, agents)

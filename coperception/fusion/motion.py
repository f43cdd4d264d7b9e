"""Motion compensation of late messages.

Sender side (`MotionTracker`): each sender tracks its own detections over its own frames (its
odometry, not any ground truth, places them in one world frame) and estimates every object's
velocity; the objects that move travel in the message's motion section (`comm.wire`, 9 bytes each).

Ego side (`compensate`): before fusing, a message `age` seconds old is moved forward: a sampling
position that falls in an object's footprint moved by `velocity * age` reads the message where the
object was at capture; a position the object has left (inside its old footprint, in no moved one) is
no longer covered by the message. This folds into the one warp of `fusion.warp` (one resampling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from coperception.config import MotionSettings
from coperception.grid import BEVGrid


@dataclass
class MotionTracker:
    """One sender's tracks: each one's positions over its last `window` sightings (world frame, NaN where not
    seen; the newest in the last slot), velocity and how often it was seen. A track missed by the detector
    coasts (kept, predicted forward) until it has gone unseen for longer than `max_gap_s`."""

    settings: MotionSettings
    velocities: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    history: np.ndarray = field(init=False)  # (tracks, window, 3): time, x, y

    def __post_init__(self) -> None:
        self.history = np.zeros((0, self.settings.window, 3))

    @property
    def centres(self) -> np.ndarray:
        """(tracks, 2) where each track was last seen."""
        return self.history[:, -1, 1:]

    @property
    def last_seen(self) -> np.ndarray:
        """(tracks,) when each track was last seen."""
        return self.history[:, -1, 0]

    def update(self, centres: np.ndarray, time: float, headings: np.ndarray | None = None) -> np.ndarray:
        """Detections of a new frame, (M, 2) world x/y at `time` -> their (M, 2) velocity (m/s): matched
        to the tracks' predicted positions within the distance the fastest object covers; a track's
        velocity is the least-squares slope of its last `window` positions (one noisy detection weighs
        little). A track seen fewer than `heading_below` times keeps, given `headings` (M,) world yaw,
        only its velocity along the detected heading (vehicles do not slide sideways; a long track's
        own direction is better than one detected yaw). An unmatched detection starts a track at rest.
        With `gate_m` a track seen twice or more matches only within that distance of its prediction; with
        `outlier_m` the velocity is fitted again without the positions off the track (`robust_velocity`)."""
        s = self.settings
        centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
        history = np.full((len(centres), s.window, 3), np.nan)
        history[:, -1] = np.column_stack([np.full(len(centres), time), centres])
        seen = np.ones(len(centres), dtype=np.int64)
        gap = time - self.last_seen
        alive = (gap > 0) & (gap <= s.max_gap_s)  # a clock going back restarts every track
        matched = np.zeros(len(gap), dtype=bool)
        if alive.any() and len(centres):
            predicted = self.centres + self.velocities * gap[:, None]
            cost = np.linalg.norm(centres[:, None] - predicted[None], axis=-1)
            cost[:, ~alive] = np.inf
            rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, 1e9))
            limit = s.max_speed_mps * gap[cols]
            if s.gate_m is not None:
                limit = np.where(self.seen[cols] >= 2, np.minimum(limit, s.gate_m), limit)
            ok = cost[rows, cols] <= limit
            rows, cols = rows[ok], cols[ok]
            history[rows, :-1] = self.history[cols, 1:]
            seen[rows] = self.seen[cols] + 1
            matched[cols] = True
        velocities = robust_velocity(history, s.outlier_m)
        if headings is not None:
            young = seen < s.heading_below
            axis = np.column_stack([np.cos(headings), np.sin(headings)]).reshape(-1, 2)[young]
            velocities[young] = (velocities[young] * axis).sum(axis=1, keepdims=True) * axis
        coast = alive & ~matched
        self.velocities = np.concatenate([velocities, self.velocities[coast]])
        self.seen = np.concatenate([seen, self.seen[coast]])
        self.history = np.concatenate([history, self.history[coast]])
        return velocities

    def update_boxes(self, boxes: np.ndarray, T_world_from_frame: np.ndarray, time: float) -> np.ndarray:
        """`update` with detections (K, 7) in a frame whose world pose is `T_world_from_frame`: their (K, 2)
        world-frame velocities."""
        boxes = np.asarray(boxes).reshape(-1, 7)
        centres = boxes[:, :2] @ T_world_from_frame[:2, :2].T + T_world_from_frame[:2, 3]
        return self.update(centres, time, boxes[:, 6] + np.arctan2(T_world_from_frame[1, 0], T_world_from_frame[0, 0]))


def least_squares_velocity(history: np.ndarray) -> np.ndarray:
    """(N, window, 3) rows of time, x, y (NaN where missing) -> (N, 2) slope of x and y over time fitted by
    least squares; 0 for a track with fewer than two positions."""
    have = np.isfinite(history[..., 0])
    n = have.sum(axis=1)
    h = np.where(have[..., None], history, 0.0)
    mean = h.sum(axis=1) / np.maximum(n, 1)[:, None]
    d = np.where(have[..., None], h - mean[:, None], 0.0)
    var_t = (d[..., 0] ** 2).sum(axis=1)
    slope = (d[..., :1] * d[..., 1:]).sum(axis=1) / np.where(var_t > 0, var_t, 1.0)[:, None]
    return np.where(((n >= 2) & (var_t > 0))[:, None], slope, 0.0)


def robust_velocity(history: np.ndarray, outlier_m: float | None) -> np.ndarray:
    """`least_squares_velocity` of `history` (N, window, 3), then, with `outlier_m`, fitted again without the
    positions further than `outlier_m` from the line through each track's newest position along its first
    fit (the newest detection is what the track follows now; a position far off that line was another
    object's)."""
    velocities = least_squares_velocity(history)
    if outlier_m is None:
        return velocities
    t, xy = history[..., 0], history[..., 1:]
    on_line = xy[:, -1:] + velocities[:, None] * (t - t[:, -1:])[..., None]
    off = np.linalg.norm(xy - on_line, axis=-1) > outlier_m  # NaN (not seen) compares False
    return least_squares_velocity(np.where(off[..., None], np.nan, history))


def moving_objects(boxes_frame: np.ndarray, velocities_world: np.ndarray, T_world_from_frame: np.ndarray,
                   min_speed: float, max_objects: int = 255) -> np.ndarray:
    """(K, 7) motion records x, y, vx, vy, length, width, yaw in the message's frame of the boxes (in that
    frame) whose world velocity is at least `min_speed`; the `max_objects` fastest of them."""
    speed = np.linalg.norm(velocities_world, axis=1)
    keep = speed >= min_speed
    if int(keep.sum()) > max_objects:
        keep &= speed >= np.sort(speed)[-max_objects]
        keep &= np.cumsum(keep) <= max_objects  # ties at the cut: the first ones
    R = T_world_from_frame[:2, :2]
    v_frame = velocities_world[keep] @ R  # R^T v for each row
    b = boxes_frame[keep]
    return np.column_stack([b[:, 0], b[:, 1], v_frame, b[:, 3], b[:, 4], b[:, 6]]) if len(b) else np.zeros((0, 7))


def _inside(xy: torch.Tensor, centre: torch.Tensor, half: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """(P, 2) points, K boxes -> (K, P) whether each point lies in each rotated rectangle."""
    d = xy[None] - centre[:, None]  # (K, P, 2)
    c, s = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
    along = d[..., 0] * c + d[..., 1] * s
    across = -d[..., 0] * s + d[..., 1] * c
    return (along.abs() <= half[:, 0:1]) & (across.abs() <= half[:, 1:2])


def compensate(sampling: torch.Tensor, motion: list[torch.Tensor | None], age: torch.Tensor, grid: BEVGrid,
               margin: float, snap: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`sampling` (N, H, W, 2): where each destination cell reads each view, as `grid_sample`
    coordinates of the view's grid. Per view with objects (K, 7) and age > 0, positions inside an
    object's footprint (grown by `margin` metres) moved by velocity * age read where it was at
    capture. With `snap` the move is rounded to whole cells of the grid: an object's features then move
    intact instead of being interpolated between cells (the backbone's features of an object are not
    a shifted copy of each other off the cell lattice; measured: interpolated moves cost 2-3 points AP).
    Returns the new sampling and (N, H, W) cells the moving objects have left."""
    N, H, W, _ = sampling.shape
    vacated = torch.zeros(N, H, W, dtype=torch.bool, device=sampling.device)
    if not any(m is not None and len(m) for m in motion):
        return sampling, vacated
    centre = torch.tensor([(grid.x_min + grid.x_max) / 2, (grid.y_min + grid.y_max) / 2], device=sampling.device,
                          dtype=sampling.dtype)
    half = torch.tensor([(grid.x_max - grid.x_min) / 2, (grid.y_max - grid.y_min) / 2], device=sampling.device,
                        dtype=sampling.dtype)
    out = sampling.clone()
    for n, objects in enumerate(motion):
        a = float(age[n])
        if objects is None or not len(objects) or a <= 0:
            continue
        o = objects.to(sampling.device, sampling.dtype)
        xy = sampling[n].reshape(-1, 2) * half + centre  # metres in the view's frame
        shift = o[:, 2:4] * a
        if snap:
            shift = torch.round(shift / grid.cell) * grid.cell
        extent = o[:, 4:6] / 2 + margin
        now = _inside(xy, o[:, :2] + shift, extent, o[:, 6])  # (K, P)
        before = _inside(xy, o[:, :2], extent, o[:, 6])
        covered = now.any(dim=0)
        first = now.to(torch.int8).argmax(dim=0)  # the first object whose moved footprint holds the point
        moved = xy - shift[first] * covered[:, None].to(xy.dtype)
        out[n] = ((moved - centre) / half).view(H, W, 2)
        vacated[n] = (before.any(dim=0) & ~covered).view(H, W)
    return out, vacated

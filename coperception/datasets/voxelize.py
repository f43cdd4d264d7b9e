"""Vectorized voxel / pillar generation.

Points are binned into a regular grid over `point_range`; each occupied voxel keeps its
first `max_points` points in input order. Voxels are ordered by linear index (z, y, x).
Above `max_voxels` occupied voxels a random subset of that many is kept (drawn from `rng`;
the lowest indices would drop a whole band of the map), still in index order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class Voxels:
    voxels: np.ndarray  # (P, max_points, C) float32, zero padded
    coords: np.ndarray  # (P, 3) int32 voxel index (z, y, x)
    num_points: np.ndarray  # (P,) int32


def grid_size(point_range: Sequence[float], voxel_size: Sequence[float]) -> tuple[int, int, int]:
    r = np.asarray(point_range, dtype=np.float64)
    v = np.asarray(voxel_size, dtype=np.float64)
    n = np.round((r[3:] - r[:3]) / v).astype(int)
    return int(n[0]), int(n[1]), int(n[2])


def _kept_voxels(n_occupied: int, max_voxels: int, rng: np.random.Generator | None) -> np.ndarray | None:
    """Indices of the occupied voxels to keep, ascending; None when all are kept."""
    if n_occupied <= max_voxels:
        return None
    rng = rng if rng is not None else np.random.default_rng(0)
    return np.sort(rng.choice(n_occupied, max_voxels, replace=False))


def voxelize(points: np.ndarray, point_range: Sequence[float], voxel_size: Sequence[float], max_points: int,
             max_voxels: int, rng: np.random.Generator | None = None) -> Voxels:
    """Group (N, C>=3) points into voxels (see module doc)."""
    r = np.asarray(point_range, dtype=np.float64)
    v = np.asarray(voxel_size, dtype=np.float64)
    nx, ny, nz = grid_size(point_range, voxel_size)
    idx = np.floor((points[:, :3].astype(np.float64) - r[:3]) / v).astype(np.int64)
    inside = ((idx >= 0) & (idx < np.array([nx, ny, nz]))).all(axis=1)
    pts = points[inside]
    idx = idx[inside]
    linear = (idx[:, 2] * ny + idx[:, 1]) * nx + idx[:, 0]
    order = np.argsort(linear, kind="stable")  # stable: input order within a voxel
    keys, starts, counts = np.unique(linear[order], return_index=True, return_counts=True)
    kept = _kept_voxels(len(keys), max_voxels, rng)
    if kept is not None:
        keys, starts, counts = keys[kept], starts[kept], counts[kept]
    n_vox = len(keys)
    voxels = np.zeros((n_vox, max_points, points.shape[1]), dtype=np.float32)
    taken = np.minimum(counts, max_points)
    if n_vox:
        voxel_of = np.repeat(np.arange(n_vox), taken)
        slot = np.arange(int(taken.sum())) - np.repeat(np.cumsum(taken) - taken, taken)
        voxels[voxel_of, slot] = pts[order[np.repeat(starts, taken) + slot]]
    coords = np.column_stack([keys // (nx * ny), (keys // nx) % ny, keys % nx]).astype(np.int32)
    return Voxels(voxels, coords, taken.astype(np.int32))


def voxelize_spconv(points: np.ndarray, point_range: Sequence[float], voxel_size: Sequence[float], max_points: int,
                    max_voxels: int, rng: np.random.Generator | None = None) -> Voxels:
    """`voxelize` through spconv's `PointToVoxel` (the `spconv` extra), same semantics: spconv groups the
    points (first `max_points` of each voxel in input order) and orders voxels by first appearance; here
    they are put in linear index order and the cap draws the same random subset as `voxelize`."""
    try:
        from spconv.pytorch.utils import PointToVoxel
    except ImportError as exc:  # the extra is not installed
        from coperception.errors import ConfigError
        raise ConfigError("model.voxelizer: spconv needs the `spconv` extra (pip install -e '.[spconv]')") from exc
    import torch

    nx, ny, nz = grid_size(point_range, voxel_size)
    generator = PointToVoxel(vsize_xyz=[float(s) for s in voxel_size], coors_range_xyz=[float(r) for r in point_range],
                             num_point_features=points.shape[1], max_num_voxels=max(1, nx * ny * nz),
                             max_num_points_per_voxel=max_points)
    voxels, coords, nums = (t.numpy() for t in generator(torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))))
    linear = (coords[:, 0].astype(np.int64) * ny + coords[:, 1]) * nx + coords[:, 2]
    order = np.argsort(linear)
    kept = _kept_voxels(len(order), max_voxels, rng)
    if kept is not None:
        order = order[kept]
    return Voxels(voxels[order].copy(), coords[order].astype(np.int32), nums[order].astype(np.int32))


VOXELIZERS = {"numpy": voxelize, "spconv": voxelize_spconv}


def pillar_points(voxels: Voxels) -> np.ndarray:
    """(M, C) the points the voxels hold (padding left out)."""
    slots = np.arange(voxels.voxels.shape[1])[None, :] < voxels.num_points[:, None]
    return voxels.voxels[slots]


def voxelize_reference(points: np.ndarray, point_range: Sequence[float], voxel_size: Sequence[float], max_points: int,
                       max_voxels: int, rng: np.random.Generator | None = None) -> Voxels:
    """Brute-force per-point loop with the same semantics; for tests only."""
    r = np.asarray(point_range, dtype=np.float64)
    v = np.asarray(voxel_size, dtype=np.float64)
    nx, ny, nz = grid_size(point_range, voxel_size)
    buckets: dict[tuple[int, int, int], list[np.ndarray]] = {}
    for p in points:
        i = [int(np.floor((float(p[k]) - r[k]) / v[k])) for k in range(3)]
        if not (0 <= i[0] < nx and 0 <= i[1] < ny and 0 <= i[2] < nz):
            continue
        buckets.setdefault((i[2], i[1], i[0]), []).append(p)
    keys = sorted(buckets)
    kept = _kept_voxels(len(keys), max_voxels, rng)
    if kept is not None:
        keys = [keys[i] for i in kept]
    voxels = np.zeros((len(keys), max_points, points.shape[1]), dtype=np.float32)
    nums = []
    for j, key in enumerate(keys):
        kept = buckets[key][:max_points]
        voxels[j, : len(kept)] = kept
        nums.append(len(kept))
    return Voxels(voxels, np.array(keys, dtype=np.int32).reshape(-1, 3), np.array(nums, dtype=np.int32))

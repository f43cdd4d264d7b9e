"""Vectorized voxel / pillar generation.

Points are binned into a regular grid over `point_range`; each occupied voxel keeps its
first `max_points` points in input order. Voxels are ordered by linear index (z, y, x)
and at most `max_voxels` are kept (the first in that order).
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


def voxelize(points: np.ndarray, point_range: Sequence[float], voxel_size: Sequence[float], max_points: int,
             max_voxels: int) -> Voxels:
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
    linear_sorted = linear[order]
    keys, starts, counts = np.unique(linear_sorted, return_index=True, return_counts=True)
    if len(keys) > max_voxels:
        keys, starts, counts = keys[:max_voxels], starts[:max_voxels], counts[:max_voxels]
    n_vox = len(keys)
    channels = points.shape[1]
    voxels = np.zeros((n_vox, max_points, channels), dtype=np.float32)
    if n_vox:
        # kept voxels are the first ones of the sorted list, so their points are its first rows
        n_kept_points = int(counts.sum())
        voxel_of = np.repeat(np.arange(n_vox), counts)
        slot = np.arange(n_kept_points) - np.repeat(starts, counts)
        keep = slot < max_points
        voxels[voxel_of[keep], slot[keep]] = pts[order[:n_kept_points][keep]]
    coords = np.column_stack([keys // (nx * ny), (keys // nx) % ny, keys % nx]).astype(np.int32)
    return Voxels(voxels, coords, np.minimum(counts, max_points).astype(np.int32))


def voxelize_reference(points: np.ndarray, point_range: Sequence[float], voxel_size: Sequence[float], max_points: int,
                       max_voxels: int) -> Voxels:
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
    keys = sorted(buckets)[:max_voxels]
    voxels = np.zeros((len(keys), max_points, points.shape[1]), dtype=np.float32)
    nums = []
    for j, key in enumerate(keys):
        kept = buckets[key][:max_points]
        voxels[j, : len(kept)] = kept
        nums.append(len(kept))
    return Voxels(voxels, np.array(keys, dtype=np.int32).reshape(-1, 3), np.array(nums, dtype=np.int32))

import numpy as np
import pytest

from coperception.datasets.voxelize import grid_size, voxelize, voxelize_reference


@pytest.mark.parametrize("max_voxels", [100000, 37])
@pytest.mark.parametrize("max_points", [1, 4, 32])
def test_matches_brute_force(max_voxels, max_points):
    rng = np.random.default_rng(max_points)
    pts = np.column_stack([rng.uniform(-12, 12, (4000, 3)), rng.random(4000)]).astype(np.float32)
    pts = np.concatenate([pts, pts[:800] + 0.01])  # crowded voxels
    point_range, voxel = [-10, -8, -3, 10, 8, 1], [0.8, 0.8, 4]
    fast = voxelize(pts, point_range, voxel, max_points, max_voxels)
    ref = voxelize_reference(pts, point_range, voxel, max_points, max_voxels)
    np.testing.assert_array_equal(fast.coords, ref.coords)
    np.testing.assert_array_equal(fast.num_points, ref.num_points)
    np.testing.assert_array_equal(fast.voxels, ref.voxels)
    assert len(fast.coords) == min(max_voxels, len(ref.coords))
    assert grid_size(point_range, voxel) == (25, 20, 1)


def test_points_outside_range_and_empty_input():
    pts = np.array([[100, 0, 0, 1], [0, 0, 5, 1]], dtype=np.float32)
    out = voxelize(pts, [-10, -10, -3, 10, 10, 1], [1, 1, 4], 8, 100)
    assert out.voxels.shape == (0, 8, 4) and out.coords.shape == (0, 3)

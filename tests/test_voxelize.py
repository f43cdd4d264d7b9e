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
    fast = voxelize(pts, point_range, voxel, max_points, max_voxels, np.random.default_rng(5))
    ref = voxelize_reference(pts, point_range, voxel, max_points, max_voxels, np.random.default_rng(5))
    np.testing.assert_array_equal(fast.coords, ref.coords)
    np.testing.assert_array_equal(fast.num_points, ref.num_points)
    np.testing.assert_array_equal(fast.voxels, ref.voxels)
    assert len(fast.coords) == min(max_voxels, len(ref.coords))
    assert grid_size(point_range, voxel) == (25, 20, 1)


def test_points_outside_range_and_empty_input():
    pts = np.array([[100, 0, 0, 1], [0, 0, 5, 1]], dtype=np.float32)
    out = voxelize(pts, [-10, -10, -3, 10, 10, 1], [1, 1, 4], 8, 100)
    assert out.voxels.shape == (0, 8, 4) and out.coords.shape == (0, 3)


def test_above_the_cap_a_random_subset_is_kept_not_a_band():
    rng = np.random.default_rng(0)
    pts = np.column_stack([rng.uniform(-40, 40, (20000, 2)), np.zeros(20000), rng.random(20000)]).astype(np.float32)
    everything = voxelize(pts, [-40, -40, -3, 40, 40, 1], [1, 1, 4], 4, 10**6)
    capped = voxelize(pts, [-40, -40, -3, 40, 40, 1], [1, 1, 4], 4, 1000, np.random.default_rng(1))
    assert len(capped.coords) == 1000 and len(everything.coords) > 5000
    # spread over the whole map: rows (y) from the lowest to the highest band, as in the full set
    assert capped.coords[:, 1].min() < 5 and capped.coords[:, 1].max() > 74
    assert (np.diff(capped.coords[:, 1] * 80 + capped.coords[:, 2]) > 0).all()  # still in index order
    # each kept voxel holds exactly the points it holds without the cap
    full = {tuple(c): (v, n) for c, v, n in zip(everything.coords.tolist(), everything.voxels, everything.num_points)}
    for c, v, n in zip(capped.coords.tolist()[:50], capped.voxels[:50], capped.num_points[:50]):
        np.testing.assert_array_equal(v, full[tuple(c)][0])
        assert n == full[tuple(c)][1]
    other = voxelize(pts, [-40, -40, -3, 40, 40, 1], [1, 1, 4], 4, 1000, np.random.default_rng(2))
    assert not np.array_equal(other.coords, capped.coords)  # the draw follows the generator


@pytest.mark.parametrize("max_voxels", [100000, 37])
def test_spconv_point_to_voxel_gives_the_same_voxels(max_voxels):
    pytest.importorskip("spconv.pytorch.utils")
    from coperception.datasets.voxelize import voxelize_spconv

    rng = np.random.default_rng(9)
    pts = np.column_stack([rng.uniform(-12, 12, (3000, 2)), rng.uniform(-3.5, 1.5, 3000), rng.random(3000)])
    pts = np.concatenate([pts, pts[:600] + 0.01]).astype(np.float32)  # crowded voxels
    point_range, voxel = [-10, -8, -3, 10, 8, 1], [0.8, 0.8, 0.5]
    ours = voxelize(pts, point_range, voxel, 4, max_voxels, np.random.default_rng(5))
    theirs = voxelize_spconv(pts, point_range, voxel, 4, max_voxels, np.random.default_rng(5))
    np.testing.assert_array_equal(theirs.coords, ours.coords)
    np.testing.assert_array_equal(theirs.num_points, ours.num_points)
    np.testing.assert_array_equal(theirs.voxels, ours.voxels)

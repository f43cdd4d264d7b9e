import numpy as np
import pytest

from coperception.geometry import (
    FLIP_Y, bev_corners, boxes_to_corners, carla_pose_to_matrix, carla_to_rh, corners_to_boxes, in_range_mask, invert,
    matrix_to_carla_pose, orthonormalize, points_in_boxes, pose_matrix, rotated_iou_bev, rotated_iou_bev_aligned,
    transform_boxes, transform_points, wrap_angle,
)


def random_boxes(rng, n, spread=3.0):
    return np.column_stack([rng.uniform(-spread, spread, (n, 2)), np.zeros(n), rng.uniform(0.5, 6, (n, 3)),
                            rng.uniform(-np.pi, np.pi, n)])


def test_rotated_iou_matches_shapely_on_1000_pairs():
    shapely = pytest.importorskip("shapely.geometry")
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 1000), random_boxes(rng, 1000)
    b[:20] = a[:20]  # identical pairs
    b[20:40, :2] += 50  # disjoint pairs
    ca, cb = bev_corners(a), bev_corners(b)
    ref = []
    for i in range(1000):
        pa, pb = shapely.Polygon(ca[i]), shapely.Polygon(cb[i])
        inter = pa.intersection(pb).area
        ref.append(inter / (pa.area + pb.area - inter))
    ref = np.array(ref)
    assert np.abs(rotated_iou_bev_aligned(a, b) - ref).max() < 1e-5
    full = rotated_iou_bev(a[:200], b[:200])
    assert np.abs(np.diag(full) - ref[:200]).max() < 1e-5
    assert full.shape == (200, 200)
    np.testing.assert_allclose(np.diag(full)[:20], 1.0, atol=1e-9)
    assert (np.diag(full)[20:40] == 0).all()


def test_iou_known_shift_and_far_from_origin():
    box = np.array([[1000.0, -2000.0, 0, 4.0, 2.0, 1.5, 0.3]])
    shifted = box.copy()
    c, s = np.cos(0.3), np.sin(0.3)
    shifted[0, :2] += [1.0 * c, 1.0 * s]  # 1 m along its length: overlap 3 x 2 of 4 x 2
    assert rotated_iou_bev(box, shifted)[0, 0] == pytest.approx(6.0 / 10.0, abs=1e-9)


def test_carla_pose_formula_and_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(50):
        pose = [*rng.uniform(-100, 100, 3), *rng.uniform(-89, 89, 3)]
        T = carla_pose_to_matrix(pose)
        np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(carla_pose_to_matrix(matrix_to_carla_pose(T)), T, atol=1e-9)
    # pure yaw of +90 deg in CARLA turns +x onto CARLA +y, i.e. to the right: right-handed yaw -90 deg
    T = carla_to_rh(carla_pose_to_matrix([0, 0, 0, 0, 90, 0]))
    np.testing.assert_allclose(T[:3, 0], [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(FLIP_Y @ FLIP_Y, np.eye(4))


def test_boxes_corners_round_trip_and_transform_consistency():
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 100)
    back = corners_to_boxes(boxes_to_corners(boxes))  # the corner order carries the heading (tests/test_protocol.py)
    np.testing.assert_allclose(back[:, :6], boxes[:, :6], atol=1e-9)
    np.testing.assert_allclose(wrap_angle(back[:, 6] - boxes[:, 6]), 0, atol=1e-9)
    T = pose_matrix(5, -3, 1, 0.7)
    moved = transform_boxes(T, boxes)
    np.testing.assert_allclose(boxes_to_corners(moved), transform_points(T, boxes_to_corners(boxes).reshape(-1, 3)).reshape(-1, 8, 3), atol=1e-9)
    np.testing.assert_allclose(invert(T) @ T, np.eye(4), atol=1e-12)


def test_points_in_boxes_and_range_mask():
    box = np.array([[10.0, 0, 0, 4, 2, 2, np.pi / 2]])
    pts = np.array([[10, 1.9, 0], [10, 2.1, 0], [10.9, 0, 0], [11.1, 0, 0]], dtype=np.float32)
    assert points_in_boxes(pts, box)[0].tolist() == [True, False, True, False]
    assert in_range_mask(box, [-20, -20, -3, 20, 20, 3]).tolist() == [True]
    assert in_range_mask(box, [-20, -20, -0.5, 20, 20, 3]).tolist() == [False]  # corners below zmin


def test_orthonormalize_recovers_scaled_rotation():
    R = pose_matrix(0, 0, 0, 0.4, 0.1, -0.2)[:3, :3]
    np.testing.assert_allclose(orthonormalize(R * 1.0003), R, atol=1e-12)

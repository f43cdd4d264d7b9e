"""Ground truth and evaluation as the public benchmarks define them (README: "Ground truth and
evaluation rules"). Each test pins one rule with the example that showed a difference."""

from __future__ import annotations

import numpy as np
import pytest

from coperception.config import DAIR_RANGE, OPV2V_EVAL_RANGE, DatasetConfig, load_config
from coperception.datasets.cooperative import merge_ground_truth, select_agents
from coperception.datasets.dair_v2x import DairV2XDataset
from coperception.eval.ap import APAccumulator, match_frame
from coperception.geometry import boxes_to_corners, corners_to_boxes, pose_matrix, wrap_angle
from coperception.io import write_json


def test_corners_keep_the_heading_over_the_full_circle():
    for yaw in (-1.0, np.pi, -np.pi + 1e-3, 2.5, 0.0):
        box = np.array([[10, 5, -1, 4.5, 1.8, 1.6, yaw]])
        back = corners_to_boxes(boxes_to_corners(box))
        np.testing.assert_allclose(back[0, :6], box[0, :6], atol=1e-9)
        assert abs(wrap_angle(back[0, 6] - yaw)) < 1e-9, yaw  # before the fix: -1.0 came back as 2.1416, pi as 0
    rng = np.random.default_rng(3)
    boxes = np.column_stack([rng.uniform(-50, 50, (500, 3)), rng.uniform(0.5, 12, (500, 3)), rng.uniform(-np.pi, np.pi, 500)])
    back = corners_to_boxes(boxes_to_corners(boxes))
    np.testing.assert_allclose(back[:, :6], boxes[:, :6], atol=1e-9)
    assert np.abs(wrap_angle(back[:, 6] - boxes[:, 6])).max() < 1e-9


@pytest.mark.parametrize("pitch_deg", [3.0, 8.0])
def test_tilted_box_keeps_its_size(pitch_deg):
    size = np.array([10.4, 2.2, 1.3])
    unit = np.array([[sx, sy, sz] for sz in (-0.5, 0.5) for sx, sy in ((0.5, 0.5), (0.5, -0.5), (-0.5, -0.5), (-0.5, 0.5))])
    T = pose_matrix(20.0, -4.0, 0.5, 0.6, roll=0.02, pitch=np.radians(pitch_deg))
    corners = (unit * size) @ T[:3, :3].T + T[:3, 3]
    box = corners_to_boxes(corners[None])[0]
    np.testing.assert_allclose(box[:3], [20.0, -4.0, 0.5], atol=1e-9)
    np.testing.assert_allclose(box[3:6], size, atol=1e-9)  # sorting by z gave l 2.2, w 0.18, h 2.74 at 8 degrees
    assert abs(box[6] - 0.6) < 1e-9


def test_prediction_needs_all_bev_corners_inside_the_eval_range():
    r = OPV2V_EVAL_RANGE
    outside = np.array([[138.413, 37.627, 0.978, 4.544, 1.602, 1.961, 0.78]])  # centre inside, two corners outside
    assert match_frame(outside, np.array([0.9]), np.zeros((0, 7)), 0.5, r).scores.size == 0
    inside = outside.copy()
    inside[0, :2] = [130.0, 30.0]
    assert match_frame(inside, np.array([0.9]), np.zeros((0, 7)), 0.5, r).scores.size == 1
    # a dropped prediction is no false positive: AP 1 with it present
    gt = np.array([[50.0, 0.0, -1.0, 4.5, 1.8, 1.6, 0.0]])
    acc = APAccumulator(r, (0.5,))
    acc.add(np.vstack([gt, outside]), np.array([0.5, 0.9]), gt)
    assert acc.result()["0.5"] == pytest.approx(1.0)


def test_dair_ground_truth_has_heals_one_metre_z_margin():
    cfg = DatasetConfig(format="dair-v2x", root="x")
    assert cfg.gt_z_margin == 1.0 and cfg.gt_range() == [-102.4, -51.2, -4.5, 102.4, 51.2, 2.5]
    assert DatasetConfig(format="opv2v").gt_range() == list(OPV2V_EVAL_RANGE)
    truck = np.array([[15.0, 2.0, 0.4, 10.0, 2.5, 3.6, 0.1]])  # top at 2.2 m, above DAIR's zmax 1.5
    kept, _, _ = merge_ground_truth([(truck, np.array([1]), ["vehicle"])], set(), cfg.gt_range(DAIR_RANGE))
    assert len(kept) == 1
    dropped, _, _ = merge_ground_truth([(truck, np.array([1]), ["vehicle"])], set(), DAIR_RANGE)
    assert len(dropped) == 0
    with_margin = APAccumulator(cfg.eval_range, (0.5,), gt_range=cfg.gt_range())
    without = APAccumulator(cfg.eval_range, (0.5,))
    for acc in (with_margin, without):
        acc.add(truck, np.array([0.9]), truck)
    assert with_margin.result()["0.5"] == pytest.approx(1.0)
    assert without.result()["0.5"] == 0.0  # the truck is no GT there, so its detection is a false positive


def test_max_agents_is_applied_before_the_comm_range():
    order = ["641", "650", "659", "668", "677", "686"]
    positions = {a: np.array([10.0 * i, 0.0, 0.0]) for i, a in enumerate(order)}
    positions["650"] = np.array([500.0, 0.0, 0.0])  # the second agent is out of range
    # OpenCOOD: the first 5 in order, then those in range -> 4 agents, '686' does not move up
    assert select_agents(order, positions, 70.0, 5) == ["641", "659", "668", "677"]
    assert select_agents(order, positions, 70.0, 6) == ["641", "659", "668", "677", "686"]
    assert select_agents(order, positions, 1000.0, 2) == ["641", "650"]


def test_first_listing_in_range_wins_the_deduplication():
    r = [-140.8, -40.0, -3.0, 140.8, 40.0, 1.0]
    far = np.array([[139.0, 0.0, -1.0, 4.5, 1.8, 1.6, 0.3]])  # corners beyond 140.8: out of range
    near = np.array([[139.0 - 2.0, 0.0, -1.0, 4.5, 1.8, 1.6, 0.3]])  # the same car as a second agent saw it
    boxes, ids, _ = merge_ground_truth([(far, np.array([7]), ["vehicle"]), (near, np.array([7]), ["vehicle"])], set(), r)
    assert ids.tolist() == [7]
    np.testing.assert_allclose(boxes, near)
    # in range twice: the first listing wins; the ego's own id never becomes GT
    boxes, ids, _ = merge_ground_truth([(near, np.array([7]), ["vehicle"]), (near + 0.5, np.array([7]), ["vehicle"]),
                                        (near, np.array([3]), ["vehicle"])], {3}, r)
    assert ids.tolist() == [7] and np.allclose(boxes, near)


def test_dair_dataset_defaults_to_dair_ranges_and_100_m(tmp_path):
    write_json(tmp_path / "cooperative" / "data_info.json", [])
    ds = DairV2XDataset(tmp_path, "all")
    assert ds.cfg.comm_range == 100.0
    assert ds.cfg.max_agents == 2
    assert ds.cfg.point_cloud_range == list(DAIR_RANGE) and ds.cfg.eval_range == list(DAIR_RANGE)
    # a config file that names the format but not the values gets the same
    path = tmp_path / "dair.yaml"
    path.write_text("dataset:\n  format: dair-v2x\n  root: x\n")
    cfg = load_config(str(path)).dataset
    assert (cfg.comm_range, cfg.gt_z_margin, cfg.eval_range) == (100.0, 1.0, list(DAIR_RANGE))
    # values the file does give win
    path.write_text("dataset:\n  format: dair-v2x\n  root: x\n  comm_range: 50\n")
    assert load_config(str(path)).dataset.comm_range == 50.0

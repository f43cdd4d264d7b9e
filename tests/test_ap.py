"""Hand-made cases for the AP evaluator."""

import numpy as np
import pytest

from coperception.eval.ap import APAccumulator, ap_from_matches, match_frame, voc_ap

RANGE = [-140, -40, -3, 140, 40, 1]


def car(x, y, yaw=0.0):
    return [x, y, -1.0, 4.0, 2.0, 1.5, yaw]


def test_perfect_predictions_give_one():
    acc = APAccumulator(RANGE)
    for f in range(5):
        gt = np.array([car(10 * f, 0), car(-20, 5 + f)])
        acc.add(gt, np.array([0.9, 0.8]), gt)
    assert acc.result() == {"0.3": 1.0, "0.5": 1.0, "0.7": 1.0}
    assert acc.result(global_sort=False) == {"0.3": 1.0, "0.5": 1.0, "0.7": 1.0}


def test_known_shift_sets_iou_and_threshold():
    gt = np.array([car(0, 0)])
    pred = np.array([car(1.0, 0)])  # 1 m along the 4 m length: IoU = 6 / 10 = 0.6
    assert match_frame(pred, np.array([0.9]), gt, 0.5, RANGE).true_positive.tolist() == [True]
    assert match_frame(pred, np.array([0.9]), gt, 0.7, RANGE).true_positive.tolist() == [False]
    acc = APAccumulator(RANGE)
    acc.add(pred, np.array([0.9]), gt)
    assert acc.result() == {"0.3": 1.0, "0.5": 1.0, "0.7": 0.0}


def test_duplicates_are_false_positives():
    gt = np.array([car(0, 0)])
    pred = np.array([car(0, 0), car(0.1, 0)])
    m = match_frame(pred, np.array([0.9, 0.8]), gt, 0.5, RANGE)
    assert m.true_positive.tolist() == [True, False]
    # precision 1 at recall 1 is reached first, so AP stays 1; a duplicate ranked first costs precision
    m2 = match_frame(np.array([car(0.5, 0), car(0, 0)]), np.array([0.95, 0.9]), gt, 0.9, RANGE)  # IoU 7/9, 1
    assert m2.true_positive.tolist() == [False, True]
    assert ap_from_matches([m2]) == pytest.approx(0.5)


def test_no_predictions_give_zero_and_out_of_range_ignored():
    acc = APAccumulator(RANGE)
    acc.add(np.zeros((0, 7)), np.zeros(0), np.array([car(0, 0)]))
    assert acc.result()["0.5"] == 0.0
    far = match_frame(np.array([car(150, 0)]), np.array([0.9]), np.array([car(150, 0), car(0, 0)]), 0.5, RANGE)
    assert far.n_gt == 1 and len(far.scores) == 0


def test_global_and_per_frame_sort_differ():
    # frame A: a confident false positive; frame B: a low-score true positive
    frames = [
        match_frame(np.array([car(50, 10)]), np.array([0.9]), np.array([car(0, 0)]), 0.5, RANGE),
        match_frame(np.array([car(0, 0)]), np.array([0.3]), np.array([car(0, 0)]), 0.5, RANGE),
        match_frame(np.array([car(0, 0)]), np.array([0.95]), np.array([car(0, 0)]), 0.5, RANGE),
    ]
    global_ap = ap_from_matches(frames, global_sort=True)  # order: TP(.95) FP(.9) TP(.3)
    per_frame = ap_from_matches(frames, global_sort=False)  # order: FP TP TP
    assert global_ap == pytest.approx(1 / 3 * 1.0 + 1 / 3 * (2 / 3))
    assert per_frame == pytest.approx(2 / 3 * (2 / 3))
    assert global_ap != per_frame


def test_voc_ap_interpolates_precision():
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 0.667])) == pytest.approx(0.5 + 0.5 * 0.667)

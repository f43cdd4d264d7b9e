"""Anchor targets from the windowed assigner equal the all-pairs assignment exactly."""

from __future__ import annotations

import numpy as np
import pytest

from coperception.geometry import rotated_iou_bev
from coperception.grid import BEVGrid
from coperception.models.anchors import direction_bin, encode_boxes, make_anchors
from coperception.models.targets import AnchorAssigner


def all_pairs_targets(anchors: np.ndarray, gt_boxes: np.ndarray, pos_iou: float, neg_iou: float):
    """The definition: IoU of every anchor with every GT box, then the same rules."""
    flat = anchors.reshape(-1, 7)
    n = len(flat)
    labels = np.zeros(n, dtype=np.int64)
    residuals = np.zeros((n, 7), dtype=np.float32)
    direction = np.zeros(n, dtype=np.int64)
    if len(gt_boxes) == 0:
        return labels, residuals, direction
    iou = rotated_iou_bev(flat, gt_boxes)
    best_gt = iou.argmax(axis=1)
    best_iou = iou[np.arange(n), best_gt]
    labels[(best_iou >= neg_iou) & (best_iou < pos_iou)] = -1
    positive = best_iou >= pos_iou
    best_anchor = iou.argmax(axis=0)
    has_overlap = iou[best_anchor, np.arange(len(gt_boxes))] > 0
    positive[best_anchor[has_overlap]] = True
    best_gt[best_anchor[has_overlap]] = np.arange(len(gt_boxes))[has_overlap]
    labels[positive] = 1
    matched = gt_boxes[best_gt[positive]]
    residuals[positive] = encode_boxes(matched, flat[positive])
    direction[positive] = direction_bin(matched[:, 6])
    return labels, residuals, direction


@pytest.mark.parametrize("seed", range(6))
def test_windowed_assignment_equals_all_pairs(seed):
    rng = np.random.default_rng(seed)
    grid = BEVGrid.from_range([-40.0, -20.0, -3.0, 40.0, 20.0, 1.0], 1.6 if seed % 2 else 0.8)
    anchors = make_anchors(grid, (3.9, 1.6, 1.56), -1.0, np.radians([0.0, 90.0]))
    m = int(rng.integers(0, 40))
    gt = np.column_stack([rng.uniform(-45, 45, m), rng.uniform(-25, 25, m), rng.uniform(-2, 0, m),
                          rng.uniform(2.5, 12, m), rng.uniform(1.4, 3, m), rng.uniform(1.3, 4, m), rng.uniform(-np.pi, np.pi, m)])
    if m > 3:  # boxes on anchors exactly, and two identical boxes (ties)
        gt[0, :2] = anchors[3, 5, 0, :2]
        gt[0, 3:5] = anchors[3, 5, 0, 3:5]
        gt[0, 6] = 0.0
        gt[1] = gt[0]
    got = AnchorAssigner(anchors, 0.6, 0.45)(gt)
    labels, residuals, direction = all_pairs_targets(anchors, gt, 0.6, 0.45)
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_array_equal(got.residuals, residuals)
    np.testing.assert_array_equal(got.direction, direction)
    if m:
        assert (labels == 1).any()

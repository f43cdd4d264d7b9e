"""Anchor target assignment by rotated BEV IoU."""

from __future__ import annotations

import numpy as np

from coperception.geometry import rotated_iou_bev
from coperception.models.anchors import direction_bin, encode_boxes
from coperception.types import AnchorTargets


def assign_targets(anchors: np.ndarray, gt_boxes: np.ndarray, pos_iou: float, neg_iou: float) -> AnchorTargets:
    """Positives: IoU >= pos_iou, plus each GT's best anchor (so no box goes unmatched);
    negatives: IoU < neg_iou with every GT; the rest are ignored."""
    flat = anchors.reshape(-1, 7)
    n = len(flat)
    labels = np.zeros(n, dtype=np.int64)
    residuals = np.zeros((n, 7), dtype=np.float32)
    direction = np.zeros(n, dtype=np.int64)
    if len(gt_boxes) == 0:
        return AnchorTargets(labels, residuals, direction)
    iou = rotated_iou_bev(flat, gt_boxes)  # (A, M), sparse in practice
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
    return AnchorTargets(labels, residuals, direction)

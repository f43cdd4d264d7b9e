"""Anchor target assignment by rotated BEV IoU.

Anchors sit on a regular grid, so the anchors a ground-truth box can overlap are found from its
position (a window of cells) instead of testing every anchor; their corners are computed once.
"""

from __future__ import annotations

import numpy as np

from coperception.geometry import bev_corners, pair_ious
from coperception.models.anchors import direction_bin, encode_boxes
from coperception.types import AnchorTargets


class AnchorAssigner:
    """Targets for the (H, W, R, 7) anchors of one BEV grid (cell centres on a regular lattice)."""

    def __init__(self, anchors: np.ndarray, pos_iou: float, neg_iou: float):
        if anchors.ndim != 4 or anchors.shape[-1] != 7:
            raise ValueError(f"anchors must be (H, W, R, 7), got {anchors.shape}")
        self.shape = anchors.shape[:3]
        self.flat = anchors.reshape(-1, 7).astype(np.float64)
        self.flat_stored = anchors.reshape(-1, 7)  # residuals are encoded against the anchors as stored
        self.corners = bev_corners(self.flat)
        self.radius = 0.5 * np.hypot(self.flat[:, 3], self.flat[:, 4])
        self.pos_iou, self.neg_iou = pos_iou, neg_iou
        H, W, _ = self.shape
        self.x0, self.y0 = float(anchors[0, 0, 0, 0]), float(anchors[0, 0, 0, 1])
        self.dx = float(anchors[0, 1, 0, 0] - anchors[0, 0, 0, 0]) if W > 1 else 1.0
        self.dy = float(anchors[1, 0, 0, 1] - anchors[0, 0, 0, 1]) if H > 1 else 1.0
        self.abs_xy_max = float(np.abs(self.flat[:, :2]).max()) if len(self.flat) else 0.0

    def candidate_pairs(self, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(anchor, gt) index pairs whose bounding circles meet: the only pairs with a non-zero IoU."""
        H, W, R = self.shape
        reach = 0.5 * np.hypot(gt[:, 3], gt[:, 4]) + self.radius.max()
        cx = np.sort(np.stack([(gt[:, 0] - reach - self.x0) / self.dx, (gt[:, 0] + reach - self.x0) / self.dx]), axis=0)
        cy = np.sort(np.stack([(gt[:, 1] - reach - self.y0) / self.dy, (gt[:, 1] + reach - self.y0) / self.dy]), axis=0)
        c0 = np.clip(np.floor(cx[0]), 0, W).astype(np.int64)
        c1 = np.clip(np.ceil(cx[1]) + 1, 0, W).astype(np.int64)
        r0 = np.clip(np.floor(cy[0]), 0, H).astype(np.int64)
        r1 = np.clip(np.ceil(cy[1]) + 1, 0, H).astype(np.int64)
        rows, cols = np.maximum(r1 - r0, 0), np.maximum(c1 - c0, 0)
        per_gt = rows * cols * R
        gi = np.repeat(np.arange(len(gt)), per_gt)
        k = np.arange(int(per_gt.sum())) - np.repeat(np.cumsum(per_gt) - per_gt, per_gt)  # index inside its window
        width = np.repeat(cols * R, per_gt)
        row = np.repeat(r0, per_gt) + k // np.maximum(width, 1)
        rest = k % np.maximum(width, 1)
        ai = (row * W + np.repeat(c0, per_gt) + rest // R) * R + rest % R
        dist = np.hypot(self.flat[ai, 0] - gt[gi, 0], self.flat[ai, 1] - gt[gi, 1])
        meet = dist < self.radius[ai] + 0.5 * np.hypot(gt[gi, 3], gt[gi, 4])
        return ai[meet], gi[meet]

    def __call__(self, gt_boxes: np.ndarray) -> AnchorTargets:
        """Positives: IoU >= pos_iou, plus each GT's best anchor (so no box goes unmatched);
        negatives: IoU < neg_iou with every GT; the rest are ignored."""
        flat, n = self.flat, len(self.flat)
        labels = np.zeros(n, dtype=np.int64)
        residuals = np.zeros((n, 7), dtype=np.float32)
        direction = np.zeros(n, dtype=np.int64)
        gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 7)
        m = len(gt)
        if m == 0:
            return AnchorTargets(labels, residuals, direction)
        ai, gi = self.candidate_pairs(gt)
        eps = 1e-9 * max(self.abs_xy_max, float(np.abs(gt[:, :2]).max()), 1.0)
        iou = pair_ious(flat, self.corners, gt, bev_corners(gt), ai, gi, eps)
        # best GT of each anchor (ties: the lowest GT index) and best anchor of each GT (ties: the lowest anchor)
        best_gt, best_iou = _best_partner(ai, gi, iou, n)
        labels[(best_iou >= self.neg_iou) & (best_iou < self.pos_iou)] = -1
        positive = best_iou >= self.pos_iou
        best_anchor, best_of_gt = _best_partner(gi, ai, iou, m)
        has_overlap = best_of_gt > 0
        positive[best_anchor[has_overlap]] = True
        best_gt[best_anchor[has_overlap]] = np.arange(m)[has_overlap]
        labels[positive] = 1
        matched = gt[best_gt[positive]]
        residuals[positive] = encode_boxes(matched, self.flat_stored[positive])
        direction[positive] = direction_bin(matched[:, 6])
        return AnchorTargets(labels, residuals, direction)


def _best_partner(owner: np.ndarray, partner: np.ndarray, iou: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of `size` owners, the partner of its highest-IoU pair (ties: the lowest partner index)
    and that IoU; 0 and 0.0 for owners without pairs."""
    best = np.zeros(size, dtype=np.int64)
    best_iou = np.zeros(size)
    order = np.lexsort((partner, -iou, owner))
    first = order[np.r_[True, owner[order][1:] != owner[order][:-1]]] if len(order) else order
    best[owner[first]] = partner[first]
    best_iou[owner[first]] = iou[first]
    return best, best_iou


def assign_targets(anchors: np.ndarray, gt_boxes: np.ndarray, pos_iou: float, neg_iou: float) -> AnchorTargets:
    """One-off assignment (builds an `AnchorAssigner`; keep one for repeated calls)."""
    return AnchorAssigner(anchors, pos_iou, neg_iou)(gt_boxes)

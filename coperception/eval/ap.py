"""Average precision for BEV rotated boxes (DESIGN §5).

Protocol: BEV rotated IoU of footprints; VOC all-point-interpolated AP; GT limited to the
GT range (the eval range, for DAIR-V2X widened by 1 m in z as HEAL does; all 8 corners
inside), predictions dropped unless all four BEV corners lie inside the eval range's x/y
(OpenCOOD and HEAL);
a detection is a true positive when its IoU with the best still-unmatched GT of its frame
reaches the threshold; the GT count sums over all frames.
- `global` (HEAL / CoAlign): the detections of all frames are sorted together by score.
- `opencood`: each frame's detections sorted by score and concatenated in frame order, as
  OpenCOOD's evaluation does; it typically reads 10-20 points higher. Reported beside the
  global number only for comparison with published tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from coperception.geometry import bev_in_range_mask, in_range_mask, rotated_iou_bev

PROTOCOL = ("BEV rotated IoU; VOC all-point AP; detections of all frames sorted together by score (global sort); "
            "GT in the eval range (8 corners inside), predictions with a BEV corner outside it in x/y dropped")


@dataclass
class FrameMatches:
    scores: np.ndarray  # detections of the frame, sorted by descending score
    true_positive: np.ndarray  # bool, same order
    n_gt: int


@dataclass
class BoxMatches:
    """One frame's matching in the caller's box order (what a picture colours)."""

    evaluated: np.ndarray  # per prediction: inside the eval range (else it is not scored)
    true_positive: np.ndarray  # per prediction
    gt_kept: np.ndarray  # per GT box: inside the GT range (else it does not count)
    gt_matched: np.ndarray  # per GT box: matched by a true positive


def match_boxes(boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou_threshold: float,
                eval_range: Sequence[float], gt_range: Sequence[float] | None = None) -> BoxMatches:
    """Greedy matching of one frame. GT is kept when its 8 corners lie in `gt_range` (default: the
    eval range); a prediction when its 4 BEV corners lie in the eval range's x/y. In score order each
    kept prediction takes the best still-unmatched kept GT box if their IoU reaches the threshold."""
    boxes, gt = np.asarray(boxes).reshape(-1, 7), np.asarray(gt).reshape(-1, 7)
    gt_range = eval_range if gt_range is None else gt_range
    gt_kept = in_range_mask(gt, gt_range) if len(gt) else np.zeros(0, dtype=bool)
    evaluated = bev_in_range_mask(boxes, eval_range) if len(boxes) else np.zeros(0, dtype=bool)
    tp = np.zeros(len(boxes), dtype=bool)
    matched = np.zeros(len(gt), dtype=bool)
    pred_idx, gt_idx = np.nonzero(evaluated)[0], np.nonzero(gt_kept)[0]
    if len(pred_idx) and len(gt_idx):
        order = pred_idx[np.argsort(-np.asarray(scores)[pred_idx], kind="stable")]
        iou = rotated_iou_bev(boxes[order], gt[gt_idx])
        unmatched = np.ones(len(gt_idx), dtype=bool)
        for i, p in enumerate(order):  # greedy over detections of one frame
            candidates = np.where(unmatched, iou[i], -1.0)
            j = int(np.argmax(candidates))
            if candidates[j] >= iou_threshold:
                tp[p] = True
                unmatched[j] = False
                matched[gt_idx[j]] = True
    return BoxMatches(evaluated, tp, gt_kept, matched)


def match_frame(boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou_threshold: float,
                eval_range: Sequence[float], gt_range: Sequence[float] | None = None) -> FrameMatches:
    """`match_boxes` as AP needs it: the scored detections by descending score, TP flags, GT count."""
    scores = np.asarray(scores).reshape(-1)
    m = match_boxes(boxes, scores, gt, iou_threshold, eval_range, gt_range)
    kept = np.nonzero(m.evaluated)[0]
    order = kept[np.argsort(-scores[kept], kind="stable")]
    return FrameMatches(scores[order], m.true_positive[order], int(m.gt_kept.sum()))


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated area under the precision-recall curve."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def ap_from_matches(frames: Sequence[FrameMatches], global_sort: bool = True) -> float:
    n_gt = sum(f.n_gt for f in frames)
    if n_gt == 0:
        return 0.0
    scores = np.concatenate([f.scores for f in frames]) if frames else np.zeros(0)
    tp = np.concatenate([f.true_positive for f in frames]) if frames else np.zeros(0, dtype=bool)
    if len(tp) == 0:
        return 0.0
    if global_sort:
        order = np.argsort(-scores, kind="stable")
        tp = tp[order]
    tp_cum = np.cumsum(tp)
    fp_cum = np.cumsum(~tp)
    recall = tp_cum / n_gt
    precision = tp_cum / np.maximum(tp_cum + fp_cum, 1)
    return voc_ap(recall, precision)


@dataclass
class APAccumulator:
    """Add frames one by one; read AP for every threshold and both protocols."""

    eval_range: Sequence[float]
    thresholds: Sequence[float] = (0.3, 0.5, 0.7)
    gt_range: Sequence[float] | None = None  # None: the eval range
    frames: dict[float, list[FrameMatches]] = field(default_factory=dict)

    def add(self, boxes: np.ndarray, scores: np.ndarray, gt: np.ndarray) -> None:
        for t in self.thresholds:
            self.frames.setdefault(t, []).append(match_frame(np.asarray(boxes).reshape(-1, 7), np.asarray(scores).reshape(-1),
                                                             np.asarray(gt).reshape(-1, 7), t, self.eval_range,
                                                             self.gt_range))

    def result(self, global_sort: bool = True) -> dict[str, float]:
        return {f"{t:g}": ap_from_matches(self.frames.get(t, []), global_sort) for t in self.thresholds}

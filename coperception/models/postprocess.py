"""From head outputs to detections: decode, score threshold, rotated NMS."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from coperception.geometry import rotated_iou_bev
from coperception.models.anchors import apply_direction, decode_boxes
from coperception.models.heads import HeadOutput
from coperception.types import AnchorSet


@dataclass
class Detections:
    """Boxes (K, 7) in the ego frame, scores (K,), labels (K,) (0 = vehicle)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 7)), np.zeros(0), np.zeros(0, dtype=np.int64))


def rotated_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_out: int = 500) -> np.ndarray:
    """Indices kept by greedy NMS on BEV rotated IoU, highest score first."""
    order = np.argsort(-scores, kind="stable")
    if len(order) == 0:
        return order
    iou = rotated_iou_bev(boxes[order], boxes[order])
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):  # over candidate boxes (hundreds), not points
        if suppressed[i]:
            continue
        keep.append(order[i])
        if len(keep) >= max_out:
            break
        suppressed |= iou[i] > iou_threshold
    return np.array(keep, dtype=np.int64)


def _nms_decoded(out: HeadOutput, b: int, anchors: torch.Tensor, min_score: float, nms_threshold: float,
                 pre_nms: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Sample `b`'s anchors at least `min_score` confident (the `pre_nms` most confident), decoded and
    through rotated NMS: their anchor indices, boxes (tensor), boxes and scores as float64 arrays and the
    kept positions among them, most confident first."""
    scores = torch.sigmoid(out.cls[b].detach())
    chosen = torch.nonzero(scores >= min_score).squeeze(1)
    if len(chosen) > pre_nms:
        chosen = chosen[torch.topk(scores[chosen], pre_nms).indices]
    boxes = decode_boxes(out.reg[b, chosen].detach(), anchors[chosen])
    boxes[:, 6] = apply_direction(boxes[:, 6], out.direction[b, chosen].detach().argmax(dim=1))
    boxes_np = boxes.cpu().double().numpy()
    scores_np = scores[chosen].cpu().double().numpy()
    kept = rotated_nms(boxes_np, scores_np, nms_threshold) if len(chosen) else np.zeros(0, dtype=np.int64)
    return chosen, boxes, boxes_np, scores_np, kept


def decode_detections(out: HeadOutput, anchors: torch.Tensor, score_threshold: float, nms_threshold: float,
                      pre_nms: int = 1000) -> list[Detections]:
    """Per sample of the batch: boxes above the score threshold after rotated NMS."""
    results = []
    for b in range(out.cls.shape[0]):
        _, _, boxes_np, scores_np, kept = _nms_decoded(out, b, anchors, score_threshold, nms_threshold, pre_nms)
        results.append(Detections(boxes_np[kept], scores_np[kept], np.zeros(len(kept), dtype=np.int64)))
    return results


def top_anchors(head: HeadOutput, view: int, anchors: torch.Tensor, anchors_per_cell: int, min_score: float,
                nms_threshold: float, keep: int, pre_nms: int = 500) -> AnchorSet:
    """The `keep` most confident anchors of view `view` of `head` at least `min_score` confident, after
    rotated NMS (most confident first), decoded into boxes of the view's frame (detached)."""
    chosen, boxes, _, _, kept = _nms_decoded(head, view, anchors, min_score, nms_threshold, pre_nms)
    kept_t = torch.from_numpy(kept[:keep]).to(chosen.device)
    # anchors are flattened in the order (H, W, R): R anchors per cell
    cells = torch.div(chosen[kept_t], anchors_per_cell, rounding_mode="floor")
    return AnchorSet(boxes[kept_t], head.cls[view].detach()[chosen[kept_t]], cells)

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


def decode_detections(out: HeadOutput, anchors: torch.Tensor, score_threshold: float, nms_threshold: float,
                      pre_nms: int = 1000) -> list[Detections]:
    """Per sample of the batch: boxes above the score threshold after rotated NMS."""
    results = []
    scores_all = torch.sigmoid(out.cls)
    for b in range(out.cls.shape[0]):
        scores = scores_all[b]
        keep = torch.nonzero(scores >= score_threshold).squeeze(1)
        if len(keep) > pre_nms:
            keep = keep[torch.topk(scores[keep], pre_nms).indices]
        if len(keep) == 0:
            results.append(Detections.empty())
            continue
        boxes = decode_boxes(out.reg[b, keep], anchors[keep])
        boxes[:, 6] = apply_direction(boxes[:, 6], out.direction[b, keep].argmax(dim=1))
        boxes_np = boxes.detach().cpu().double().numpy()
        scores_np = scores[keep].detach().cpu().double().numpy()
        kept = rotated_nms(boxes_np, scores_np, nms_threshold)
        results.append(Detections(boxes_np[kept], scores_np[kept], np.zeros(len(kept), dtype=np.int64)))
    return results


def top_anchors(head: HeadOutput, view: int, anchors: torch.Tensor, anchors_per_cell: int, min_score: float,
                nms_threshold: float, keep: int, pre_nms: int = 500) -> AnchorSet:
    """The `keep` most confident anchors of view `view` of `head` at least `min_score` confident, after
    rotated NMS (most confident first), decoded into boxes of the view's frame (detached)."""
    logits = head.cls[view].detach()
    device = logits.device
    chosen = torch.nonzero(torch.sigmoid(logits) >= min_score).squeeze(1)
    if len(chosen) > pre_nms:
        chosen = chosen[torch.topk(logits[chosen], pre_nms).indices]
    if len(chosen) == 0:
        return AnchorSet(torch.zeros(0, 7, device=device), torch.zeros(0, device=device),
                         torch.zeros(0, dtype=torch.int64, device=device))
    boxes = decode_boxes(head.reg[view, chosen].detach(), anchors[chosen])
    boxes[:, 6] = apply_direction(boxes[:, 6], head.direction[view, chosen].detach().argmax(dim=1))
    kept = rotated_nms(boxes.cpu().double().numpy(), logits[chosen].cpu().double().numpy(), nms_threshold)[:keep]
    kept_t = torch.from_numpy(kept).to(device)
    # anchors are flattened in the order (H, W, R): R anchors per cell
    cells = torch.div(chosen[kept_t], anchors_per_cell, rounding_mode="floor")
    return AnchorSet(boxes[kept_t], logits[chosen][kept_t], cells)

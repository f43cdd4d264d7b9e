"""Detection losses: sigmoid focal loss, smooth-L1 box residuals (sin-difference yaw), direction CE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coperception.models.heads import HeadOutput


@dataclass
class LossWeights:
    cls: float = 1.0
    reg: float = 2.0
    direction: float = 0.2
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    smooth_l1_beta: float = 1.0 / 9.0


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t) ** gamma * ce


def detection_loss(out: HeadOutput, labels: torch.Tensor, residuals: torch.Tensor, direction: torch.Tensor,
                   w: LossWeights) -> dict[str, torch.Tensor]:
    """labels (B, A) in {1, 0, -1 ignore}; residuals (B, A, 7); direction (B, A). Normalised by positives."""
    positive = labels == 1
    care = labels >= 0
    n_pos = positive.sum().clamp(min=1).to(out.cls.dtype)
    cls = sigmoid_focal_loss(out.cls, positive.to(out.cls.dtype), w.focal_alpha, w.focal_gamma)
    cls = (cls * care).sum() / n_pos
    pred = out.reg[positive]
    target = residuals[positive]
    # compare yaw through sin(a - b) = sin a cos b - cos a sin b, which ignores the pi ambiguity
    pred_yaw = torch.sin(pred[:, 6:7]) * torch.cos(target[:, 6:7])
    target_yaw = torch.cos(pred[:, 6:7]) * torch.sin(target[:, 6:7])
    pred = torch.cat([pred[:, :6], pred_yaw], dim=1)
    target = torch.cat([target[:, :6], target_yaw], dim=1)
    reg = F.smooth_l1_loss(pred, target, beta=w.smooth_l1_beta, reduction="sum") / n_pos
    direction_loss = F.cross_entropy(out.direction[positive], direction[positive], reduction="sum") / n_pos
    total = w.cls * cls + w.reg * reg + w.direction * direction_loss
    return {"total": total, "cls": cls.detach(), "reg": reg.detach(), "direction": direction_loss.detach()}

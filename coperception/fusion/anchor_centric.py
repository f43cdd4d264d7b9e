"""Anchor-centric fusion (after ACCO): agents exchange anchors, not BEV maps.

A sender sends its most confident anchors after NMS: each one's decoded box and score plus its anchor
feature (the BEV feature of the anchor's cell, projected to `feature_dim` values and coded by a small
residual codebook; `comm/anchor_wire.py` puts them on the air). The ego takes its own most confident
anchors and every received anchor (moved into its frame with the pose the message states) as
candidates; each candidate attends to the received anchors within `radius_m` of it, keys and values
carrying a relative-pose encoding (offset in the candidate's box frame, heading and size differences),
the query carrying the ego's own BEV features at the candidate's centre and side midpoints, so the ego
weighs what others saw against what it sees itself. Every layer refines the candidate; the last gives a
new score for every candidate (`rescore: all`, one score scale for all: a candidate no received anchor
is near is rescored from the ego's own features alone) and, with `refine_boxes`, a box correction (off
by default: measured worse). The ego side (`pipeline/anchor_exchange.py`) then keeps the confident
candidates after NMS, each box the score-weighted mean of the candidates overlapping it (`merge_iou`).
An ego that received nothing keeps the detector's scores and boxes exactly (it detects as alone);
anchors only others saw stay candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from coperception.config import AnchorSettings
from coperception.geometry import rotated_iou_bev
from coperception.grid import BEVGrid
from coperception.types import AnchorSet

MAX_LOGIT = 9.0  # a score of 1 (or 0) as a logit: sent scores are quantized to 1/255


@dataclass
class ReceivedAnchors:
    """What one ego holds from its senders: boxes (M, 7) in the ego frame, score logits (M,), the decoded
    anchor-feature vectors (M, feature_dim), message age (M,) in seconds, agent kind (M,) 0 vehicle / 1 rsu."""

    boxes: torch.Tensor
    logits: torch.Tensor
    vectors: torch.Tensor
    age: torch.Tensor
    kind: torch.Tensor

    @staticmethod
    def empty(feature_dim: int, device: torch.device | str) -> "ReceivedAnchors":
        z = torch.zeros(0, device=device)
        return ReceivedAnchors(torch.zeros(0, 7, device=device), z, torch.zeros(0, feature_dim, device=device), z,
                               torch.zeros(0, dtype=torch.int64, device=device))

    @staticmethod
    def cat(parts: list["ReceivedAnchors"], feature_dim: int, device: torch.device | str) -> "ReceivedAnchors":
        if not parts:
            return ReceivedAnchors.empty(feature_dim, device)
        return ReceivedAnchors(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                 ("boxes", "logits", "vectors", "age", "kind")))


@dataclass
class Refined:
    """One ego's candidates after refinement, in the ego frame: boxes (Q, 7), score logits (Q,), whether a
    received anchor was near (Q,), the candidates before refinement (Q, 7), and whether the ego received any
    anchor at all (without, every candidate is the detector's own, unchanged)."""

    boxes: torch.Tensor
    logits: torch.Tensor
    has_context: torch.Tensor
    before: torch.Tensor
    received_any: bool
    changed: torch.Tensor  # (Q,) bool: the candidates the refinement changed (`settings.rescore`)


def transform_boxes_torch(T: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Boxes (K, 7) moved by the rigid transform T (4, 4): centres transformed, headings turned by T's yaw
    (wrapped into [-pi, pi) as `geometry.transform_boxes` does)."""
    T = T.to(boxes.dtype)
    centres = boxes[:, :3] @ T[:3, :3].T + T[:3, 3]
    yaw = torch.remainder(boxes[:, 6] + torch.atan2(T[1, 0], T[0, 0]) + math.pi, 2 * math.pi) - math.pi
    return torch.cat([centres, boxes[:, 3:6], yaw[:, None]], dim=1)


def cells_at(grid: BEVGrid, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, 2) positions -> (K,) flat cell index (clamped) and (K,) whether the position lies on the grid."""
    col = torch.floor((xy[:, 0] - grid.x_min) / grid.cell).long()
    row = torch.floor((xy[:, 1] - grid.y_min) / grid.cell).long()
    inside = (col >= 0) & (col < grid.width) & (row >= 0) & (row < grid.height)
    return row.clamp(0, grid.height - 1) * grid.width + col.clamp(0, grid.width - 1), inside


EGO_POINTS = 5  # where the ego reads its own features for a candidate: centre, front, back, left, right


def box_points(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 7) boxes -> (..., 5, 2) their centre and the midpoints of their four sides."""
    c, s = torch.cos(boxes[..., 6]), torch.sin(boxes[..., 6])
    half_l, half_w = boxes[..., 3] / 2, boxes[..., 4] / 2
    along = torch.stack([c * half_l, s * half_l], dim=-1)
    across = torch.stack([-s * half_w, c * half_w], dim=-1)
    centre = boxes[..., :2]
    return torch.stack([centre, centre + along, centre - along, centre + across, centre - across], dim=-2)


def sample_features(features: torch.Tensor, grid: BEVGrid, points: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of `features` (B, C, H, W) at `points` (B, Q, P, 2) metres -> (B, Q, P, C); zero off
    the grid."""
    u = (points[..., 0] - grid.x_min) / (grid.width * grid.cell) * 2 - 1
    v = (points[..., 1] - grid.y_min) / (grid.height * grid.cell) * 2 - 1
    sampled = nn.functional.grid_sample(features, torch.stack([u, v], dim=-1).to(features.dtype), mode="bilinear",
                                        padding_mode="zeros", align_corners=False)  # (B, C, Q, P)
    return sampled.permute(0, 2, 3, 1)


def _box_tokens(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 7) -> (..., 3) log sizes."""
    return torch.log(boxes[..., 3:6].clamp(min=0.1))


def relative_encoding(query: torch.Tensor, memory: torch.Tensor, radius: float) -> torch.Tensor:
    """Pose of each memory box relative to each query box: (B, Q, 7), (B, M, 7) -> (B, Q, M, 7) offset in
    the query's box frame and distance (in radii), heading difference as cos/sin of twice it (a footprint
    turned by pi is the same), log length and width ratios."""
    d = memory[:, None, :, :2] - query[:, :, None, :2]
    c, s = torch.cos(query[:, :, None, 6]), torch.sin(query[:, :, None, 6])
    along, across = c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]
    dyaw = 2 * (memory[:, None, :, 6] - query[:, :, None, 6])
    ratio = _box_tokens(memory)[:, None, :, :2] - _box_tokens(query)[:, :, None, :2]
    return torch.stack([along / radius, across / radius, d.norm(dim=-1) / radius, torch.cos(dyaw), torch.sin(dyaw),
                        ratio[..., 0], ratio[..., 1]], dim=-1)


class RefineLayer(nn.Module):
    """Multi-head cross-attention of candidates over received anchors; keys and values get the relative-pose
    encoding added; a null slot lets a candidate attend to nothing."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.dim = heads, hidden // heads
        self.q, self.k, self.v = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.rel_k, self.rel_v = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, rel: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, Q, h), memory (B, M, h), rel (B, Q, M, h), mask (B, Q, M) -> (B, Q, h)."""
        B, Q, _ = x.shape
        M = memory.shape[1]
        heads, dim = self.heads, self.dim
        q = self.q(x).view(B, Q, 1, heads, dim)
        k = (self.k(memory)[:, None] + self.rel_k(rel)).view(B, Q, M, heads, dim)
        v = (self.v(memory)[:, None] + self.rel_v(rel)).view(B, Q, M, heads, dim)
        scores = (q * k).sum(-1) / math.sqrt(dim)  # (B, Q, M, heads)
        scores = scores.masked_fill(~mask[..., None], float("-inf"))
        null = scores.new_zeros(B, Q, 1, heads)
        weights = torch.softmax(torch.cat([null, scores], dim=2), dim=2)[:, :, 1:]  # the null slot's value is zero
        attended = (weights[..., None] * v).sum(2).reshape(B, Q, heads * dim)
        x = self.norm1(x + self.out(attended))
        return self.norm2(x + self.ffn(x))


class AnchorFusion(nn.Module):
    """The sender's anchor-feature coder and the ego's refinement network (see the module docstring)."""

    def __init__(self, channels: int, settings: AnchorSettings, nms_threshold: float, quantizer: nn.Module):
        """`quantizer`: the residual codebook of the anchor features (`comm.codebook.ResidualVQ` of
        `feature_dim` channels, one segment, `stages` x `codes`)."""
        super().__init__()
        s = self.settings = settings
        self.nms_threshold = nms_threshold  # of the candidates each agent proposes (the evaluation's)
        self.compress = nn.Linear(channels, s.feature_dim)
        self.quantizer = quantizer
        h = s.hidden
        # query: the ego's features at the candidate's centre and side midpoints (5 C), centre on the grid (1),
        # logit (1), received (1), log size (3)
        self.query_in = nn.Sequential(nn.Linear(EGO_POINTS * channels + 6, h), nn.ReLU(), nn.Linear(h, h))
        # memory: the received anchor's decoded feature (d), logit (1), age (1), kind (1), log size (3)
        self.memory_in = nn.Sequential(nn.Linear(s.feature_dim + 6, h), nn.ReLU(), nn.Linear(h, h))
        self.relative = nn.Sequential(nn.Linear(7, h), nn.ReLU(), nn.Linear(h, h))
        self.layers = nn.ModuleList(RefineLayer(h, s.heads) for _ in range(s.layers))
        self.score = nn.Linear(h, 1)
        self.box = nn.Linear(h, 7)
        for layer in (self.score, self.box):  # training starts from the candidates as they are
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.box.requires_grad_(s.refine_boxes)  # unused weights would stall DDP's gradient reduction

    @property
    def bits(self) -> int:
        return int(self.quantizer.bits)

    def digest(self) -> bytes:
        return bytes(self.quantizer.digest())

    def code(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sender side: (K, C) anchor features -> (K, feature_dim) vectors as the ego decodes them
        (straight-through in training), (K, stages) codes and the commitment loss."""
        out = self.quantizer(self.compress(features))
        return out.quantized, out.codes[:, 0], out.commitment_loss

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Ego side: (M, stages) codes -> (M, feature_dim) vectors."""
        return self.quantizer.decode(codes[:, None, :])

    def refine(self, ego_features: torch.Tensor, grid: BEVGrid, own: list[AnchorSet],
               received: list[ReceivedAnchors]) -> list[Refined]:
        """Per ego b: `ego_features` (B, C, H, W) its BEV map, `own[b]` its candidates (ego frame),
        `received[b]` the anchors it holds from others -> its refined candidates (own first)."""
        B = ego_features.shape[0]
        device = ego_features.device
        s = self.settings
        boxes = [torch.cat([o.boxes, r.boxes]) for o, r in zip(own, received)]
        logits = [torch.cat([o.logits, r.logits]) for o, r in zip(own, received)]
        source = [torch.cat([torch.zeros(len(o.boxes), device=device), torch.ones(len(r.boxes), device=device)])
                  for o, r in zip(own, received)]
        Q = max(1, max(len(b) for b in boxes))
        M = max(1, max(len(r.boxes) for r in received))
        qbox, qlogit, qsource = (torch.zeros(B, Q, 7, device=device), torch.zeros(B, Q, device=device),
                                 torch.zeros(B, Q, device=device))
        qvalid = torch.zeros(B, Q, dtype=torch.bool, device=device)
        qinside = torch.zeros(B, Q, device=device)
        mbox, mvalid = torch.zeros(B, M, 7, device=device), torch.zeros(B, M, dtype=torch.bool, device=device)
        mtok = torch.zeros(B, M, s.feature_dim + 6, device=device)
        for b in range(B):
            n = len(boxes[b])
            if n:
                qbox[b, :n], qlogit[b, :n], qsource[b, :n], qvalid[b, :n] = boxes[b], logits[b], source[b], True
                qinside[b, :n] = cells_at(grid, boxes[b][:, :2])[1].float()
            r = received[b]
            m = len(r.boxes)
            if m:
                mbox[b, :m], mvalid[b, :m] = r.boxes, True
                mtok[b, :m] = torch.cat([r.vectors, r.logits[:, None] / MAX_LOGIT, r.age[:, None], r.kind[:, None].float(),
                                         _box_tokens(r.boxes)], dim=1)
        qfeat = sample_features(ego_features, grid, box_points(qbox)).flatten(2)  # (B, Q, 5 C)
        query = torch.cat([qfeat, qinside[..., None], qlogit[..., None] / MAX_LOGIT, qsource[..., None],
                           _box_tokens(qbox)], dim=-1)
        x = self.query_in(query)
        memory = self.memory_in(mtok)
        rel_raw = relative_encoding(qbox, mbox, s.radius_m)
        mask = qvalid[:, :, None] & mvalid[:, None, :] & (rel_raw[..., 2] <= 1.0)
        rel = self.relative(rel_raw)
        for layer in self.layers:
            x = layer(x, memory, rel, mask)
        has_context = mask.any(dim=2)
        # an ego that received anything rescores all its candidates (one score scale for the ones others saw
        # and the ones they did not); one that received nothing keeps the detector's
        changed = qvalid & torch.tensor([len(r.boxes) > 0 for r in received], device=device)[:, None]
        changed = (changed & has_context if s.rescore == "near" else changed).float()
        delta_logit = self.score(x)[..., 0] * changed
        delta_box = self.box(x) * changed[..., None] * float(s.refine_boxes)
        refined_box = torch.cat([qbox[..., :3] + delta_box[..., :3],
                                 qbox[..., 3:6] * torch.exp(delta_box[..., 3:6].clamp(-1.0, 1.0)),
                                 qbox[..., 6:7] + delta_box[..., 6:7]], dim=-1)
        refined_logit = qlogit + delta_logit
        return [Refined(refined_box[b, :len(boxes[b])], refined_logit[b, :len(boxes[b])],
                        has_context[b, :len(boxes[b])], qbox[b, :len(boxes[b])], len(received[b].boxes) > 0,
                        changed[b, :len(boxes[b])].bool())
                for b in range(B)]


def _wrap_half_turn(angle: torch.Tensor) -> torch.Tensor:
    """Angles into [-pi/2, pi/2): a footprint's heading difference up to a half turn."""
    return torch.remainder(angle + math.pi / 2, math.pi) - math.pi / 2


def anchor_loss(refined: list[Refined], gt_boxes: list[torch.Tensor], positive_iou: float, regress: bool = True,
                match_iou: float = 0.1, alpha: float = 0.25, gamma: float = 2.0) -> dict[str, torch.Tensor]:
    """Training loss of the refinement on the candidates of egos that received anything: focal loss on the score
    (positive: the refined box overlaps a ground-truth box by `positive_iou`), smooth L1 on the box
    correction towards the ground truth the candidate overlaps most (at least `match_iou`; with `regress`)."""
    cls_terms, reg_terms, positives = [], [], 0
    device = refined[0].logits.device if refined else torch.device("cpu")
    for r, gt in zip(refined, gt_boxes):
        if not r.received_any:
            continue
        ctx = torch.nonzero(r.changed).squeeze(1)
        if len(ctx) == 0:
            continue
        before = r.before[ctx].detach().cpu().double().numpy()
        after = r.boxes[ctx].detach().cpu().double().numpy()
        gt_np = gt.detach().cpu().double().numpy().reshape(-1, 7)
        label = torch.zeros(len(ctx), device=device)
        if len(gt_np):
            iou_before = rotated_iou_bev(before, gt_np)
            best = iou_before.argmax(axis=1)
            matched = iou_before[np.arange(len(ctx)), best] >= match_iou
            iou_after = rotated_iou_bev(after, gt_np).max(axis=1)
            label = torch.from_numpy((iou_after >= positive_iou).astype(np.float32)).to(device)
            if regress and matched.any():
                rows = torch.from_numpy(np.flatnonzero(matched)).to(device)
                target = gt.to(device, r.boxes.dtype)[torch.from_numpy(best[matched]).to(device)]
                pred = r.boxes[ctx[rows]]
                err = torch.cat([pred[:, :3] - target[:, :3],
                                 torch.log(pred[:, 3:6].clamp(min=0.1)) - torch.log(target[:, 3:6].clamp(min=0.1)),
                                 _wrap_half_turn(pred[:, 6:7] - target[:, 6:7])], dim=1)
                reg_terms.append(nn.functional.smooth_l1_loss(err, torch.zeros_like(err), reduction="none", beta=0.1)
                                 .sum(dim=1))
        logit = r.logits[ctx]
        p = torch.sigmoid(logit)
        ce = nn.functional.binary_cross_entropy_with_logits(logit, label, reduction="none")
        pt = p * label + (1 - p) * (1 - label)
        weight = (alpha * label + (1 - alpha) * (1 - label)) * (1 - pt).pow(gamma)
        cls_terms.append((weight * ce).sum())
        positives += int(label.sum())
    zero = torch.zeros((), device=device, requires_grad=True)
    norm = max(1, positives)
    cls = torch.stack(cls_terms).sum() / norm if cls_terms else zero
    reg = torch.cat(reg_terms).mean() if reg_terms else zero
    return {"anchor_cls": cls, "anchor_reg": reg, "anchor_total": cls + 2.0 * reg}

"""Anchor-centric cooperation (`cooperation.strategy: anchor`): senders send their most confident anchors
(boxes + coded anchor features, `comm/anchor_wire.py`) through the channel; the ego refines its own and
the received anchors (`fusion/anchor_centric.py`).

Every agent encodes its own view in its own frame, so the ego broadcasts nothing: a message states the
pose of its sender as its (noisy) localisation gives it, and the ego moves the boxes into its frame with
it. At evaluation the `AnchorSession` sends and receives them over the channel as every box message does
(`box_link.py`: newest arrived message per sender, optional velocities and motion compensation).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from coperception.comm.anchor_wire import AnchorMessage, decode_anchor_message
from coperception.config import ExperimentConfig
from coperception.datasets.collate import PreparedSample
from coperception.fusion.anchor_centric import MAX_LOGIT, AnchorFusion, ReceivedAnchors, Refined, transform_boxes_torch
from coperception.geometry import rotated_iou_bev, wrap_angle
from coperception.models.heads import HeadOutput
from coperception.models.postprocess import Detections, decode_detections, rotated_nms, top_anchors
from coperception.pipeline.box_link import BoxLink
from coperception.pipeline.session import FrameComm
from coperception.pipeline.strategies import STRATEGIES, CooperativeParts, Strategy, StrategyOutput, TrainOutput
from coperception.types import AgentBatch, AnchorSet

if TYPE_CHECKING:
    from coperception.pipeline.session import CommSession


@dataclass
class AnchorTerms:
    """What trains the refinement: each ego's refined candidates (the loss needs the ground truth)."""

    refined: list[Refined]


def _head_of(head: HeadOutput, rows: torch.Tensor) -> HeadOutput:
    return HeadOutput(head.cls[rows], head.reg[rows], head.direction[rows])


def _pose_noise(T: torch.Tensor, sigma_m: float, sigma_deg: float, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """T (4, 4) with a random planar error: x, y ~ N(0, sigma_m), yaw ~ N(0, sigma_deg)."""
    if sigma_m == 0 and sigma_deg == 0:
        return T
    draw = torch.randn(3, generator=generator).to(T.device, T.dtype)
    yaw = draw[2] * float(np.radians(sigma_deg))
    noise = torch.eye(4, dtype=T.dtype, device=T.device)
    noise[0, 0], noise[0, 1], noise[1, 0], noise[1, 1] = torch.cos(yaw), -torch.sin(yaw), torch.sin(yaw), torch.cos(yaw)
    noise[0, 3], noise[1, 3] = draw[0] * sigma_m, draw[1] * sigma_m
    return noise @ T


def refined_detections(refined: Refined, score_threshold: float, nms_threshold: float, merge_iou: float | None = None
                       ) -> Detections:
    """An ego's detections from its refined candidates: score threshold, then rotated NMS; with `merge_iou`,
    each kept box becomes the score-weighted mean of every candidate overlapping it by that much (itself
    included: several agents' boxes of one object average out their errors)."""
    scores = torch.sigmoid(refined.logits).detach().cpu().double().numpy()
    boxes = refined.boxes.detach().cpu().double().numpy()
    keep = np.flatnonzero(scores >= score_threshold)
    if len(keep) == 0:
        return Detections.empty()
    kept = keep[rotated_nms(boxes[keep], scores[keep], nms_threshold)]
    out = boxes[kept]
    if merge_iou is not None:
        out = merged_boxes(out, boxes[keep], scores[keep], merge_iou)
    return Detections(out, scores[kept], np.zeros(len(kept), dtype=np.int64))


def merged_boxes(kept: np.ndarray, candidates: np.ndarray, scores: np.ndarray, merge_iou: float) -> np.ndarray:
    """(K, 7) kept boxes -> each the score-weighted mean of the candidates (N, 7) overlapping it by at least
    `merge_iou` (BEV IoU): centre and size averaged; heading averaged as a footprint (doubled angles) and
    turned to the kept box's direction."""
    weights = (rotated_iou_bev(kept, candidates) >= merge_iou) * scores[None, :]  # (K, N); a kept box is a candidate
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    out = kept.copy()
    out[:, :6] = weights @ candidates[:, :6]
    doubled = weights @ np.column_stack([np.cos(2 * candidates[:, 6]), np.sin(2 * candidates[:, 6])])
    yaw = 0.5 * np.arctan2(doubled[:, 1], doubled[:, 0])
    flip = np.cos(yaw - kept[:, 6]) < 0  # the kept box's direction, not the footprint's other end
    out[:, 6] = wrap_angle(yaw + np.pi * flip)
    return out


def score_logits(scores: torch.Tensor) -> torch.Tensor:
    """Sent scores in [0, 1] -> logits, bounded by what a 1/255 quantization can say."""
    return torch.logit(scores.clamp(1 / 255, 1 - 1 / 255)).clamp(-MAX_LOGIT, MAX_LOGIT)


@STRATEGIES.register("anchor")
class AnchorCentric(Strategy):
    """Senders send anchors; the ego refines them with its own (see the module docstring)."""

    name, train_mode, infer_mode = "anchor", "all", "all"
    exchanges_anchors = True

    def forward(self, model: CooperativeParts, batch: AgentBatch) -> TrainOutput:
        """Training: each sender's anchors reach its ego directly, moved with its pose (plus the configured
        training pose noise) and coded through the straight-through codebook; the message age is the
        view's (delayed senders in training give it)."""
        fusion = model.anchor_fusion
        assert fusion is not None
        s = fusion.settings
        feats = model.encode(batch)
        head = model.head(feats)
        ego_rows = batch.ego_index.to(feats.device)
        starts = batch.ego_index.tolist()
        own, sent_feats, sent_meta = [], [], []
        for b, start in enumerate(starts):
            own.append(top_anchors(head, start, model.anchors, model.head.r, s.candidate_score, fusion.nms_threshold,
                                   s.ego_candidates))
            for k in range(1, batch.record_len[b]):
                view = start + k
                a = top_anchors(head, view, model.anchors, model.head.r, s.min_score, fusion.nms_threshold,
                                s.max_anchors)
                T = batch.T_ego_from_agent[view]
                if model.training:
                    T = _pose_noise(T, s.train_pose_noise_m, s.train_pose_noise_deg)
                sent_feats.append(feats[view].flatten(1)[:, a.cells].T)
                sent_meta.append((b, transform_boxes_torch(T, a.boxes), a.logits, float(batch.age[view]),
                                  int(batch.kind[view])))
        received_parts: list[list[ReceivedAnchors]] = [[] for _ in starts]
        commitment = None
        if sent_feats:
            vectors, _, commitment = fusion.code(torch.cat(sent_feats))
            for (b, boxes, logits, age, kind), part in zip(sent_meta, vectors.split([len(f) for f in sent_feats])):
                n = len(boxes)
                received_parts[b].append(ReceivedAnchors(boxes, score_logits(torch.sigmoid(logits)), part,
                                                         torch.full((n,), age, device=feats.device),
                                                         torch.full((n,), kind, dtype=torch.int64, device=feats.device)))
        received = [ReceivedAnchors.cat(p, s.feature_dim, feats.device) for p in received_parts]
        refined = fusion.refine(feats[ego_rows], model.feature_grid, own, received)
        return TrainOutput(_head_of(head, ego_rows), commitment, anchors=AnchorTerms(refined))

    def detect(self, model: CooperativeParts, batch: AgentBatch, prepared: list[PreparedSample], score_threshold: float,
               nms_threshold: float, session: "CommSession | AnchorSession | None" = None) -> StrategyOutput:
        if not isinstance(session, AnchorSession):
            raise ValueError("anchor-centric cooperation delivers its messages through an AnchorSession")
        fusion = model.anchor_fusion
        assert fusion is not None
        device = model.anchors.device
        all_feats = model.encode(batch)  # every view in its own frame, as each agent encodes it
        all_head = model.head(all_feats)
        detections, sizes, ages = [], [], []
        rejected: Counter[str] = Counter()
        for p, start, n in zip(prepared, batch.ego_index.tolist(), batch.record_len):
            rows = torch.arange(start, start + n, device=device)
            feats, head = all_feats[rows], _head_of(all_head, rows)
            own, received, stats = session.deliver(p, feats, head)
            if len(received.boxes) == 0:  # nothing arrived: the ego detects alone, exactly as ego-only
                detections.extend(decode_detections(_head_of(head, torch.zeros(1, dtype=torch.long, device=device)),
                                                    model.anchors, score_threshold, nms_threshold))
            else:
                refined = fusion.refine(feats[:1], model.feature_grid, [own], [received])[0]
                detections.append(refined_detections(refined, score_threshold, nms_threshold, fusion.settings.merge_iou))
            sizes.append(list(stats.delivered_bytes.values()))
            ages.append(list(stats.fused_ages.values()))
            rejected.update(stats.rejected)
        return StrategyOutput(detections, sizes, None, ages, dict(rejected))


@dataclass(kw_only=True)
class AnchorSession(BoxLink):
    """Anchor messages of a split's frames, in order, through the wire format and the channel."""

    fusion: AnchorFusion
    anchors: torch.Tensor  # the detector's anchors (A, 7)
    anchors_per_cell: int

    def __post_init__(self) -> None:
        super().__post_init__()
        self.digest = self.fusion.digest()

    def _decode(self, packet: bytes) -> AnchorMessage:
        s = self.fusion.settings
        return decode_anchor_message(packet, self.keys, self.keys is not None, self.digest, s.stages, self.fusion.bits)

    @torch.no_grad()
    def deliver(self, sample: PreparedSample, feats: torch.Tensor, head: HeadOutput
                ) -> tuple[AnchorSet, ReceivedAnchors, FrameComm]:
        """One frame: `feats` (n, C, H, W) and `head` of its views (ego first, each in its own frame) ->
        the ego's candidates, the anchors it holds from its senders (ego frame) and what it cost."""
        s = self.fusion.settings
        nms = self.fusion.nms_threshold
        scenario = sample.frame_key.split("/")[0]
        views = sample.agents
        own = top_anchors(head, 0, self.anchors, self.anchors_per_cell, s.candidate_score, nms, s.ego_candidates)
        delivered: dict[int, int] = {}
        for k, view in enumerate(views[1:], start=1):
            # every detection is tracked (a track survives an object's leaving the top anchors); the top are sent
            detected = top_anchors(head, k, self.anchors, self.anchors_per_cell, s.min_score, nms,
                                   s.max_anchors if self.motion is None else len(self.anchors))
            velocity = None
            if self.motion is not None:
                velocity = self.velocities(scenario, view, detected.boxes.cpu().double().numpy())[:s.max_anchors]
            sent = slice(0, s.max_anchors)
            _, codes, _ = self.fusion.code(feats[k].flatten(1)[:, detected.cells[sent]].T)
            msg = self.message(view, detected.boxes[sent].cpu().double().numpy(),
                               torch.sigmoid(detected.logits[sent]).cpu().double().numpy(), codes.cpu().numpy(),
                               self.fusion.bits, self.digest, velocity)
            delivered[view.sender] = self.send(scenario, view, msg)
        parts, ages = [], {}
        rejected: Counter[str] = Counter()
        device = feats.device
        for arrival in self.arrivals(scenario, views, self._decode, rejected):
            msg, n = arrival.message, len(arrival.boxes)
            ages[arrival.view.sender] = arrival.age
            if n == 0:
                continue
            parts.append(ReceivedAnchors(
                torch.from_numpy(arrival.boxes).to(device, torch.float32),
                score_logits(torch.from_numpy(msg.scores).to(device, torch.float32)),
                self.fusion.decode(torch.from_numpy(msg.codes).to(device)),
                torch.full((n,), arrival.age, device=device),
                torch.full((n,), arrival.view.kind, dtype=torch.int64, device=device)))
        received = ReceivedAnchors.cat(parts, s.feature_dim, device)
        return own, received, FrameComm(delivered, 0, ages, dict(rejected))


def anchor_session(model: CooperativeParts, cfg: ExperimentConfig) -> AnchorSession:
    assert model.anchor_fusion is not None
    return AnchorSession(cfg=cfg, fusion=model.anchor_fusion, anchors=model.anchors, anchors_per_cell=model.head.r)


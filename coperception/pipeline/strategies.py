"""Cooperation strategies: which views each agent encodes, what it sends and how the ego detects.

- `none`: the ego's own points only; nothing is sent.
- `early`: every agent's raw points, merged in the ego frame (at evaluation through the point wire format
  and the channel: an `EarlySession`).
- `late`: every agent detects alone and sends its boxes; the ego merges them by NMS.
- `intermediate`: BEV features selected and coded by the agent side, delivered (by the comm session
  at evaluation) and fused by the ego side.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, Sequence

import torch

from coperception.datasets.collate import AgentInput, InputMode, PreparedSample, views_batch
from coperception.grid import BEVGrid
from coperception.models.heads import AnchorHead, HeadOutput
from coperception.models.uncertainty import UncertaintyHead, as_sent
from coperception.models.postprocess import Detections, decode_detections
from coperception.pipeline.agent import AgentSide, drop_messages
from coperception.pipeline.ego import Delivery
from coperception.registry import Registry
from coperception.types import AgentBatch

from coperception.pipeline.early_exchange import EarlySession
from coperception.pipeline.late_exchange import LateSession

if TYPE_CHECKING:
    from coperception.fusion.anchor_centric import AnchorFusion
    from coperception.pipeline.anchor_exchange import AnchorSession, AnchorTerms
    from coperception.pipeline.session import CommSession, EncodedViews, FrameComm, HeldMessage


class CooperativeParts(Protocol):
    """What a strategy runs on (`pipeline.model.CooperativeModel` provides it)."""

    training: bool
    anchors: torch.Tensor
    agent: AgentSide | None
    message_dropout: float
    ego_loss: bool
    uncertainty: UncertaintyHead | None
    project_first: bool
    anchor_fusion: "AnchorFusion | None"
    feature_grid: BEVGrid
    head: AnchorHead

    def encode(self, batch: AgentBatch) -> torch.Tensor: ...

    def confidence(self, feats: torch.Tensor) -> torch.Tensor: ...

    def receive(self, delivery: Delivery) -> HeadOutput: ...


@dataclass
class TrainOutput:
    """The training forward: the head on what the ego detects from, plus training-only terms."""

    head: HeadOutput
    aux_loss: torch.Tensor | None = None  # e.g. the codebook commitment loss of the messages
    ego_alone: HeadOutput | None = None  # with `train.ego_loss_weight`: the head on the ego's own features
    uncertainty: "UncertaintyTerms | None" = None  # uncertainty-trust fusion: what trains the uncertainty head
    anchors: "AnchorTerms | None" = None  # anchor-centric cooperation: what trains the refinement


@dataclass
class UncertaintyTerms:
    """The uncertainty head's pass on views that share their sample's (ego) frame, the detector on the
    same views, and which sample's targets each view takes."""

    logits: torch.Tensor  # (n, R, H, W)
    log_var: torch.Tensor  # (n, R, 3, H, W)
    head: HeadOutput  # the detector on the same n views
    sample: torch.Tensor  # (n,) index of each view's sample


@dataclass
class StrategyOutput:
    detections: list[Detections]  # per sample, ego frame
    message_bytes: list[list[int]]  # per sample, per sending agent (ego excluded)
    broadcast_bytes: list[int] | None = None  # per sample, the ego's broadcast (pose, filling request)
    fused_ages: list[list[float]] | None = None  # per sample, age of each fused message (s)
    rejected: dict[str, int] | None = None  # messages the ego refused on arrival, by reason (whole batch)
    held: list[list["HeldMessage"]] | None = None  # per sample, the cell messages the ego fused

    @classmethod
    def of_frames(cls, detections: list[Detections], frames: "Sequence[FrameComm]", broadcast: bool = False
                  ) -> "StrategyOutput":
        """Per sample detections and what each frame's messages cost (`broadcast`: the ego broadcast and its
        cell messages are reported too)."""
        rejected: Counter[str] = Counter()
        for frame in frames:
            rejected.update(frame.rejected)
        return cls(detections, [list(f.delivered_bytes.values()) for f in frames],
                   [f.broadcast_bytes for f in frames] if broadcast else None,
                   [list(f.fused_ages.values()) for f in frames], dict(rejected),
                   [f.held for f in frames] if broadcast else None)


class Strategy:
    name: ClassVar[str]
    train_mode: ClassVar[InputMode]
    infer_mode: ClassVar[InputMode]
    sends_features: ClassVar[bool] = False  # intermediate: has an agent side and an ego side
    exchanges_anchors: ClassVar[bool] = False  # anchor-centric: senders send anchors, the ego refines them
    sends_boxes: ClassVar[bool] = False  # late: senders send their detections through the channel
    sends_points: ClassVar[bool] = False  # early: senders send their points through the channel

    def input_mode(self, training: bool, project_first: bool) -> InputMode:
        return self.train_mode if training else self.infer_mode

    def forward(self, model: CooperativeParts, batch: AgentBatch) -> TrainOutput:
        """The model's forward pass under this strategy (what training optimises): here, detect from
        each sample's first view (the ego's, or the merged cloud)."""
        feats = model.encode(batch)
        return TrainOutput(model.head(feats[batch.ego_index.to(feats.device)]))

    def detect(self, model: CooperativeParts, batch: AgentBatch, prepared: list[PreparedSample], score_threshold: float,
               nms_threshold: float, session: "CommSession | AnchorSession | None" = None) -> StrategyOutput:
        """Inference on a collated batch: detections per sample in the ego frame and the measured bytes
        each sender sent (`session`: what delivers intermediate messages)."""
        out = self.forward(model, batch).head
        return StrategyOutput(decode_detections(out, model.anchors, score_threshold, nms_threshold),
                              [[] for _ in prepared])


STRATEGIES: Registry[type[Strategy]] = Registry("cooperation.strategy")


@STRATEGIES.register("none")
class NoCooperation(Strategy):
    name, train_mode, infer_mode = "none", "ego", "ego"


@STRATEGIES.register("early")
class EarlyFusion(Strategy):
    """Trains on the merged cloud (the senders' points moved with their true poses); at inference every
    sender's points go through the channel (an `EarlySession`) and the ego detects from its own points and
    what arrived."""

    name, train_mode, infer_mode = "early", "merged", "merged"
    sends_points = True

    def detect(self, model: CooperativeParts, batch: AgentBatch, prepared: list[PreparedSample], score_threshold: float,
               nms_threshold: float, session: "CommSession | AnchorSession | LateSession | EarlySession | None" = None
               ) -> StrategyOutput:
        if not isinstance(session, EarlySession):
            raise ValueError("early fusion delivers its points through an EarlySession")
        views, frames = zip(*(session.deliver_points(p) for p in prepared))
        out = model.head(model.encode(views_batch([[v] for v in views]).to(model.anchors.device)))
        return StrategyOutput.of_frames(decode_detections(out, model.anchors, score_threshold, nms_threshold), frames)


@STRATEGIES.register("late")
class LateFusion(Strategy):
    """Trains as `none`; at inference every sender's detections go through the channel (a `LateSession`:
    boxes in its own frame with the pose its localisation gives it) and the ego merges them with its own."""

    name, train_mode, infer_mode = "late", "ego", "all"
    sends_boxes = True

    def detect(self, model: CooperativeParts, batch: AgentBatch, prepared: list[PreparedSample], score_threshold: float,
               nms_threshold: float, session: "CommSession | AnchorSession | LateSession | None" = None
               ) -> StrategyOutput:
        if not isinstance(session, LateSession):
            raise ValueError("late fusion delivers its boxes through a LateSession")
        per_view = decode_detections(model.head(model.encode(batch)), model.anchors, score_threshold, nms_threshold)
        detections, frames = zip(*(session.deliver_boxes(p, per_view[start:start + n], nms_threshold)
                                   for p, start, n in zip(prepared, batch.ego_index.tolist(), batch.record_len)))
        return StrategyOutput.of_frames(list(detections), frames)


@STRATEGIES.register("intermediate")
class IntermediateFusion(Strategy):
    """BEV features: agent side (select + code) -> delivery -> ego side (warp + fuse) -> head."""

    name, train_mode, infer_mode = "intermediate", "all", "all"
    sends_features = True

    def input_mode(self, training: bool, project_first: bool) -> InputMode:
        """Training projects with the ego's true pose; at inference the comm session projects each
        sender's points into the ego pose it received."""
        if not project_first:
            return "all"
        return "projected" if training else "senders_project"

    def forward(self, model: CooperativeParts, batch: AgentBatch) -> TrainOutput:
        """Training: messages reach the ego directly (optionally dropped), through the same ego side."""
        assert model.agent is not None
        feats = model.encode(batch)
        kept = drop_messages(batch, model.message_dropout, feats) if model.training and model.message_dropout > 0 else None
        alone = model.head(feats[batch.ego_index.to(feats.device)]) if model.training and model.ego_loss else None
        delivery, aux = model.agent.training_delivery(feats, batch, kept, model.confidence)
        terms = None
        if model.uncertainty is not None:
            own = feats.detach()  # the head learns beside the detector, not through it
            hidden = model.uncertainty.body(own)  # once: for what the senders send and for the head's training pass
            delivery.uncertainty = as_sent(model.uncertainty.estimate(own, hidden.detach()))
            # views in their sample's frame (all of them when senders project first) train the head on its targets
            views = torch.arange(len(feats), device=feats.device) if model.project_first else \
                batch.ego_index.to(feats.device)
            logits, log_var = model.uncertainty.one_pass(hidden[views])
            terms = UncertaintyTerms(logits, log_var, model.head(own[views]),
                                     batch.sample_of_view().to(feats.device)[views])
        return TrainOutput(model.receive(delivery), aux, alone, terms)

    def detect(self, model: CooperativeParts, batch: AgentBatch, prepared: list[PreparedSample], score_threshold: float,
               nms_threshold: float, session: "CommSession | AnchorSession | None" = None) -> StrategyOutput:
        if session is None:
            raise ValueError("intermediate cooperation delivers its messages through a CommSession")
        device = model.anchors.device

        def encode(views: list[AgentInput]) -> "torch.Tensor | EncodedViews":  # an exported model also gives confidence, codes
            return model.encode(views_batch([views]).to(device))

        # sample by sample: the ego encodes and broadcasts first, each sender encodes what it made of
        # the broadcast it received (a projection into that ego pose) — `batch` holds the unprojected views
        deliveries, frames = zip(*(session.deliver(p, encode) for p in prepared))
        out = model.receive(Delivery.cat(list(deliveries)))
        return StrategyOutput.of_frames(decode_detections(out, model.anchors, score_threshold, nms_threshold), frames,
                                        broadcast=True)

"""Cooperation methods: which views are encoded, what is sent (measured in bytes), how the ego detects.

One registry for every method; feature fusions (max, mean, ...) plug in through
`fusion.base.FUSIONS`, message kinds of their own (points, boxes) are handled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from coperception.comm.payload import serialize_boxes, serialize_features, serialize_points
from coperception.datasets.collate import AgentBatch, InputMode, PreparedSample
from coperception.errors import ConfigError
from coperception.geometry import transform_boxes
from coperception.models.detector import PointPillars
from coperception.models.postprocess import Detections, decode_detections, rotated_nms

if TYPE_CHECKING:
    from coperception.comm.pipeline import CommSession

MessageKind = Literal["none", "points", "boxes", "features", "sparse_features", "codes"]


@dataclass(frozen=True)
class Method:
    name: str
    train_mode: InputMode
    infer_mode: InputMode
    feature_fusion: str | None
    message: MessageKind
    description: str

    @property
    def sparse(self) -> bool:
        """Selected cells only, sent through the wire format and the channel."""
        return self.message in ("sparse_features", "codes")


METHODS: dict[str, Method] = {
    "none": Method("none", "ego", "ego", None, "none", "ego only, nothing sent"),
    "early": Method("early", "merged", "merged", None, "points", "raw points of every agent, fused in the ego frame"),
    "late": Method("late", "ego", "all", None, "boxes", "each agent's boxes + scores, merged by NMS"),
    "max": Method("max", "all", "all", "max", "features", "dense fp32 BEV features, element-wise max"),
    "mean": Method("mean", "all", "all", "mean", "features", "dense fp32 BEV features, mean of valid cells"),
    "where2comm": Method("where2comm", "all", "all", "max", "sparse_features",
                         "confidence-selected cells as fp32 features (Where2comm-style), max fusion"),
    "codebook": Method("codebook", "all", "all", "max", "codes",
                       "confidence-selected cells as residual-codebook codes, max fusion"),
}


def input_mode(method: Method, project_first: bool, training: bool) -> InputMode:
    """The views `method` encodes: feature fusions use `projected` views when `project_first`."""
    mode = method.train_mode if training else method.infer_mode
    return "projected" if mode == "all" and method.feature_fusion and project_first else mode


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"fusion.method {name!r} unknown; known: {', '.join(METHODS)}")
    return METHODS[name]


@dataclass
class MethodOutput:
    detections: list[Detections]  # per sample, ego frame
    message_bytes: list[list[int]]  # per sample, per sending agent (ego excluded)
    request_bytes: list[int] | None = None  # per sample, the ego's broadcast (information filling)
    fused_ages: list[list[float]] | None = None  # per sample, age of each fused message (s)


@torch.no_grad()
def detect(model: PointPillars, method: Method, batch: AgentBatch, prepared: list[PreparedSample], score_threshold: float,
           nms_threshold: float, session: "CommSession | None" = None) -> MethodOutput:
    """Run `method` on a collated batch built with `method.infer_mode`. Sparse methods need the
    `session` that carries their messages through the wire format and the channel."""
    if method.sparse:
        if session is None:
            raise ValueError(f"method {method.name} sends packets and needs a CommSession")
        feats = model.encode(batch)
        detections, sizes, requests, ages = [], [], [], []
        start = 0
        for p in prepared:
            n = len(p.agents)
            out, stats = session.run(feats[start : start + n], p)
            detections += decode_detections(out, model.anchors, score_threshold, nms_threshold)
            sizes.append(list(stats.delivered_bytes.values()))
            requests.append(stats.request_bytes)
            ages.append(list(stats.fused_ages.values()))
            start += n
        return MethodOutput(detections, sizes, requests, ages)
    if method.message == "boxes":
        out = model.forward_each_view(batch)
        per_view = decode_detections(out, model.anchors, score_threshold, nms_threshold)
        detections, sizes = [], []
        start = 0
        for p in prepared:
            views = p.agents
            boxes, scores, sent = [], [], []
            for k, view in enumerate(views):
                d = per_view[start + k]
                ego_boxes = transform_boxes(view.T_ego_from_frame, d.boxes) if len(d.boxes) else d.boxes.reshape(0, 7)
                boxes.append(ego_boxes)
                scores.append(d.scores)
                if k > 0:  # the sender transmits boxes in its own frame with its pose
                    sent.append(len(serialize_boxes(d.boxes, d.scores, view.sender, view.capture_time, view.T_ego_from_frame)))
            all_boxes, all_scores = np.concatenate(boxes), np.concatenate(scores)
            keep = rotated_nms(all_boxes, all_scores, nms_threshold)
            detections.append(Detections(all_boxes[keep], all_scores[keep], np.zeros(len(keep), dtype=np.int64)))
            sizes.append(sent)
            start += len(views)
        return MethodOutput(detections, sizes)
    if method.message == "features":
        feats = model.encode(batch)
        out = model.head(model.fuse(feats, batch))
        detections = decode_detections(out, model.anchors, score_threshold, nms_threshold)
        sizes, start = [], 0
        for p in prepared:
            sent = [len(serialize_features(feats[start + k].numpy(), view.sender, view.capture_time, view.T_ego_from_frame))
                    for k, view in enumerate(p.agents) if k > 0]
            sizes.append(sent)
            start += len(p.agents)
        return MethodOutput(detections, sizes)
    out = model(batch)
    detections = decode_detections(out, model.anchors, score_threshold, nms_threshold)
    sizes = [[len(serialize_points(points, sender, t, T)) for (sender, t, T, points) in p.sent_points]
             for p in prepared] if method.message == "points" else [[] for _ in prepared]
    return MethodOutput(detections, sizes)

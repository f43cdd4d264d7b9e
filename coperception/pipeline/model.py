"""The cooperative model a config describes: encoders per agent kind, the shared head, and for
intermediate cooperation the agent side (selection + codec) and the ego side (warp + fusion).
Also the model factory, checkpoint loading and the config check against every registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from coperception.checkpoint import check_architecture, load_checkpoint, load_state_strict
from coperception.device import resolve_device
from coperception.comm.codebook import ResidualVQ
from coperception.comm.codecs import CODECS
from coperception.config import BASELINE_STRATEGIES, ExperimentConfig
from coperception.errors import ConfigError
from coperception.fusion.anchor_centric import AnchorFusion
from coperception.fusion.base import FUSIONS, build_fusion, fusion_settings
from coperception.models.anchors import make_anchors
from coperception.models.encoders import ENCODERS, KIND_NAMES, EncoderSet, encoder_parts
from coperception.models.heads import AnchorHead, HeadOutput
from coperception.models.postprocess import decode_detections
from coperception.models.targets import AnchorAssigner
from coperception.models.uncertainty import UncertaintyHead, as_sent
from coperception.pipeline import anchor_exchange  # noqa: F401  (registers the `anchor` strategy)
from coperception.pipeline.agent import AgentSide
from coperception.pipeline.ego import Delivery, EgoSide
from coperception.pipeline.strategies import STRATEGIES, Strategy, TrainOutput
from coperception.types import AgentBatch, AnchorTargets


FUSION_PREFIX = "ego.fusion."  # the names of the feature fusion's own weights in the model's state


class CooperativeModel(nn.Module):
    """Everything a config's cooperation runs: `encoders`, the shared `head`, and for intermediate
    cooperation `agent` (selection + codec) and `ego` (warp + fusion). `forward` is the training pass
    of the strategy; inference goes through `strategy.detect`."""

    def __init__(self, cfg: ExperimentConfig):
        super().__init__()
        validate_config(cfg)
        self.strategy: Strategy = STRATEGIES.get(cfg.cooperation.strategy)()
        # modules are built in this order (encoders, fusion, head, codec) because it is the order their
        # parameters draw from the seeded generator: the same seed gives the same network
        self.encoders = EncoderSet(cfg.model, cfg.dataset)
        self.feature_grid, channels = self.encoders.grid, self.encoders.out_channels
        yaws = np.radians(cfg.model.anchor_yaws_deg)
        self.anchors_np = make_anchors(self.feature_grid, cfg.model.anchor_size, cfg.model.anchor_z, yaws)
        self.register_buffer("anchors", torch.from_numpy(self.anchors_np.reshape(-1, 7)), persistent=False)
        # what the data pipeline needs for training targets (small and picklable: workers get it, not the model)
        self.assigner = AnchorAssigner(self.anchors_np, cfg.model.pos_iou, cfg.model.neg_iou)
        self.ego: EgoSide | None = None
        self.agent: AgentSide | None = None
        if self.strategy.sends_features:
            self.ego = EgoSide(build_fusion(cfg.fusion.method, channels, cfg.fusion.options), self.feature_grid,
                               cfg.fusion.motion)
        self.head = AnchorHead(channels, len(yaws))
        if self.strategy.sends_features:
            codec = CODECS.get(cfg.comm.codec)(channels, cfg.comm.codebook)
            self.agent = AgentSide(codec, cfg.comm.selection, self.feature_grid)
        # a fusion that weighs messages by their senders' uncertainty: each agent's uncertainty head
        self.uncertainty: UncertaintyHead | None = None
        if self.ego is not None and self.ego.fusion.needs_uncertainty:
            s = self.ego.fusion.settings
            self.uncertainty = UncertaintyHead(channels, len(yaws), dropout=s.dropout, passes=s.passes)  # type: ignore[attr-defined]
        # anchor-centric cooperation: the senders' anchor coder and the ego's refinement
        self.anchor_fusion: AnchorFusion | None = None
        if self.strategy.exchanges_anchors:
            a = cfg.fusion.anchor
            self.anchor_fusion = AnchorFusion(channels, a, cfg.eval.nms_threshold,
                                              ResidualVQ(a.feature_dim, segments=1, stages=a.stages, codes=a.codes))
        self.message_dropout = cfg.train.message_dropout  # training only
        self.ego_loss = cfg.train.ego_loss_weight > 0  # training only: also detect from the ego's own features
        self.project_first = cfg.cooperation.project_first

    def encode(self, batch: AgentBatch) -> torch.Tensor:
        """Per-view BEV features (N_total, C, H, W), each in its own frame."""
        return self.encoders(batch)

    @torch.no_grad()
    def confidence(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, H, W) each view's confidence map from its own head (what its selection ranks)."""
        return self.head.confidence_map(feats)

    @torch.no_grad()
    def sent_uncertainty(self, feats: torch.Tensor) -> torch.Tensor | None:
        """(N, 2, H, W) each view's per-cell uncertainty as its message carries it (one byte each), or
        None when the fusion does not use any."""
        return None if self.uncertainty is None else as_sent(self.uncertainty.estimate(feats))

    @torch.no_grad()
    def boxes(self, feats: torch.Tensor, score_threshold: float, nms_threshold: float) -> list[np.ndarray]:
        """(n, C, H, W) views -> each one's detected boxes (K, 7) in its own frame (what a sender knows of
        its own scene, e.g. to estimate motion)."""
        return [d.boxes for d in decode_detections(self.head(feats), self.anchors, score_threshold, nms_threshold)]

    def receive(self, delivery: Delivery) -> HeadOutput:
        """Ego side: warp what arrived, fuse, detect."""
        assert self.ego is not None
        return self.head(self.ego(delivery, self.head.confidence_map))

    def targets(self, gt_boxes: np.ndarray) -> AnchorTargets:
        """Training targets of this model's anchors for ground-truth boxes in the ego frame."""
        return self.assigner(gt_boxes)

    @torch.no_grad()
    def message_vectors(self, batch: AgentBatch) -> torch.Tensor:
        """(K, C) features of the cells the senders of `batch` would transmit (what a codebook codes)."""
        assert self.agent is not None
        feats = self.encode(batch)
        n_idx, y_idx, x_idx = self.agent.sent_cells(self.confidence(feats), batch)
        return feats[n_idx, :, y_idx, x_idx]

    def forward(self, batch: AgentBatch) -> TrainOutput:
        """Training forward of the configured cooperation strategy, plus the encoders' own training terms."""
        self.encoders.take_training_loss()  # what passes outside a training step left (codebook fitting) is not this step's
        out = self.strategy.forward(self, batch)
        encoder_loss = self.encoders.take_training_loss()
        if encoder_loss is not None:
            out.aux_loss = encoder_loss if out.aux_loss is None else out.aux_loss + encoder_loss
        return out

    def trainable_when_frozen(self) -> list[tuple[str, nn.Module]]:
        """With `train.freeze_detector`: the weights that still train, as (prefix, module) pairs: the codebook
        of codebook messages and a feature fusion's own weights (attention, trust network), or the
        anchor-centric coder and refinement. Everything the senders compute before coding (encoder, head,
        selection, uncertainty head) stays as it was, so their messages select the same cells."""
        if self.anchor_fusion is not None:
            return [("anchor_fusion.", self.anchor_fusion)]
        parts: list[tuple[str, nn.Module]] = []
        if self.agent is not None and hasattr(self.agent.codec, "quantizer"):
            parts.append(("agent.codec.", self.agent.codec))
        if self.ego is not None and any(True for _ in self.ego.fusion.parameters()):
            parts.append((FUSION_PREFIX, self.ego.fusion))
        if not parts:
            raise ConfigError("train.freeze_detector: only a codebook codec, a fusion with weights or anchor-centric "
                              "cooperation has anything left to train")
        return parts


def validate_config(cfg: ExperimentConfig) -> None:
    """Every registry name in `cfg` exists (the error lists the known ones) and the sections fit together."""
    strategy = STRATEGIES.get(cfg.cooperation.strategy)
    for name in cfg.model.encoders.values():
        for part in encoder_parts(name):
            ENCODERS.get(part)
    for kind in KIND_NAMES:
        name = cfg.model.encoders.get(kind, cfg.model.encoders["default"])
        carried = cfg.dataset.sensors_of(kind)
        for part in encoder_parts(name):
            needed = [SENSOR_OF_INPUT[i] for i in ENCODERS.get(part).inputs]
            if any(sensor not in carried for sensor in needed):
                raise ConfigError(f"model.encoders gives {kind} agents {part!r}, which reads {needed}, but "
                                  f"dataset.sensors gives them {carried}")
    if strategy.sends_features:
        CODECS.get(cfg.comm.codec)
        fusion_settings(cfg.fusion.method, cfg.fusion.options)
    for name in cfg.demo.fusion_methods:
        if name not in BASELINE_STRATEGIES and name not in FUSIONS:
            raise ConfigError(f"demo.fusion_methods: {name!r} is neither `early` nor a fusion; known fusions: "
                              f"{', '.join(FUSIONS)}")


SENSOR_OF_INPUT = {"lidar": "lidar", "cameras": "camera"}  # AgentBatch input -> the sensor (dataset.sensors) it comes from


def uses_cameras(cfg: ExperimentConfig) -> bool:
    """Whether some agent kind's encoder reads camera images."""
    return any("cameras" in ENCODERS.get(part).inputs for name in cfg.model.encoders.values()
               for part in encoder_parts(name))


def method_label(cfg: ExperimentConfig) -> str:
    """A short name of the cooperation a config runs, for reports: `none`, `early`, `late`, the fusion
    name for dense features (`max`), else `<codec>-<fusion>` (`sparse-max`, `codebook-max`)."""
    strategy = cfg.cooperation.strategy
    if STRATEGIES.get(strategy).exchanges_anchors:
        return "anchor-centric"
    if not STRATEGIES.get(strategy).sends_features:
        return strategy
    return cfg.fusion.method if cfg.comm.codec == "dense" else f"{cfg.comm.codec}-{cfg.fusion.method}"


# the anchor settings that shape weights (the others only say how they are used)
ANCHOR_WEIGHT_KEYS = ("feature_dim", "stages", "codes", "layers", "hidden", "heads")
# model-section keys that say how many pillars the data pipeline keeps, not which weights there are
PIPELINE_ONLY_KEYS = frozenset({"max_voxels", "max_voxels_test", "voxelizer"})
CAMERA_TRAINING_KEYS = frozenset({"depth_loss_weight"})  # model.camera keys that shape no weight


def architecture(cfg: ExperimentConfig) -> dict[str, Any]:
    """What must match between a checkpoint and the model that loads it."""
    unused: dict[str, Any] = {key: True for key in PIPELINE_ONLY_KEYS}
    unused["camera"] = {key: True for key in CAMERA_TRAINING_KEYS} if uses_cameras(cfg) else True
    arch: dict[str, Any] = {"model": cfg.model.model_dump(mode="json", exclude=unused),
                            "point_cloud_range": list(cfg.dataset.point_cloud_range), "fusion": None}
    if STRATEGIES.get(cfg.cooperation.strategy).sends_features:
        arch["fusion"] = {"method": cfg.fusion.method, "options": cfg.fusion.options}
        if cfg.comm.codec == "codebook":
            cb = cfg.comm.codebook
            arch["codebook"] = {"segments": cb.segments, "stages": cb.stages, "codes": cb.codes}
    if STRATEGIES.get(cfg.cooperation.strategy).exchanges_anchors:
        a = cfg.fusion.anchor
        arch["fusion"] = {"method": "anchor", "options": {k: getattr(a, k) for k in ANCHOR_WEIGHT_KEYS}}
    return arch


def saved_architecture(arch: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored architecture, comparable with `architecture` (older checkpoints stored the
    voxel cap in it)."""
    arch = dict(arch)
    if isinstance(arch.get("model"), dict):
        arch["model"] = {k: v for k, v in arch["model"].items() if k not in PIPELINE_ONLY_KEYS}
        if isinstance(arch["model"].get("camera"), dict):
            arch["model"]["camera"] = {k: v for k, v in arch["model"]["camera"].items() if k not in CAMERA_TRAINING_KEYS}
    return arch


FRESH_PREFIXES = ("ego.fusion.", "agent.codec.", "uncertainty.", "anchor_fusion.")  # what a fine-tuning may add to the model it starts from


def build_model(cfg: ExperimentConfig) -> CooperativeModel:
    return CooperativeModel(cfg)


def init_weights(model: CooperativeModel, checkpoint: str | Path, cfg: ExperimentConfig) -> list[str]:
    """Copy every weight from `checkpoint` (same model section, any cooperation); strict on names and
    shapes except that a fusion module or codec the checkpoint lacks starts fresh: their names are
    returned."""
    data = load_checkpoint(checkpoint)
    saved, expected = saved_architecture(data["arch"]), architecture(cfg)
    for key in ("fusion", "codebook"):
        saved.pop(key, None)
        expected.pop(key, None)
    check_architecture(checkpoint, saved, expected)
    return load_state_strict(checkpoint, model, data["model"], fresh_prefixes=FRESH_PREFIXES)


def load_model(checkpoint: str | Path, cfg: ExperimentConfig, device: str | torch.device | None = None) -> CooperativeModel:
    """A model for `cfg` with the checkpoint's weights (architecture checked, strict), in eval mode, on
    `device` (default: `cfg.train.device`)."""
    device = resolve_device(cfg.train.device) if device is None else device
    data = load_checkpoint(checkpoint)
    check_architecture(checkpoint, saved_architecture(data["arch"]), architecture(cfg))
    model = build_model(cfg)
    load_state_strict(checkpoint, model, data["model"])
    return model.to(device).eval()


def fit_codebook(model: CooperativeModel, batches, progress: bool = False, iterations: int = 25,
                 generator: torch.Generator | None = None) -> float | None:
    """Fit the model's codebook by k-means on the message cells of `batches` (AgentBatch iterable);
    returns the relative error, None when they select no cell at all."""
    assert model.agent is not None
    quantizer = model.agent.codec.quantizer  # type: ignore[union-attr]
    was_training = model.training
    model.eval()
    device = quantizer.codebook.device
    vectors = [model.message_vectors(batch.to(device))
               for batch in tqdm(batches, desc="codebook k-means data", disable=not progress)]
    model.train(was_training)
    x = torch.cat(vectors) if vectors else torch.zeros(0, quantizer.channels, device=device)
    if len(x) == 0:  # e.g. an untrained detector is confident nowhere: the first batch seeds the codes instead
        return None
    return quantizer.fit(x, iterations, generator)

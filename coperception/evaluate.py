"""Evaluation of cooperation methods: AP (both protocols), measured bytes, time per stage."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from coperception.config import ExperimentConfig
from coperception.datasets.collate import collate
from coperception.datasets.cooperative import CooperativeDataset
from coperception.datasets.prepared import PreparedDataset
from coperception.datasets.readers import build_dataset
from coperception.device import synchronize
from coperception.eval.ap import PROTOCOL, APAccumulator
from coperception.pipeline.anchor_exchange import anchor_session
from coperception.pipeline.attacks import GhostAttack
from coperception.pipeline.early_exchange import EarlySession
from coperception.pipeline.late_exchange import LateSession
from coperception.pipeline.model import CooperativeModel, method_label
from coperception.pipeline.session import CommSession, HeldMessage
from coperception.errors import ConfigError, DataFormatError
from coperception.grid import BEVGrid
from coperception.io import read_json, write_json
from coperception.models.postprocess import Detections


EVAL_SEED = 0  # what an evaluation's random draws start from (see `evaluate_method`)


@dataclass
class FramePrediction:
    """One evaluated frame: the ego's detections and the cell messages it fused."""

    frame_key: str
    detections: Detections
    held: list[HeldMessage] = field(default_factory=list)


def evaluate_method(model: CooperativeModel, cfg: ExperimentConfig, split: str, progress: bool = True,
                    limit: int | None = None, keep_detections: bool = False,
                    dataset: CooperativeDataset | None = None, attack: GhostAttack | None = None) -> dict[str, Any]:
    """One method entry of the report shape of DESIGN §5 (plus `frames`) for the cooperation of `model`
    (built from `cfg`, whose comm section also gives the channel); `dataset` replaces the reader for
    `split` (e.g. samples already in memory); `attack` makes one sender lie (intermediate cooperation)."""
    strategy = model.strategy
    label = method_label(cfg)
    inner = dataset if dataset is not None else build_dataset(cfg.dataset, split)
    data = PreparedDataset(inner, cfg.dataset, cfg.model, strategy.input_mode(False, cfg.cooperation.project_first))
    indices = list(range(len(data)))[: limit or None]
    loader = DataLoader(torch.utils.data.Subset(data, indices), batch_size=1, collate_fn=collate,
                        num_workers=cfg.train.num_workers)
    acc = APAccumulator(cfg.dataset.eval_range, tuple(cfg.eval.iou_thresholds), gt_range=cfg.dataset.gt_range())
    was_training = model.training
    model.eval()
    session: Any = None
    exchanges_anchors = getattr(model, "anchor_fusion", None) is not None
    if model.agent is not None:
        # what senders compute beside their features: uncertainty (a fusion that weighs by it), their own
        # boxes (motion compensation); an exported model has neither
        uncertainty = model.sent_uncertainty if getattr(model, "uncertainty", None) is not None else None
        boxes = partial(model.boxes, score_threshold=cfg.eval.score_threshold,
                        nms_threshold=cfg.eval.nms_threshold) if hasattr(model, "boxes") else None
        session = CommSession.for_config(model.agent, model.confidence, cfg, attack, uncertainty, boxes)
    elif exchanges_anchors:
        if attack is not None:
            raise ConfigError("the ghost attack forges cell messages; anchor-centric cooperation sends anchors")
        session = anchor_session(model, cfg)
    elif strategy.sends_boxes:
        if attack is not None:
            raise ConfigError("the ghost attack forges cell messages; late fusion sends boxes")
        session = LateSession(cfg=cfg)
    elif strategy.sends_points:
        if attack is not None:
            raise ConfigError("the ghost attack forges cell messages; early fusion sends points")
        session = EarlySession(cfg=cfg)
    # messages that go through the channel: ages and refusals are reported
    sparse = (model.agent is not None and model.agent.codec.sparse) or exchanges_anchors or strategy.sends_boxes \
        or strategy.sends_points
    sent_per_frame, sent_per_agent, broadcast_bytes, fused_ages = [], [], [], []
    rejected: Counter[str] = Counter()
    model_ms = []
    load_ms = []
    kept = []
    t_load = time.perf_counter()
    device = next(model.parameters()).device
    # random draws of the forward (MC-dropout passes of uncertainty-trust senders) from a fixed seed: the
    # same checkpoint evaluates to the same AP every time, and the caller's random state is left as it was
    with torch.random.fork_rng(devices=range(torch.cuda.device_count() if torch.cuda.is_available() else 0)):
        torch.manual_seed(EVAL_SEED)
        for batch, _, prepared in tqdm(loader, desc=f"eval {label}", disable=not progress):
            load_ms.append((time.perf_counter() - t_load) * 1e3)
            t0 = time.perf_counter()
            with torch.no_grad():  # inference: no autograd graph of the forward
                out = strategy.detect(model, batch.to(device), prepared, cfg.eval.score_threshold,
                                      cfg.eval.nms_threshold, session)
            synchronize(device)
            model_ms.append((time.perf_counter() - t0) * 1e3)
            rejected.update(out.rejected or {})
            for i, (p, dets, sizes) in enumerate(zip(prepared, out.detections, out.message_bytes)):
                acc.add(dets.boxes, dets.scores, p.gt_boxes)
                broadcast = out.broadcast_bytes[i] if out.broadcast_bytes else 0
                sent_per_frame.append(sum(sizes) + broadcast)
                sent_per_agent.extend(sizes)
                broadcast_bytes.append(broadcast)
                if out.fused_ages:
                    fused_ages.extend(out.fused_ages[i])
                if keep_detections:
                    kept.append(FramePrediction(p.frame_key, dets, out.held[i] if out.held else []))
            t_load = time.perf_counter()
    if was_training:
        model.train()
    entry: dict[str, Any] = {
        "ap": acc.result(global_sort=True),
        "ap_opencood": acc.result(global_sort=False),
        "bytes_per_agent_frame": float(np.mean(sent_per_agent)) if sent_per_agent else 0.0,
        "bytes_per_frame": float(np.mean(sent_per_frame)) if sent_per_frame else 0.0,
        "log2_bytes_per_frame": float(np.log2(np.mean(sent_per_frame))) if sent_per_frame and np.mean(sent_per_frame) > 0 else None,
        "ms": {"load_and_voxelize": float(np.mean(load_ms)) if load_ms else 0.0,
               "detect_and_serialize": float(np.mean(model_ms)) if model_ms else 0.0},
        "params": {"method": label, **_cooperation_params(cfg)},
        "frames": len(indices),
    }
    if session is not None:  # the ego's pose (and filling request) broadcast, part of bytes_per_frame
        entry["broadcast_bytes_per_frame"] = float(np.mean(broadcast_bytes)) if broadcast_bytes else 0.0
    if sparse:
        entry["mean_fused_age_s"] = float(np.mean(fused_ages)) if fused_ages else None
        entry["rejected_messages"] = dict(rejected)  # refused on arrival (malformed, unauthenticated, foreign codebook)
    if keep_detections:
        entry["_detections"] = kept
    return entry


def save_predictions(path: str | Path, entry: dict[str, Any], grid: BEVGrid | None) -> None:
    """The frames an `evaluate_method(..., keep_detections=True)` entry kept, as JSON: per frame the
    boxes (x, y, z, l, w, h, yaw in the ego frame), scores and the cells each fused message brought."""
    frames = [{"frame": f.frame_key, "boxes": np.round(f.detections.boxes, 4).tolist(),
               "scores": np.round(f.detections.scores, 5).tolist(),
               "messages": [{"sender": int(h.sender), "cells": h.cells.astype(int).tolist(),
                             "T_ego_from_frame": np.round(h.T_ego_from_frame, 6).tolist(), "bytes": int(h.bytes),
                             "age_s": float(h.age_s)} for h in f.held]}
              for f in entry["_detections"]]
    write_json(path, {"method": entry["params"]["method"], "grid": None if grid is None else asdict(grid),
                      "frames": frames})


def load_predictions(path: str | Path) -> tuple[str, BEVGrid | None, dict[str, FramePrediction]]:
    """What `save_predictions` wrote: (method, feature grid, {frame key: prediction})."""
    data = read_json(path)
    try:
        grid = BEVGrid(**data["grid"]) if data.get("grid") else None
        frames = {}
        for f in data["frames"]:
            boxes = np.asarray(f["boxes"], dtype=np.float64).reshape(-1, 7)
            scores = np.asarray(f["scores"], dtype=np.float64).reshape(-1)
            held = [HeldMessage(int(m["sender"]), np.asarray(m["cells"], dtype=np.int64),
                                np.asarray(m["T_ego_from_frame"], dtype=np.float64).reshape(4, 4), int(m["bytes"]),
                                float(m["age_s"])) for m in f["messages"]]
            frames[f["frame"]] = FramePrediction(f["frame"], Detections(boxes, scores, np.zeros(len(boxes), np.int64)), held)
        return str(data["method"]), grid, frames
    except (KeyError, TypeError, ValueError) as exc:
        raise DataFormatError(path, f"not a predictions file of `coperception eval --save-predictions` ({exc!r})") from None


def _cooperation_params(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config sections that define the evaluated cooperation (comm settings only where they apply)."""
    params: dict[str, Any] = {"strategy": cfg.cooperation.strategy}
    if cfg.cooperation.strategy != "intermediate":
        return params
    params.update(codec=cfg.comm.codec, fusion=cfg.fusion.model_dump(mode="json"),
                  project_first=cfg.cooperation.project_first)
    if cfg.comm.codec != "dense":
        params.update(selection=cfg.comm.selection.model_dump(mode="json"), channel=cfg.comm.channel.model_dump(mode="json"),
                      consistency=cfg.comm.consistency.model_dump(mode="json"))
    if cfg.comm.codec == "codebook":
        params["codebook"] = cfg.comm.codebook.model_dump(mode="json")
    return params


def report(entries: dict[str, dict[str, Any]], dataset: str, split: str) -> dict[str, Any]:
    frames = next(iter(entries.values()))["frames"] if entries else 0
    methods = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_") and kk != "frames"} for k, v in entries.items()}
    return {"protocol": PROTOCOL + "; communication volume = measured bytes of the serialized messages the ego receives",
            "dataset": dataset, "split": split, "frames": frames, "methods": methods}


def format_table(rep: dict[str, Any]) -> str:
    lines = [f"{'method':<10} {'AP@0.3':>7} {'AP@0.5':>7} {'AP@0.7':>7} | {'oc@0.3':>7} {'oc@0.5':>7} {'oc@0.7':>7} | "
             f"{'bytes/frame':>12}",
             "-" * 86]
    for name, m in rep["methods"].items():
        a, o = m["ap"], m["ap_opencood"]
        lines.append(f"{name:<10} {a['0.3']:7.3f} {a['0.5']:7.3f} {a['0.7']:7.3f} | {o['0.3']:7.3f} {o['0.5']:7.3f} "
                     f"{o['0.7']:7.3f} | {m['bytes_per_frame']:12.0f}")
    lines.append("AP: global sort (HEAL/CoAlign); oc: OpenCOOD per-frame sort, for comparison only. Bytes are measured.")
    return "\n".join(lines)

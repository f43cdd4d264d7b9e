"""Evaluation of cooperation methods: AP (both protocols), measured bytes, time per stage."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from coperception.config import ExperimentConfig
from coperception.datasets.collate import collate
from coperception.datasets.cooperative import CooperativeDataset, build_dataset
from coperception.eval.ap import PROTOCOL, APAccumulator
from coperception.fusion.methods import detect, get_method, input_mode
from coperception.models.detector import PointPillars


def evaluate_method(model: PointPillars, cfg: ExperimentConfig, split: str, method_name: str, progress: bool = True,
                    limit: int | None = None, keep_detections: bool = False,
                    dataset: CooperativeDataset | None = None) -> dict[str, Any]:
    """One method entry of the report shape of DESIGN §5 (plus `frames`); `dataset` replaces the
    reader for `split` (e.g. samples already in memory)."""
    from coperception.train import PreparedDataset  # shares the input preparation with training

    method = get_method(method_name)
    inner = dataset if dataset is not None else build_dataset(cfg.dataset, split)
    data = PreparedDataset(inner, cfg, input_mode(method, cfg.fusion.project_first, training=False), None, augment=False)
    indices = list(range(len(data)))[: limit or None]
    loader = DataLoader(torch.utils.data.Subset(data, indices), batch_size=1, collate_fn=collate,
                        num_workers=cfg.train.num_workers)
    acc = APAccumulator(cfg.dataset.eval_range, tuple(cfg.eval.iou_thresholds))
    was_training = model.training
    model.eval()
    session = None
    if method.sparse:
        from coperception.comm.pipeline import CommSession

        session = CommSession(model, cfg.comm, codes=method.message == "codes")
    sent_per_frame, sent_per_agent, request_bytes, fused_ages = [], [], [], []
    model_ms = []
    load_ms = []
    kept = []
    t_load = time.perf_counter()
    for batch, _, prepared in tqdm(loader, desc=f"eval {method.name}", disable=not progress):
        load_ms.append((time.perf_counter() - t_load) * 1e3)
        t0 = time.perf_counter()
        out = detect(model, method, batch, prepared, cfg.eval.score_threshold, cfg.eval.nms_threshold, session)
        model_ms.append((time.perf_counter() - t0) * 1e3)
        for i, (p, dets, sizes) in enumerate(zip(prepared, out.detections, out.message_bytes)):
            acc.add(dets.boxes, dets.scores, p.gt_boxes)
            request = out.request_bytes[i] if out.request_bytes else 0
            sent_per_frame.append(sum(sizes) + request)
            sent_per_agent.extend(sizes)
            request_bytes.append(request)
            if out.fused_ages:
                fused_ages.extend(out.fused_ages[i])
            if keep_detections:
                kept.append((p.frame_key, dets))
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
        "params": {"method": method.name, "message": method.message, "description": method.description,
                   **(_comm_params(cfg, method.message) if method.sparse else {})},
        "frames": len(indices),
    }
    if method.sparse:
        entry["request_bytes_per_frame"] = float(np.mean(request_bytes)) if request_bytes else 0.0
        entry["mean_fused_age_s"] = float(np.mean(fused_ages)) if fused_ages else None
    if keep_detections:
        entry["_detections"] = kept
    return entry


def _comm_params(cfg: ExperimentConfig, message: str) -> dict[str, Any]:
    params: dict[str, Any] = {"selection": cfg.comm.selection.model_dump(mode="json"),
                              "channel": cfg.comm.channel.model_dump(mode="json")}
    if message == "codes":
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

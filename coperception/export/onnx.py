"""`coperception export`: the agent and ego graphs of a checkpoint as ONNX (FP32, or W8A8 with
explicit Q/DQ), a JSON spec, and a check of both files with onnxruntime.

The graphs (`export/graphs.py`) take a view's pillars (a dynamic axis up to the pillar capacity) and
the ego's inputs (a dynamic agent axis); `agent_inputs` and `ego_inputs` are the numpy code around
them: a view's pillars (a subset above the capacity), and a delivery's poses turned into the sampling
matrices of the warp.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from dataclasses import asdict
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from coperception.config import ExperimentConfig
from coperception.datasets.collate import PreparedSample, views_batch
from coperception.datasets.prepared import PreparedDataset
from coperception.datasets.readers import build_dataset
from coperception.datasets.voxelize import Voxels
from coperception.errors import OutputError
from coperception.export.graphs import AgentGraph, EgoGraph, ExportError, check_exportable
from coperception.export.quant import KEEP_FLOAT, Calibration, calibrate, quantize
from coperception.grid import affine_to_source
from coperception.io import atomic_write_bytes, write_json, write_yaml
from coperception.pipeline.ego import Delivery
from coperception.pipeline.session import CommSession

OPSET = 18
AGENT_INPUTS = ["voxels", "num_points", "coords"]
EGO_INPUTS = ["features", "theta", "arrived", "age", "kind"]
EGO_OUTPUTS = ["cls", "reg", "direction"]
IN_NUMPY = ["voxelization (and a subset of the pillars above the capacity)", "choosing the cells to send (threshold / top-k, "
            "information filling)", "packet coding and the channel", "decoding received codes (a codebook lookup)",
            "poses -> warp sampling matrices (theta)", "box decoding and rotated NMS"]


def pillar_capacity(cfg: ExperimentConfig) -> int:
    """The evaluation voxel cap: the most pillars per view the agent graph may take."""
    return cfg.model.max_voxels_test or cfg.model.max_voxels


CAPACITY_MARGIN = 1.5  # auto capacity: this much above the fullest view seen, in steps of CAPACITY_STEP
CAPACITY_STEP = 256
CAPACITY_FRAMES = 64


def auto_capacity(cfg: ExperimentConfig, mode, frames: int) -> tuple[int, int]:
    """(capacity, fullest view): the pillar slots of the agent graph sized to the data, `CAPACITY_MARGIN`
    above the most pillars of any view of `frames` training frames spread evenly over the split (the
    first frames of a split are one scene), at most the voxel cap. Every slot costs the pillar net the
    same whether filled or not, so the evaluation cap (70,000 on real data) would make the graph pay for
    pillars a view never has."""
    data = PreparedDataset(build_dataset(cfg.dataset, cfg.dataset.train_split), cfg.dataset, cfg.model, mode)
    picked = np.unique(np.linspace(0, len(data) - 1, min(frames, len(data))).round().astype(int)) if len(data) else []
    fullest = max((len(v.voxels.num_points) for i in picked for v in data[int(i)].agents), default=1)
    steps = int(np.ceil(fullest * CAPACITY_MARGIN / CAPACITY_STEP))
    return min(max(steps, 1) * CAPACITY_STEP, pillar_capacity(cfg)), fullest


MAX_AGENTS = 64  # the ego graph's agent axis is dynamic up to here
MIN_PILLARS = 2  # the pillar axis is dynamic from here (a view with fewer gets empty slots)


def agent_inputs(voxels: Voxels, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One view's pillars -> the agent graph's inputs: as many slots as the view has pillars (the pillar
    axis is dynamic up to `capacity`; at least `MIN_PILLARS`, empty slots have 0 points). A view with
    more pillars keeps a random subset of `capacity` (the same for the same view, as the voxelizer's cap
    does)."""
    n = len(voxels.num_points)
    v, num_points, xyz = voxels.voxels, voxels.num_points, voxels.coords
    if n > capacity:
        keep = np.sort(np.random.default_rng(n).choice(n, capacity, replace=False))
        v, num_points, xyz, n = v[keep], num_points[keep], xyz[keep], capacity
    P, N, F = max(n, MIN_PILLARS), v.shape[1], v.shape[2]
    vox = np.zeros((P, N, F), np.float32)
    num = np.zeros(P, np.int32)
    coords = np.zeros((P, 3), np.int32)
    vox[:n], num[:n], coords[:n] = v, num_points, xyz
    return torch.from_numpy(vox), torch.from_numpy(num), torch.from_numpy(coords)


def full_codes(cells: np.ndarray, codes: np.ndarray, n_cells: int) -> np.ndarray:
    """The agent graph's codes of its top cells -> (H*W, m, r) with -1 for the cells it did not code."""
    out = np.full((n_cells, *codes.shape[1:]), -1, dtype=np.int64)
    out[cells] = codes
    return out


def ego_inputs(delivery: Delivery, grid) -> tuple[torch.Tensor, ...]:
    """A one-sample delivery -> the ego graph's inputs (poses become `affine_grid` matrices here)."""
    if len(delivery.record_len) != 1:
        raise ValueError("one sample per ego-graph call")
    arrived = delivery.arrived if delivery.arrived is not None else \
        torch.ones(delivery.features.shape[0], *delivery.features.shape[-2:], dtype=torch.bool)
    theta = affine_to_source(delivery.T_ego_from_agent.float(), grid)
    return (delivery.features.float().cpu(), theta.cpu(), arrived.cpu(), delivery.age.float().cpu(),
            delivery.kind.long().cpu())


def sample_inputs(model, cfg: ExperimentConfig, split: str, frames: int, capacity: int) -> Iterator[tuple[list, tuple]]:
    """For the first `frames` samples of `split`: each view's agent-graph inputs and the ego-graph inputs
    of what the ego received (through the configured comm session, with the torch model)."""
    data = PreparedDataset(build_dataset(cfg.dataset, split), cfg.dataset, cfg.model,
                           model.strategy.input_mode(False, cfg.cooperation.project_first))
    session = CommSession.for_config(model.agent, model.confidence, cfg)
    for i in range(min(frames, len(data))):
        p: PreparedSample = data[i]
        encoded: list = []

        def encode(views):
            encoded.extend(views)
            return model.encode(views_batch([views]))

        with torch.no_grad():
            delivery, _ = session.deliver(p, encode)
        yield [agent_inputs(v.voxels, capacity) for v in encoded], ego_inputs(delivery, model.feature_grid)


def _onnx_export(graph: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                 dynamic_shapes: dict | None = None) -> None:
    """Export to `path` atomically (a temporary file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the exporter reports every torchvision op it skips
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, args, tmp, dynamo=True, external_data=False, opset_version=OPSET,
                              input_names=inputs, output_names=outputs, verbose=False, dynamic_shapes=dynamic_shapes)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(path, str(exc)) from None
    finally:
        quiet.setLevel(level)
        if os.path.exists(tmp):
            os.unlink(tmp)


def ort_session(path: str | Path):
    """An onnxruntime CPU session for `path` (onnxruntime is the `export` extra)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed: pip install 'coperception-v2x[export]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_with_ort(graph: torch.nn.Module, path: Path, names: list[str], samples: list[tuple]) -> dict[str, float]:
    """The torch graph against its ONNX file over `samples`: the largest absolute difference of the float
    outputs and the fraction of integer outputs (codes) that differ (a cell halfway between two codes
    may tip either way under a different summation order). An agent graph's top cells are compared as
    sets: cells of equal confidence may come in another order, so codes are compared cell by cell where
    both coded the cell, and `top_cells_differing` counts cells only one of them chose."""
    sess = ort_session(path)
    worst, differing, total, other_cells, top_total = 0.0, 0, 0, 0, 0
    with torch.no_grad():
        for args in samples:
            ref = [r.numpy() for r in graph(*args)]
            got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
            if len(ref) == 4:  # features, confidence, top cells, their codes
                ref_codes, got_codes = dict(zip(ref[2].tolist(), ref[3])), dict(zip(got[2].tolist(), got[3]))
                common = ref_codes.keys() & got_codes.keys()
                other_cells += len(ref_codes) - len(common)
                top_total += len(ref_codes)
                differing += sum(int((ref_codes[c] != got_codes[c]).sum()) for c in common)
                total += sum(ref_codes[c].size for c in common)
                ref, got = ref[:2], got[:2]
            for r, g in zip(ref, got):
                if np.issubdtype(r.dtype, np.floating):
                    worst = max(worst, float(np.abs(r.astype(np.float64) - g.astype(np.float64)).max()))
                else:
                    differing += int((r != g).sum())
                    total += g.size
    result = {"max_abs_diff": worst, "integer_mismatch": differing / total if total else 0.0}
    if top_total:
        result["top_cells_differing"] = other_cells / top_total
    return result


def export_model(checkpoint: str | Path, cfg: ExperimentConfig, out: str | Path, int8: bool = False,
                 calib_frames: int = 32, calibration: Calibration = "percentile", check_frames: int = 4,
                 log: Callable[[str], None] = print, capacity: int | None = None,
                 code_cells: int = 512) -> dict[str, Any]:
    """Write `agent.onnx`, `ego.onnx` and `spec.json` to `out` for `checkpoint` (as `cfg` describes it);
    with `int8`, W8A8 with explicit Q/DQ calibrated on `calib_frames` training frames. Both files are
    run with onnxruntime on `check_frames` test frames and compared with the torch graphs. `capacity`:
    pillar slots of the agent graph (None: sized to 64 training frames, `auto_capacity`); `code_cells`:
    how many of its most confident cells the agent graph codes."""
    from coperception.pipeline.model import load_model

    out = Path(out)
    model = load_model(checkpoint, cfg, device="cpu")
    check_exportable(model)
    if int8 and type(model.ego.fusion).__name__ not in ("MaxFusion", "MeanFusion"):
        raise ExportError(f"export --int8: fusion {type(model.ego.fusion).__name__} multiplies activations with "
                          "activations, which the W8A8 path does not quantize yet; export it without --int8")
    mode = model.strategy.input_mode(False, cfg.cooperation.project_first)
    fullest = None
    if capacity is None:
        capacity, fullest = auto_capacity(cfg, mode, CAPACITY_FRAMES)
        log(f"pillar capacity {capacity} (the fullest view of {CAPACITY_FRAMES} training frames spread over the split "
            f"has {fullest} pillars)")
    agent, ego = AgentGraph(model, code_cells).eval(), EgoGraph(model).eval()
    scales: dict[str, float] = {}
    if int8:
        agent, ego = quantize(agent), quantize(ego)
        log(f"calibrating on {calib_frames} {cfg.dataset.train_split} frames ({calibration})")
        calib = list(sample_inputs(model, cfg, cfg.dataset.train_split, calib_frames, capacity))
        scales.update({f"agent.{k}": v for k, v in calibrate(agent, [a for views, _ in calib for a in views],
                                                              calibration).items()})
        scales.update({f"ego.{k}": v for k, v in calibrate(ego, [e for _, e in calib], calibration).items()})
    checks = list(sample_inputs(model, cfg, cfg.dataset.eval_split, check_frames, capacity))
    agent_example, ego_example = checks[0][0][0], checks[0][1]
    t0 = time.perf_counter()
    outputs = ["features", "confidence"] + (["code_cells", "codes"] if agent.quantizer is not None else [])
    pillars = torch.export.Dim("pillars", min=MIN_PILLARS, max=capacity)  # a deployment runs the pillars it has
    _onnx_export(agent, agent_example, out / "agent.onnx", AGENT_INPUTS, outputs, {name: {0: pillars} for name in AGENT_INPUTS})
    agents = torch.export.Dim("agents", min=1, max=MAX_AGENTS)  # the ego graph takes any number of senders
    _onnx_export(ego, ego_example, out / "ego.onnx", EGO_INPUTS, EGO_OUTPUTS,
                 {name: {0: agents} for name in EGO_INPUTS})
    log(f"exported in {time.perf_counter() - t0:.1f} s")
    agent_diff = compare_with_ort(agent, out / "agent.onnx", AGENT_INPUTS, [a for views, _ in checks for a in views])
    ego_diff = compare_with_ort(ego, out / "ego.onnx", EGO_INPUTS, [e for _, e in checks])
    log(f"onnxruntime vs torch, largest absolute difference: agent graph {agent_diff['max_abs_diff']:.2e} (codes "
        f"differing: {agent_diff['integer_mismatch']:.2%}), ego graph {ego_diff['max_abs_diff']:.2e}")
    codec = model.agent.codec
    digest = codec.digest()
    spec = {
        "checkpoint": str(checkpoint), "opset": OPSET, "precision": "int8 (W8A8, explicit Q/DQ)" if int8 else "fp32",
        "agent_graph": {"file": "agent.onnx", "inputs": {
            "voxels": ["P", cfg.model.max_points_per_voxel, 4, "float32"], "num_points": ["P", "int32"],
            "coords": ["P", 3, "int32 (z, y, x) pillar indices; empty slots have num_points 0"]},
            "pillar_axis": {"min": MIN_PILLARS, "opt": min(fullest or capacity, capacity), "max": capacity},
            "outputs": outputs, "pillar_capacity": capacity, "fullest_view_pillars": fullest,
            "code_cells": agent.code_cells if agent.quantizer is not None else None},
        "ego_graph": {"file": "ego.onnx", "inputs": {
            "features": ["L", model.encoders.out_channels, model.feature_grid.height, model.feature_grid.width, "float32"],
            "theta": ["L", 2, 3, "float32, affine_grid matrix of each agent's warp (grid.affine_to_source)"],
            "arrived": ["L", model.feature_grid.height, model.feature_grid.width, "bool"], "age": ["L", "float32 s"],
            "kind": ["L", "int64 (0 vehicle, 1 rsu)"]}, "outputs": EGO_OUTPUTS, "agents_in_example": int(ego_example[0].shape[0]),
            "agent_axis": {"min": 1, "opt": cfg.dataset.max_agents, "max": MAX_AGENTS}},
        "feature_grid": asdict(model.feature_grid), "codec": cfg.comm.codec,
        "codebook_hash": digest.hex() if digest is not None else None,
        "fusion": cfg.fusion.method, "in_numpy": IN_NUMPY,
        "quantization": {"weights": "per output channel, symmetric, zero point 0", "activations": "per tensor, symmetric, "
                         f"zero point 0, calibrated ({calibration}) on {calib_frames} training frames",
                         "kept_in_float": [{"layer": f"agent.{name}", "why": "its input mixes absolute x/y of up to the "
                                            "range with centimetre offsets; one INT8 scale erases the offsets"}
                                           for name in KEEP_FLOAT],
                         "input_scales": scales} if int8 else None,
        "onnxruntime_check": {"frames": len(checks), "agent": agent_diff, "ego": ego_diff},
    }
    write_json(out / "spec.json", spec)
    write_yaml(out / "config.yaml", cfg.model_dump(mode="json"))  # what `eval --onnx` rebuilds the pipeline from
    quantizer = getattr(codec, "quantizer", None)
    if quantizer is not None:  # the receiver decodes codes with it
        buf = io.BytesIO()
        np.save(buf, quantizer.codebook.detach().cpu().numpy())
        atomic_write_bytes(out / "codebook.npy", buf.getvalue())
    return spec

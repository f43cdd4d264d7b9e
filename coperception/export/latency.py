"""`coperception bench latency`: milliseconds per stage of one cooperative frame for torch FP32,
onnxruntime FP32 and onnxruntime INT8, and the system latency as QuantV2X counts it (compute plus the
transmission time of the real bytes at the configured bandwidth).

Stages: voxelize (one view), agent graph (pillars -> features, confidence, codes), select + serialize
(cells over the threshold into wire packets), transmission (bytes / bandwidth, computed, not timed),
decode (packets -> features), ego graph (warp + fusion + head), boxes + NMS. Each stage is warmed up,
then timed `runs` times; the report gives median and 90th percentile. The system latency adds, for
one sender, voxelize + agent graph + select/serialize + transmission + decode, then the ego graph and
NMS (senders work in parallel; the ego's own encoder overlaps the transmission).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from coperception.comm.wire import Message, decode_packets, encode_message
from coperception.config import ExperimentConfig
from coperception.datasets.collate import prepare_sample, views_batch
from coperception.datasets.readers import build_dataset
from coperception.datasets.voxelize import voxelize
from coperception.export.onnx import AGENT_INPUTS, EGO_INPUTS, agent_inputs, ego_inputs, full_codes, ort_session
from coperception.io import read_json, write_json
from coperception.models.postprocess import decode_detections
from coperception.pipeline.ego import Delivery


def time_runs(fn: Callable[[], Any], runs: int, warmup: int) -> tuple[dict[str, float], Any]:
    """`fn` run `warmup` times, then timed `runs` times: median and 90th percentile ms, and its last output."""
    for _ in range(warmup):
        out = fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": float(np.median(samples)), "p90_ms": float(np.percentile(samples, 90))}, out


def bench_latency(cfg: ExperimentConfig, checkpoint: str | Path, exports: dict[str, Path], out: Path, runs: int = 100,
                  warmup: int = 5, frame: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Per-stage latency of torch FP32 (`checkpoint`) and of each export folder in `exports`
    (name -> folder), on one test frame (default: the middle one) with `torch.get_num_threads()` threads."""
    from coperception.pipeline.model import load_model

    model = load_model(checkpoint, cfg, device="cpu")
    data = build_dataset(cfg.dataset, cfg.dataset.eval_split)
    index = len(data) // 2 if frame is None else frame
    sample = data[index]
    prepared = prepare_sample(sample, "all", cfg.dataset, cfg.model)
    sender = prepared.agents[1]
    codec, grid = model.agent.codec, model.feature_grid
    threshold = cfg.comm.selection.threshold if cfg.comm.selection.threshold is not None else 0.0
    mbps = cfg.comm.channel.bandwidth_mbps
    points = sample.agents[1].points
    cap = cfg.model.max_voxels_test or cfg.model.max_voxels
    rng = np.random.default_rng(0)
    common: dict[str, dict[str, float]] = {}
    common["voxelize"], _ = time_runs(lambda: voxelize(points, cfg.dataset.point_cloud_range, cfg.model.voxel_size,
                                                   cfg.model.max_points_per_voxel, cap, rng), runs, warmup)
    n_views = len(prepared.agents)

    def serialize(feats: torch.Tensor, conf: torch.Tensor, codes: torch.Tensor | None) -> list[bytes]:
        cells = torch.nonzero(conf.flatten() >= threshold, as_tuple=True)[0]
        if codes is not None:
            payload = codec.payload_codes(codes[cells], feats.flatten(1)[:, cells].T.contiguous())
        else:
            payload = codec.payload(feats.flatten(1)[:, cells].T.contiguous())
        extra = {"codebook_hash": codec.digest()} if codec.digest() is not None else {}
        msg = Message(sender=sender.sender, sequence=1, capture_time=0.0, pose=sender.T_world_from_frame, grid=grid,
                      cells=cells.numpy(), **payload, **extra)
        return encode_message(msg, cfg.comm.channel.mtu)

    def decode(packets: list[bytes]) -> torch.Tensor:
        msg = decode_packets(packets, expected=codec.expected(grid))
        flat = torch.zeros(model.encoders.out_channels, grid.cells)
        flat[:, torch.from_numpy(msg.cells)] = codec.vectors(msg).T
        return flat.view(-1, grid.height, grid.width)

    engines: dict[str, dict[str, Any]] = {}
    # torch FP32
    batch = views_batch([[sender]])
    with torch.no_grad():
        def torch_agent():
            feats = model.encode(batch)
            conf = model.confidence(feats)
            return feats, conf, None
        stages: dict[str, Any] = {}
        stages["agent_graph"], (feats, conf, codes) = time_runs(torch_agent, runs, warmup)
        stages["select_serialize"], packets = time_runs(lambda: serialize(feats[0], conf[0], codes), runs, warmup)
        stages["decode"], received = time_runs(lambda: decode(packets), runs, warmup)
        all_feats = model.encode(views_batch([prepared.agents]))
        all_feats[1] = received
        delivery = Delivery(all_feats, None, [n_views], torch.from_numpy(np.stack([v.T_ego_from_frame for v in prepared.agents])
                                                                          ).float(), torch.zeros(n_views),
                            torch.tensor([v.kind for v in prepared.agents]))
        stages["ego_graph"], head = time_runs(lambda: model.receive(delivery), runs, warmup)
    stages["nms"], _ = time_runs(lambda: decode_detections(head, model.anchors, cfg.eval.score_threshold,
                                                        cfg.eval.nms_threshold), runs, warmup)
    engines["torch_fp32"] = {"stages": stages, "bytes": sum(len(p) for p in packets)}
    # onnxruntime engines
    for name, folder in exports.items():
        agent_sess, ego_sess = ort_session(folder / "agent.onnx"), ort_session(folder / "ego.onnx")
        capacity = int(read_json(folder / "spec.json")["agent_graph"]["pillar_capacity"])
        feeds = {n: a.numpy() for n, a in zip(AGENT_INPUTS, agent_inputs(sender.voxels, capacity))}
        stages = {}
        stages["agent_graph"], outs = time_runs(lambda: agent_sess.run(None, feeds), runs, warmup)
        f, c = torch.from_numpy(outs[0]), torch.from_numpy(outs[1])
        k = torch.from_numpy(full_codes(outs[2], outs[3], grid.cells)) if len(outs) > 2 else None
        stages["select_serialize"], packets = time_runs(lambda: serialize(f[0], c[0], k), runs, warmup)
        stages["decode"], received = time_runs(lambda: decode(packets), runs, warmup)
        ego_feeds = {n: a.numpy() for n, a in zip(EGO_INPUTS, ego_inputs(delivery, grid))}
        stages["ego_graph"], outs = time_runs(lambda: ego_sess.run(None, ego_feeds), runs, warmup)
        stages["nms"] = engines["torch_fp32"]["stages"]["nms"]
        engines[name] = {"stages": stages, "bytes": sum(len(p) for p in packets)}
    dense_bytes = model.encoders.out_channels * grid.cells * 4
    for name, e in engines.items():
        st = e["stages"]
        e["transmission_ms"] = e["bytes"] * 8 / (mbps * 1e6) * 1e3
        e["system_latency_ms"] = (common["voxelize"]["median_ms"] + st["agent_graph"]["median_ms"]
                                  + st["select_serialize"]["median_ms"] + e["transmission_ms"] + st["decode"]["median_ms"]
                                  + st["ego_graph"]["median_ms"] + st["nms"]["median_ms"])
    t = engines["torch_fp32"]
    dense_system = (common["voxelize"]["median_ms"] + t["stages"]["agent_graph"]["median_ms"]
                    + dense_bytes * 8 / (mbps * 1e6) * 1e3 + t["stages"]["ego_graph"]["median_ms"] + t["stages"]["nms"]["median_ms"])
    rep = {"frame": f"{sample.scenario}/{sample.frame}", "threads": torch.get_num_threads(), "runs": runs, "warmup": warmup,
           "bandwidth_mbps": mbps, "selection_threshold": threshold, "pillars_in_view": int(len(sender.voxels.num_points)),
           "common": common, "engines": engines,
           "dense_fp32_torch": {"bytes": dense_bytes, "transmission_ms": dense_bytes * 8 / (mbps * 1e6) * 1e3,
                                "system_latency_ms": dense_system},
           "ratios": {f"{n}_agent_graph_vs_torch": e["stages"]["agent_graph"]["median_ms"] /
                      t["stages"]["agent_graph"]["median_ms"] for n, e in engines.items() if n != "torch_fp32"}}
    best = min(engines.values(), key=lambda e: e["system_latency_ms"])
    rep["ratios"]["dense_fp32_system_vs_fastest_codebook"] = dense_system / best["system_latency_ms"]
    write_json(out / "latency.json", rep)
    log(format_latency(rep))
    return rep


def format_latency(rep: dict[str, Any]) -> str:
    names = list(rep["engines"])
    stages = ["agent_graph", "select_serialize", "decode", "ego_graph", "nms"]
    lines = [f"{'stage (median / p90 ms)':<26}" + "".join(f"{n:>22}" for n in names)]
    v = rep["common"]["voxelize"]
    lines.append(f"{'voxelize':<26}" + "".join(f"{v['median_ms']:>12.1f} / {v['p90_ms']:<7.1f}" for _ in names))
    for s in stages:
        lines.append(f"{s:<26}" + "".join(f"{rep['engines'][n]['stages'][s]['median_ms']:>12.1f} / "
                                           f"{rep['engines'][n]['stages'][s]['p90_ms']:<7.1f}" for n in names))
    lines.append(f"{'transmission':<26}" + "".join(f"{rep['engines'][n]['transmission_ms']:>22.2f}" for n in names))
    lines.append(f"{'system latency':<26}" + "".join(f"{rep['engines'][n]['system_latency_ms']:>22.1f}" for n in names))
    d = rep["dense_fp32_torch"]
    lines.append(f"dense fp32 torch pipeline: {d['bytes']:,} B, transmission {d['transmission_ms']:.1f} ms, system "
                 f"{d['system_latency_ms']:.1f} ms at {rep['bandwidth_mbps']} Mbit/s")
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in rep["ratios"].items()))
    return "\n".join(lines)

"""Benchmarks that write the JSON report shape of DESIGN §5: AP per measured byte, and robustness.

`bench_comm`: the baselines (ego-only, late, early, dense intermediate max, Where2comm-style sparse
fp32 messages) under `methods`, and a sweep of selection thresholds x codebook sizes (with and
without information filling) under `points`. `bench_robustness`: AP@0.5 of one operating point
under packet loss, delay and pose noise. Both need the checkpoints the demo trains
(`outputs/demo/train/{none,max}/best.pt`) and train one codebook per size on top of `max`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from coperception.config import ExperimentConfig
from coperception.datasets.cooperative import CooperativeDataset, InMemoryDataset, build_dataset
from coperception.evaluate import evaluate_method, report
from coperception.io import write_json
from coperception.train import build_model, init_weights, load_model, train


def sparse_model_from_dense(cfg: ExperimentConfig, dense_checkpoint: str | Path):
    """The dense intermediate model's weights in a model for a sparse method (fp32 messages need no codebook)."""
    model = build_model(cfg)
    init_weights(model, dense_checkpoint, cfg)
    model.eval()
    return model


def codebook_name(spec: tuple[int, int, int]) -> str:
    return "x".join(str(v) for v in spec)


def train_codebook(cfg: ExperimentConfig, dense_checkpoint: str | Path, spec: tuple[int, int, int], out_dir: Path,
                   epochs: int, log: Callable[[str], None], sample_cache: dict | None = None) -> Path:
    """Fine-tune the dense model with a fresh codebook (segments, stages, codes) on its messages; returns best.pt."""
    suffix = "_frozen" if cfg.train.freeze_detector else ""
    target = out_dir / f"codebook_{codebook_name(spec)}{suffix}" / "best.pt"
    if target.is_file():
        log(f"reusing {target}")
        return target
    run = cfg.for_method("codebook", train={"out_dir": str(target.parent), "epochs": epochs, "init_from": str(dense_checkpoint)},
                         codebook=dict(zip(("segments", "stages", "codes"), spec)))
    train(run, sample_cache=sample_cache)
    return target


def _eval(model, cfg: ExperimentConfig, method: str, split: str, data: CooperativeDataset, log: Callable[[str], None],
          label: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    entry = evaluate_method(model, cfg, split, method, progress=False, dataset=data)
    entry.pop("frames", None)
    log(f"{label:<40} AP@0.5 {entry['ap']['0.5']:.3f}  bytes/agent/frame {entry['bytes_per_agent_frame']:>12.0f}  "
        f"({time.perf_counter() - t0:.0f} s)")
    return entry


def bench_comm(cfg: ExperimentConfig, checkpoints: dict[str, Path], out: Path, thresholds: Sequence[float],
               codebooks: Sequence[tuple[int, int, int]], codebook_epochs: int, log: Callable[[str], None] = print
               ) -> dict[str, Any]:
    """`codebooks`: (segments, stages, codes) per codebook to train and sweep."""
    split = cfg.dataset.eval_split
    data = InMemoryDataset(build_dataset(cfg.dataset, split), desc=f"read {split}")
    methods: dict[str, Any] = {}
    for name, trained in (("none", "none"), ("late", "none"), ("early", "early"), ("max", "max")):
        if trained not in checkpoints:
            continue
        run = cfg.for_method(name)
        methods[name] = _eval(load_model(checkpoints[trained], run), run, name, split, data, log, name)
    points = []
    cache: dict = {}
    for threshold in thresholds:
        run = cfg.for_method("where2comm", selection={"threshold": threshold})
        entry = _eval(sparse_model_from_dense(run, checkpoints["max"]), run, "where2comm", split, data, log,
                      f"where2comm thr={threshold}")
        entry["params"]["curve"] = "where2comm"
        points.append(entry)
        if threshold == cfg.comm.selection.threshold:
            methods["where2comm"] = entry
    for spec in codebooks:
        name = codebook_name(spec)
        checkpoint = train_codebook(cfg, checkpoints["max"], spec, out / "train", codebook_epochs, log, cache)
        for filling in (False, True):
            for threshold in thresholds:
                run = cfg.for_method("codebook", selection={"threshold": threshold, "filling": filling},
                                  codebook=dict(zip(("segments", "stages", "codes"), spec)))
                entry = _eval(load_model(checkpoint, run), run, "codebook", split, data, log,
                              f"codebook {name} thr={threshold} filling={filling}")
                entry["params"]["curve"] = f"codebook {name}" + (" + filling" if filling else "")
                points.append(entry)
    rep = report({k: {**v, "frames": len(data)} for k, v in methods.items()}, f"{cfg.dataset.format}:{cfg.dataset.root}",
                 split)
    rep["points"] = points
    rep["dense_fp32_bytes_per_agent_frame"] = methods.get("max", {}).get("bytes_per_agent_frame")
    write_json(out / "comm.json", rep)
    from coperception.viz.curves import plot_ap_vs_bytes

    plot_ap_vs_bytes(rep, out / "comm.png")
    log(f"wrote {out / 'comm.json'} and {out / 'comm.png'}")
    return rep


def bench_robustness(cfg: ExperimentConfig, checkpoint: Path, ego_checkpoint: Path | None, out: Path,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """AP@0.5 of the codebook operating point in `cfg` vs packet loss, delay and pose noise."""
    split = cfg.dataset.eval_split
    data = InMemoryDataset(build_dataset(cfg.dataset, split), desc=f"read {split}")
    sweeps: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "loss": [(f"{p}%", {"loss_rate": p / 100}) for p in (0, 10, 30, 50, 100)],
        "delay_ms": [(f"{d} ms", {"latency_ms": float(d)}) for d in (0, 100, 200, 400)],
        "pose_noise": [("0", {}), ("0.2 m / 0.2 deg", {"pose_noise_m": 0.2, "pose_noise_deg": 0.2}),
                       ("0.5 m / 1 deg", {"pose_noise_m": 0.5, "pose_noise_deg": 1.0})],
    }
    results: dict[str, list[dict[str, Any]]] = {}
    for sweep, settings in sweeps.items():
        results[sweep] = []
        for label, channel in settings:
            run = cfg.for_method("codebook", channel=channel)
            entry = _eval(load_model(checkpoint, run), run, "codebook", split, data, log, f"{sweep} {label}")
            entry["params"]["setting"] = label
            results[sweep].append(entry)
    methods = {}
    if ego_checkpoint is not None:
        run = cfg.for_method("none")
        methods["none"] = {**_eval(load_model(ego_checkpoint, run), run, "none", split, data, log, "ego only"),
                           "frames": len(data)}
    rep = report(methods, f"{cfg.dataset.format}:{cfg.dataset.root}", split)
    rep["frames"] = len(data)
    rep["sweeps"] = results
    write_json(out / "robustness.json", rep)
    from coperception.viz.curves import plot_robustness

    plot_robustness(rep, out / "robustness.png")
    log(f"wrote {out / 'robustness.json'} and {out / 'robustness.png'}")
    return rep

"""The main job on the synthetic world: simulate (if absent) -> train -> evaluate every baseline -> report + picture."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from coperception.config import BASELINE_STRATEGIES, ExperimentConfig
from coperception.datasets.readers import InMemoryDataset, build_dataset
from coperception.datasets.sim import simulate as run_simulation
from coperception.datasets.stats import visibility_stats
from coperception.evaluate import evaluate_method, format_table, report
from coperception.io import write_json
from coperception.pipeline.model import load_model, validate_config
from coperception.train import train
from coperception.viz.bev import plot_sample_bev


def _with(cfg: ExperimentConfig, method: str, out_dir: Path, epochs: int, init_from: str | None) -> ExperimentConfig:
    """`method`: a baseline strategy (none / early / late) or a fusion over dense fp32 features."""
    run = {"out_dir": str(out_dir), "epochs": epochs, "init_from": init_from}
    if method in BASELINE_STRATEGIES:
        return cfg.variant(strategy=method, train=run)
    return cfg.variant(strategy="intermediate", codec="dense", fusion=method, train=run)


def run_demo(cfg: ExperimentConfig, out: Path, workers: int = 2, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage and write `out/report.json` (DESIGN §5 shape plus visibility and training summaries)
    and `out/bev_test_frame.png`. Returns the report."""
    validate_config(cfg)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    root = Path(cfg.dataset.root)
    t0 = time.perf_counter()
    if not (root / cfg.dataset.eval_split).is_dir() and not (root / "cooperative").is_dir():
        log(f"simulating the synthetic benchmark into {root}")
        run_simulation(cfg.dataset.format, root, cfg.simulator, workers=workers)
    timings["simulate"] = time.perf_counter() - t0
    test_set = InMemoryDataset(build_dataset(cfg.dataset, cfg.dataset.eval_split), desc=f"read {cfg.dataset.eval_split}")
    visibility = visibility_stats(test_set, cfg.dataset.gt_range(), progress=False)
    log(f"{cfg.dataset.eval_split}: {visibility['gt_vehicles']} GT vehicles in the eval range; with >= "
        f"{visibility['min_points']} LiDAR points: ego {visibility['ego_visible_fraction']:.1%}, any agent "
        f"{visibility['union_visible_fraction']:.1%}")

    demo = cfg.demo
    runs = out / "train"
    summaries: dict[str, Any] = {}
    checkpoints: dict[str, Path] = {}
    t0 = time.perf_counter()
    cache: dict = {}
    ego_cfg = _with(cfg, "none", runs / "none", demo.ego_epochs, None)
    summaries["none"] = train(ego_cfg, sample_cache=cache, overwrite=True)
    checkpoints["none"] = runs / "none" / "best.pt"
    for method in demo.fusion_methods:
        method_cfg = _with(cfg, method, runs / method, demo.fusion_epochs, str(checkpoints["none"]))
        summaries[method] = train(method_cfg, sample_cache=cache, overwrite=True)
        checkpoints[method] = runs / method / "best.pt"
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    entries: dict[str, dict[str, Any]] = {}
    frame_detections: dict[str, Any] = {}
    for method in demo.eval_methods:
        trained_as = "none" if method == "late" else method  # late fusion runs the ego-only detector on every agent
        method_cfg = _with(cfg, method, runs / trained_as, 1, None)
        model = load_model(checkpoints[trained_as], method_cfg)
        entries[method] = evaluate_method(model, method_cfg, cfg.dataset.eval_split, keep_detections=True,
                                          dataset=test_set)
        frame_detections[method] = entries[method]["_detections"]
    timings["evaluate"] = time.perf_counter() - t0

    rep = report(entries, f"synthetic ({cfg.dataset.format} layout, {root})", cfg.dataset.eval_split)
    middle = len(test_set) // 2
    sample = test_set[middle]
    key = f"{sample.scenario}/{sample.frame}"
    picture = out / "bev_test_frame.png"
    shown = "max" if "max" in frame_detections else next(iter(frame_detections))
    dets = {f.frame_key: f for f in frame_detections[shown]}[key].detections
    plot_sample_bev(sample, picture, [-60, -30, 60, 30], detections=(shown, dets.boxes, dets.scores),
                    eval_range=cfg.dataset.eval_range, gt_range=cfg.dataset.gt_range())
    timings["total"] = time.perf_counter() - started
    rep.update({"visibility": visibility, "training": summaries,
                "checkpoints": {k: str(v) for k, v in checkpoints.items()}, "seconds": timings, "bev_picture": str(picture)})
    write_json(out / "report.json", rep)
    log(format_table(rep))
    log(f"wrote {out / 'report.json'} and {picture} in {timings['total'] / 60:.1f} min")
    return rep

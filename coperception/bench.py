"""Benchmarks that write the JSON report shape of DESIGN §5: AP per measured byte, and robustness.

`bench_comm`: the baselines (ego-only, late, early, dense intermediate max, Where2comm-style sparse
fp32 messages) under `methods`, a sweep of selection thresholds (with and without information
filling) for the fp32 messages and for every codebook size under `points`, and under `comparisons`
each codebook point against fp32 messages of equal AP, each filling point against plain
thresholding. The ego-only, dense max, Where2comm-style and codebook models are all fine-tuned from
the demo's max checkpoint (`outputs/demo/train/max/best.pt`) with the same recipe, so they compare
at equal training (early fusion is evaluated as the demo trained it).
`bench_robustness`: AP@0.5 of one operating point under packet loss, delay and pose noise.
`bench_attack`: AP@0.5 when one sender lies with well-formed messages, with and without the ego's
consistency check, for each given intermediate-fusion checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from coperception.checkpoint import load_checkpoint
from coperception.config import ExperimentConfig, FusionConfig
from coperception.datasets.cooperative import CooperativeDataset
from coperception.datasets.readers import InMemoryDataset, build_dataset
from coperception.evaluate import evaluate_method, report
from coperception.errors import ConfigError
from coperception.io import read_json, write_json
from coperception.pipeline.attacks import GhostAttack
from coperception.pipeline.model import load_model
from coperception.train import train

# what the benchmarks compare, as (strategy, codec) over max fusion; report keys stay the familiar names
VARIANTS: dict[str, dict[str, str]] = {
    "none": {"strategy": "none"}, "late": {"strategy": "late"}, "early": {"strategy": "early"},
    "max": {"strategy": "intermediate", "codec": "dense", "fusion": "max"},
    "where2comm": {"strategy": "intermediate", "codec": "sparse", "fusion": "max"},
    "codebook": {"strategy": "intermediate", "codec": "codebook", "fusion": "max"},
}


def variant(cfg: ExperimentConfig, name: str, train: dict[str, Any] | None = None, **comm: dict[str, Any]
            ) -> ExperimentConfig:
    """`cfg` running the benchmark variant `name` (a key of VARIANTS)."""
    return cfg.variant(**VARIANTS[name], train=train, **comm)


def codebook_name(spec: tuple[int, int, int]) -> str:
    return "x".join(str(v) for v in spec)


def codebook_shape(spec: tuple[int, int, int]) -> dict[str, int]:
    """(segments, stages, codes) -> the `comm.codebook` settings it names."""
    return dict(zip(("segments", "stages", "codes"), spec))


def finetune(cfg: ExperimentConfig, method: str, start: str | Path, out_dir: Path, epochs: int,
             log: Callable[[str], None], sample_cache: dict | None = None,
             codebook: tuple[int, int, int] | None = None) -> Path:
    """Continue the checkpoint `start` as `method` for `epochs` with the recipe of `cfg.train`, so every
    benchmarked model gets the same extra training; `codebook` (segments, stages, codes) starts fresh
    codes on the messages. Returns last.pt, the end of that equal budget (best.pt is chosen on the
    validation split, a single scenario here, and would add its selection noise); an existing one
    is reused."""
    name = method if codebook is None else f"codebook_{codebook_name(codebook)}"
    frozen = cfg.train.freeze_detector and codebook is not None
    target = out_dir / (name + ("_frozen" if frozen else "")) / "last.pt"
    if target.is_file():
        log(f"reusing {target}")
        return target
    sections = {"codebook": codebook_shape(codebook)} if codebook else {}
    run = variant(cfg, method, train={"out_dir": str(target.parent), "epochs": epochs, "init_from": str(start),
                                        "freeze_detector": frozen}, **sections)
    log(f"fine-tuning {target.parent.name} from {start} ({epochs} epochs)")
    train(run, sample_cache=sample_cache, progress=False, overwrite=True)
    return target


def _eval(checkpoint: Path, cfg: ExperimentConfig, split: str, data: CooperativeDataset, log: Callable[[str], None],
          label: str, attack: GhostAttack | None = None) -> dict[str, Any]:
    """Evaluate `checkpoint` as `cfg` describes (its selection, codec and channel settings)."""
    t0 = time.perf_counter()
    entry = evaluate_method(load_model(checkpoint, cfg), cfg, split, progress=False, dataset=data, attack=attack)
    entry.pop("frames", None)
    refused = dict(entry.get("rejected_messages") or {})
    log(f"{label:<40} AP@0.5 {entry['ap']['0.5']:.3f}  bytes/agent/frame {entry['bytes_per_agent_frame']:>12.0f}  "
        + (f"refused {refused}  " if refused else "") + f"({time.perf_counter() - t0:.0f} s)")
    return entry


class EvaluationStore:
    """Evaluations a bench already made, kept in a JSON file beside its runs, so that an interrupted bench
    evaluates again only what is missing (evaluation is seeded: the same model and config give the same
    entry). An entry is found by its checkpoint (path, size and modification time: a retrained model is
    evaluated anew) and the whole config it was evaluated with."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = read_json(path) if path.is_file() else {}
        if not isinstance(self.entries, dict):
            raise ConfigError(f"{path}: not a bench evaluation store (a JSON object); move it away")

    @staticmethod
    def key(checkpoint: Path, cfg: ExperimentConfig) -> str:
        stat = checkpoint.stat()
        config = cfg.model_dump(mode="json")
        if not cfg.fusion.motion.enabled:  # its tracker settings then change nothing: a new default keeps the entry
            config["fusion"]["motion"] = {"enabled": False}
        ident = {"checkpoint": str(checkpoint.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                 "config": config}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def entry(self, checkpoint: Path, cfg: ExperimentConfig, evaluate: Callable[[], dict[str, Any]],
              log: Callable[[str], None], label: str) -> dict[str, Any]:
        """The stored entry of `checkpoint` under `cfg`, else `evaluate()`'s, stored at once."""
        key = self.key(checkpoint, cfg)
        if key in self.entries:
            log(f"{label:<40} AP@0.5 {self.entries[key]['ap']['0.5']:.3f}  (evaluated before: {self.path})")
        else:
            self.entries[key] = evaluate()
            write_json(self.path, self.entries)
        return copy.deepcopy(self.entries[key])  # callers add to their copy


def with_trained_fusion(cfg: ExperimentConfig, checkpoint: Path) -> ExperimentConfig:
    """`cfg` with the fusion `checkpoint` was trained with (as its stored config says), if it says."""
    stored = load_checkpoint(checkpoint).get("config")
    fusion = stored.get("fusion") if isinstance(stored, dict) else None
    return cfg.model_copy(update={"fusion": FusionConfig.model_validate(fusion)}) if isinstance(fusion, dict) else cfg


def bench_comm(cfg: ExperimentConfig, checkpoints: dict[str, Path], out: Path, thresholds: Sequence[float],
               codebooks: Sequence[tuple[int, int, int]], epochs: int, log: Callable[[str], None] = print
               ) -> dict[str, Any]:
    """`checkpoints`: the demo's early / max runs. The ego-only, dense max, Where2comm-style and codebook
    models are all fine-tuned from the max run with `cfg.train`'s recipe, `epochs` each, so all have the
    same start and the same training; late fusion uses the ego-only model's boxes; `codebooks`:
    (segments, stages, codes) per codebook to train and sweep."""
    split = cfg.dataset.eval_split
    data = InMemoryDataset(build_dataset(cfg.dataset, split), desc=f"read {split}")
    cache: dict = {}
    # every model starts from the demo's max checkpoint, the ego-only one too: its encoder has already
    # learned from every agent's point cloud, so the ego-only baseline is as strong as the others'
    # start (synthetic test split: 0.571 after 3 epochs from max, 0.528 after 6 from the demo's ego-only model)
    tuned = {"none": finetune(cfg, "none", checkpoints["max"], out / "train", epochs, log, cache)}
    tuned["max"] = finetune(cfg, "max", checkpoints["max"], out / "train", epochs, log, cache)
    tuned["where2comm"] = finetune(cfg, "where2comm", checkpoints["max"], out / "train", epochs, log, cache)
    methods: dict[str, Any] = {}
    for name, trained in (("none", tuned.get("none")), ("late", tuned.get("none")), ("early", checkpoints.get("early")),
                          ("max", tuned["max"])):
        if trained is None:
            continue
        methods[name] = _eval(trained, variant(cfg, name), split, data, log, name)

    def sweep(checkpoint: Path, method: str, curve: str, **sections: Any) -> list[dict[str, Any]]:
        """Every threshold, without and with filling (the model is built from each point's config: its
        agent side selects with that point's settings)."""
        entries = []
        for filling in (False, True):
            for threshold in thresholds:
                run = variant(cfg, method, selection={"threshold": threshold, "filling": filling}, **sections)
                entry = _eval(checkpoint, run, split, data, log, f"{curve} thr={threshold} filling={filling}")
                entry["params"]["curve"] = curve + (" + filling" if filling else "")
                entries.append(entry)
        return entries

    points = sweep(tuned["where2comm"], "where2comm", "where2comm")
    for entry in points:
        selection = entry["params"]["selection"]
        if selection["threshold"] == cfg.comm.selection.threshold and not selection["filling"]:
            methods["where2comm"] = entry
    for spec in codebooks:
        checkpoint = finetune(cfg, "codebook", checkpoints["max"], out / "train", epochs, log, cache, codebook=spec)
        points += sweep(checkpoint, "codebook", f"codebook {codebook_name(spec)}", codebook=codebook_shape(spec))
    rep = report({k: {**v, "frames": len(data)} for k, v in methods.items()}, f"{cfg.dataset.format}:{cfg.dataset.root}",
                 split)
    rep["points"] = points
    rep["dense_fp32_bytes_per_agent_frame"] = methods.get("max", {}).get("bytes_per_agent_frame")
    curves: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        curves.setdefault(p["params"]["curve"], []).append(p)
    rep["comparisons"] = {
        # codebook messages against fp32 messages of the same cells, and the cheapest fp32 point of equal AP
        "codebook_vs_where2comm": equal_ap_comparisons(
            [p for name, c in curves.items() if name.startswith("codebook") and "filling" not in name for p in c],
            curves.get("where2comm", [])),
        # every "+ filling" curve against the same messages with plain thresholding (request bytes included)
        "filling_vs_plain": [row for name, c in curves.items() if name.endswith(" + filling")
                             for row in equal_ap_comparisons(c, curves.get(name.removesuffix(" + filling"), []))],
    }
    _log_comparisons("codebook vs Where2comm-style fp32 (bytes per frame, measured):",
                     rep["comparisons"]["codebook_vs_where2comm"], log)
    _log_comparisons("information filling vs plain thresholding:", rep["comparisons"]["filling_vs_plain"], log)
    write_json(out / "comm.json", rep)
    from coperception.viz.curves import plot_ap_vs_bytes

    plot_ap_vs_bytes(rep, out / "comm.png")
    log(f"wrote {out / 'comm.json'} and {out / 'comm.png'}")
    return rep


def _selection_key(entry: dict[str, Any]) -> tuple:
    sel = entry["params"]["selection"]
    return sel["threshold"], sel["top_k"], sel["smooth_sigma"]


def equal_ap_comparisons(candidates: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]],
                         tolerance: float = 0.01) -> list[dict[str, Any]]:
    """For every candidate point: the reference point with the same selection settings, and the cheapest
    reference point whose AP@0.5 is at least the candidate's minus `tolerance`, each with the ratio of
    its bytes per frame to the candidate's (all measured)."""
    out = []
    for p in candidates:
        ap, size = p["ap"]["0.5"], p["bytes_per_frame"]

        def view(q: dict[str, Any]) -> dict[str, Any]:
            return {"curve": q["params"]["curve"], "threshold": q["params"]["selection"]["threshold"],
                    "ap50": q["ap"]["0.5"], "bytes_per_frame": q["bytes_per_frame"], "ap_gap": q["ap"]["0.5"] - ap,
                    "bytes_ratio": q["bytes_per_frame"] / size if size else None}

        same = [q for q in reference if _selection_key(q) == _selection_key(p)]
        near = [q for q in reference if q["ap"]["0.5"] >= ap - tolerance]
        out.append({"curve": p["params"]["curve"], "threshold": p["params"]["selection"]["threshold"], "ap50": ap,
                    "bytes_per_frame": size, "same_selection": view(same[0]) if same else None,
                    "cheapest_within_tolerance": view(min(near, key=lambda q: q["bytes_per_frame"])) if near else None,
                    "tolerance": tolerance})
    return out


def _log_comparisons(title: str, rows: list[dict[str, Any]], log: Callable[[str], None]) -> None:
    log(title)
    for c in rows:
        same, cheapest = c["same_selection"], c["cheapest_within_tolerance"]
        log(f"  {c['curve']:<28} thr={c['threshold']}: AP@0.5 {c['ap50']:.3f} at {c['bytes_per_frame']:.0f} B/frame | "
            + (f"same cells: {same['ap50']:.3f} at {same['bytes_ratio']:.1f}x the bytes | " if same else "")
            + (f"cheapest within {c['tolerance']:.2f}: {cheapest['ap50']:.3f} (thr={cheapest['threshold']}) at "
               f"{cheapest['bytes_ratio']:.1f}x the bytes" if cheapest else "none within tolerance"))


def bench_robustness(cfg: ExperimentConfig, checkpoint: Path, ego_checkpoint: Path | None, out: Path,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """AP@0.5 of the codebook operating point in `cfg` (its fusion, selection and codebook) vs packet loss,
    delay and pose noise."""
    split = cfg.dataset.eval_split
    data = InMemoryDataset(build_dataset(cfg.dataset, split), desc=f"read {split}")
    sweeps: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "loss": [(f"{p}%", {"loss_rate": p / 100}) for p in (0, 10, 30, 50, 100)],
        "delay_ms": [(f"{d} ms", {"latency_ms": float(d)}) for d in (0, 100, 200, 400)],
        # the same delays when the ego ignores messages older than 150 ms
        "delay_ms_max_age_150": [(f"{d} ms", {"latency_ms": float(d), "max_message_age_ms": 150.0})
                                 for d in (0, 100, 200, 400)],
        "pose_noise": [("0", {}), ("0.2 m / 0.2 deg", {"pose_noise_m": 0.2, "pose_noise_deg": 0.2}),
                       ("0.5 m / 1 deg", {"pose_noise_m": 0.5, "pose_noise_deg": 1.0})],
    }
    results: dict[str, list[dict[str, Any]]] = {}
    for sweep, settings in sweeps.items():
        results[sweep] = []
        for label, channel in settings:
            run = cfg.variant(strategy="intermediate", codec="codebook", channel=channel)  # cfg's own fusion
            entry = _eval(checkpoint, run, split, data, log, f"{sweep} {label}")
            entry["params"]["setting"] = label
            results[sweep].append(entry)
    methods = {}
    if ego_checkpoint is not None:
        methods["none"] = {**_eval(ego_checkpoint, variant(cfg, "none"), split, data, log, "ego only"),
                           "frames": len(data)}
    rep = report(methods, f"{cfg.dataset.format}:{cfg.dataset.root}", split)
    rep["frames"] = len(data)
    rep["sweeps"] = results
    if "none" in methods:
        total_loss, ego = results["loss"][-1]["ap"]["0.5"], methods["none"]["ap"]["0.5"]
        rep["total_loss_vs_ego_only"] = {"ap50_at_total_loss": total_loss, "ap50_ego_only": ego, "gap": total_loss - ego}
        log(f"100 % loss: AP@0.5 {total_loss:.3f} vs ego-only model {ego:.3f} ({total_loss - ego:+.3f})")
    write_json(out / "robustness.json", rep)
    from coperception.viz.curves import plot_robustness

    plot_robustness(rep, out / "robustness.png")
    log(f"wrote {out / 'robustness.json'} and {out / 'robustness.png'}")
    return rep


def bench_attack(cfg: ExperimentConfig, checkpoints: dict[str, Path], out: Path, ghosts: int,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """For each checkpoint (name -> intermediate-fusion checkpoint, evaluated with its stored fusion and
    `cfg`'s cell codec): AP@0.5 honest and with one lying sender (`GhostAttack`), each without and with
    `comm.consistency`. Messages go through the wire format and the channel, so the codec must send
    cells (`sparse` or `codebook`)."""
    if cfg.comm.codec == "dense":
        raise ConfigError("bench attack: comm.codec dense is delivered without the wire format; use sparse or codebook")
    split = cfg.dataset.eval_split
    data = InMemoryDataset(build_dataset(cfg.dataset, split), desc=f"read {split}")
    rows: dict[str, dict[str, Any]] = {}
    for name, checkpoint in checkpoints.items():
        trained = with_trained_fusion(cfg.variant(strategy="intermediate"), checkpoint)
        rows[name] = {}
        for attacked in (False, True):
            for checked in (False, True):
                key = f"{'attacked' if attacked else 'honest'}_{'checked' if checked else 'unchecked'}"
                rows[name][key] = _eval(checkpoint, trained.variant(consistency={"enabled": checked}), split, data, log,
                                        f"{name} {key}", GhostAttack(ghosts=ghosts) if attacked else None)
    rep = report({}, f"{cfg.dataset.format}:{cfg.dataset.root}", split)
    rep.update(frames=len(data), methods=rows,
               attack={"kind": "ghosts", "ghosts_per_message": ghosts, "sender": "the first sender of every frame"},
               consistency=cfg.comm.consistency.model_dump(mode="json") | {"enabled": "per row"})
    write_json(out / "attack.json", rep)
    return rep


# the conditions of `bench fusion`: the channel settings of each column
FUSION_CONDITIONS: list[tuple[str, dict[str, Any]]] = [
    ("clean", {}),
    ("delay 100 ms", {"latency_ms": 100.0}), ("delay 200 ms", {"latency_ms": 200.0}), ("delay 400 ms", {"latency_ms": 400.0}),
    ("30 % burst loss", {"loss_rate": 0.3}),
    ("pose 0.2 m / 0.2 deg", {"pose_noise_m": 0.2, "pose_noise_deg": 0.2}),
    ("pose 0.5 m / 1 deg", {"pose_noise_m": 0.5, "pose_noise_deg": 1.0}),
]


def fusion_ms(model: Any, cfg: ExperimentConfig, agents: int = 4, runs: int = 20, motion_objects: int = 5
              ) -> dict[str, float]:
    """Median milliseconds of the ego side (`fusion`: the one warp, motion compensation when `cfg` turns it
    on, the fusion) for one frame of `agents` views at the model's BEV size, on the model's device, no
    gradients; and of what a sender computes for it beside its features: `sender_uncertainty` (MC-dropout
    passes, a fusion that uses uncertainty) and `sender_motion` (its own boxes and their tracking)."""
    import numpy as np
    import torch

    from coperception.device import synchronize
    from coperception.export.latency import time_runs
    from coperception.pipeline.ego import Delivery

    assert model.ego is not None
    device = next(model.parameters()).device
    grid = model.feature_grid
    g = torch.Generator().manual_seed(0)
    C = model.encoders.out_channels
    feats = torch.rand(agents, C, grid.height, grid.width, generator=g).to(device)
    T = torch.eye(4).repeat(agents, 1, 1)
    T[1:, 0, 3] = torch.linspace(-20, 20, agents - 1)
    motion = None
    if cfg.fusion.motion.enabled:
        rng = np.random.default_rng(0)
        objects = np.column_stack([rng.uniform(-40, 40, (motion_objects, 2)), rng.uniform(-15, 15, (motion_objects, 2)),
                                   np.full((motion_objects, 2), [4.5, 1.9]), rng.uniform(0, np.pi, motion_objects)])
        motion = [None] + [torch.from_numpy(objects).float().to(device)] * (agents - 1)
    unc = torch.rand(agents, 2, grid.height, grid.width, generator=g).to(device) if model.uncertainty is not None else None
    delivery = Delivery(feats, None, [agents], T.to(device), torch.tensor([0.0] + [0.2] * (agents - 1), device=device),
                        torch.zeros(agents, dtype=torch.int64, device=device), unc, motion)
    def median_ms(step: Callable[[], Any]) -> float:
        with torch.no_grad():
            return time_runs(lambda: (step(), synchronize(device)), runs, warmup=3)[0]["median_ms"]

    out = {"fusion": median_ms(lambda: model.ego(delivery, model.head.confidence_map))}
    one = feats[1:2]
    if model.uncertainty is not None:
        out["sender_uncertainty"] = median_ms(lambda: model.sent_uncertainty(one))
    if cfg.fusion.motion.enabled:
        from coperception.fusion.motion import MotionTracker

        tracker = MotionTracker(cfg.fusion.motion)
        clock = iter(np.arange(10_000) * 0.1)
        out["sender_motion"] = median_ms(lambda: tracker.update(
            model.boxes(one, cfg.eval.score_threshold, cfg.eval.nms_threshold)[0][:, :2], float(next(clock))))
    return out


def bench_fusion(cfg: ExperimentConfig, checkpoints: dict[str, Path], ego_checkpoint: Path | None, out: Path,
                 fusions: Sequence[str], epochs: int, log: Callable[[str], None] = print,
                 seeds: Sequence[int] | None = None, threshold: float | None = None) -> dict[str, Any]:
    """Every fusion in `fusions` fine-tuned from the demo's max checkpoint with `cfg.train`'s recipe on
    `cfg`'s codebook messages (existing runs under `out/fusion/train` are reused), once per training seed
    of `seeds` (default: `cfg.train.seed`), each evaluated without and with motion compensation under
    every condition of `FUSION_CONDITIONS`; a row of several seeds reports their mean, each seed's AP and
    the spread. Late fusion of the ego-only model's boxes (through the channel) the same way, and early
    fusion's points (no motion compensation: its senders run no detector); ego-only beside them.
    `threshold`: the selection threshold of the evaluated messages (training keeps `cfg`'s)."""
    seeds = list(seeds) if seeds else [cfg.train.seed]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"bench fusion: seeds {seeds} repeat a seed")
    split = cfg.dataset.eval_split
    data = InMemoryDataset(build_dataset(cfg.dataset, split), desc=f"read {split}")
    cache: dict = {}
    train_dir = out / "fusion" / "train"
    store = EvaluationStore(out / "fusion" / "evaluations.json")
    methods: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}

    def conditions(checkpoint: Path, run: ExperimentConfig, label: str) -> dict[str, dict[str, Any]]:
        evaluated = run if threshold is None else run.variant(selection={"threshold": threshold})
        return under_conditions(checkpoint, evaluated, label, split, data, log, store)

    if ego_checkpoint is not None:
        alone = variant(cfg, "none")
        methods["none"] = store.entry(ego_checkpoint, alone, lambda: _eval(ego_checkpoint, alone, split, data, log, "none"),
                                      log, "none")
        for motion in (False, True):
            label = "late" + (" + motion" if motion else "")
            entries = conditions(ego_checkpoint, with_motion(variant(cfg, "late"), cfg, motion), label)
            rows[label] = {"checkpoint": str(ego_checkpoint), "conditions": entries}
            methods.setdefault(label, entries["clean"])
    if "early" in checkpoints:  # the demo's early model: its points through the channel under every condition
        entries = conditions(checkpoints["early"], variant(cfg, "early"), "early")
        rows["early"] = {"checkpoint": str(checkpoints["early"]), "conditions": entries}
        methods["early"] = entries["clean"]
    for fusion in fusions:
        per_seed: dict[str, dict[int, tuple[Path, dict[str, dict[str, Any]]]]] = {}
        for seed in seeds:
            checkpoint, run, labels = trained_fusion(cfg, fusion, seed, checkpoints, ego_checkpoint, train_dir, epochs,
                                                     log, cache)
            for motion, label in zip((False, True), labels):
                base = with_motion(run, cfg, motion)
                entries = conditions(checkpoint, base, f"{label} (seed {seed})" if len(seeds) > 1 else label)
                if seed == seeds[0]:  # timing depends on the architecture, not on the weights
                    model = load_model(checkpoint, base)
                    entries["clean"]["ms"].update(anchor_ms(model) if fusion == ANCHOR_ROW else fusion_ms(model, base))
                per_seed.setdefault(label, {})[seed] = (checkpoint, entries)
        for label, by_seed in per_seed.items():
            rows[label] = over_seeds(by_seed)
            methods.setdefault(label, rows[label]["conditions"]["clean"])
    rep = report({k: {**v, "frames": len(data)} for k, v in methods.items()}, f"{cfg.dataset.format}:{cfg.dataset.root}",
                 split)
    rep["conditions"] = [c for c, _ in FUSION_CONDITIONS]
    rep["rows"] = rows
    rep["seeds"] = seeds
    evaluated_selection = cfg.comm.selection.model_dump() | ({} if threshold is None else {"threshold": threshold})
    rep["operating_point"] = {"codec": "codebook", "codebook": cfg.comm.codebook.model_dump(),
                              "selection": evaluated_selection, "training_threshold": cfg.comm.selection.threshold}
    ego = methods.get("none", {}).get("ap", {}).get("0.5")
    if ego is not None:
        for label, row in rows.items():
            row["below_ego_only"] = [c for c, e in row["conditions"].items() if e["ap"]["0.5"] < ego]
            row["loss_vs_clean"] = losses_vs_clean(row["conditions"])
            if "seeds" in row:
                per = row["per_seed"]
                row["loss_vs_clean_per_seed"] = {s: losses_vs_clean(per[s]) for s in per}
                row["below_ego_only_any_seed"] = [c for c in rep["conditions"]
                                                  if any(per[s][c]["ap"]["0.5"] < ego for s in per)]
    for label, row in rows.items():
        if len(row.get("seeds", ())) > 1:
            log(f"{label:<28} AP@0.5 mean over seeds {row['seeds']}: " + "  ".join(
                f"{c} {e['ap']['0.5']:.3f}±{e['ap_std']['0.5']:.3f}" for c, e in row["conditions"].items()))
    write_json(out / "fusion.json", rep)
    from coperception.viz.curves import plot_fusion

    plot_fusion(rep, out / "fusion.png")
    log(f"wrote {out / 'fusion.json'} and {out / 'fusion.png'}")
    return rep


def seeded_name(name: str, seed: int) -> str:
    """The run folder of `name` trained with `seed` (seed 0 keeps the plain name)."""
    return name if seed == 0 else f"{name}_seed{seed}"


def losses_vs_clean(entries: dict[str, dict[str, Any]]) -> dict[str, float]:
    """AP@0.5 lost under each condition from the clean one."""
    clean = entries["clean"]["ap"]["0.5"]
    return {c: clean - e["ap"]["0.5"] for c, e in entries.items() if c != "clean"}


def mean_of_entries(entries: Sequence[Any]) -> Any:
    """The mean of several evaluation entries of the same shape: every number averaged over the entries
    that have it, anything else (names, settings, lists) taken from the first."""
    first = entries[0]
    if isinstance(first, dict):
        return {k: mean_of_entries([e[k] for e in entries if isinstance(e, dict) and k in e]) for k in first}
    numbers = [float(e) for e in entries if isinstance(e, (int, float)) and not isinstance(e, bool)]
    others = [e for e in entries if e is not None and not isinstance(e, (int, float))]
    if numbers and not others and not isinstance(first, bool):
        return sum(numbers) / len(numbers)
    return first


def over_seeds(by_seed: dict[int, tuple[Path, dict[str, dict[str, Any]]]]) -> dict[str, Any]:
    """One `bench fusion` row from its runs of several training seeds: per condition the mean entry, its AP's
    sample standard deviation over the seeds (`ap_std`, with two seeds or more) and each seed's AP (`per_seed`)."""
    seeds = list(by_seed)
    conditions: dict[str, dict[str, Any]] = {}
    for condition in by_seed[seeds[0]][1]:
        entries = [by_seed[s][1][condition] for s in seeds]
        mean = mean_of_entries(entries)
        if mean.get("bytes_per_frame"):  # the log of the mean bytes (the mean of the seeds' logs is not it)
            mean["log2_bytes_per_frame"] = math.log2(mean["bytes_per_frame"])
        if len(entries) > 1:
            mean["ap_std"] = {iou: statistics.stdev(e["ap"][iou] for e in entries) for iou in mean["ap"]}
        conditions[condition] = mean
    return {"checkpoint": str(by_seed[seeds[0]][0]), "checkpoints": {str(s): str(by_seed[s][0]) for s in seeds},
            "seeds": seeds, "conditions": conditions,
            "per_seed": {str(s): {c: {"ap": e["ap"], "bytes_per_agent_frame": e["bytes_per_agent_frame"]}
                                  for c, e in by_seed[s][1].items()} for s in seeds}}


def with_motion(run: ExperimentConfig, cfg: ExperimentConfig, enabled: bool) -> ExperimentConfig:
    """`run` with `cfg`'s motion-compensation settings, switched on or off."""
    return run.model_copy(update={"fusion": run.fusion.model_copy(update={
        "motion": cfg.fusion.motion.model_copy(update={"enabled": enabled})})})


def under_conditions(checkpoint: Path, base: ExperimentConfig, label: str, split: str, data: CooperativeDataset,
                     log: Callable[[str], None], store: EvaluationStore | None = None) -> dict[str, dict[str, Any]]:
    """`checkpoint` evaluated as `base` describes under every channel condition of `FUSION_CONDITIONS`
    (with `store`: what it holds is not evaluated again)."""
    entries = {}
    for condition, channel in FUSION_CONDITIONS:
        run, name = base.variant(channel=channel), f"{label:<28} {condition}"
        evaluate = partial(_eval, checkpoint, run, split, data, log, name)
        entry = evaluate() if store is None else store.entry(checkpoint, run, evaluate, log, name)
        entry["params"]["condition"] = condition
        entries[condition] = entry
    return entries


ANCHOR_ROW = "anchor"  # `bench fusion`'s name of the anchor-centric row
ANCHOR_LR = 1e-3  # the refinement trains from scratch on a frozen detector: twice the fusions' fine-tuning rate


def trained_fusion(cfg: ExperimentConfig, fusion: str, seed: int, checkpoints: dict[str, Path],
                   ego_checkpoint: Path | None, train_dir: Path, epochs: int, log: Callable[[str], None], cache: dict
                   ) -> tuple[Path, ExperimentConfig, tuple[str, str]]:
    """One `bench fusion` method fine-tuned with training seed `seed` (an existing run reused): its
    checkpoint, the config it runs with and the labels of its rows without and with motion compensation.
    Feature fusions start from the demo's max checkpoint on codebook messages; anchor-centric cooperation
    (`ANCHOR_ROW`) from the ego-only model (the one the late row sends boxes of), frozen, training only
    its anchor coder and refinement with `cfg.train`'s delays."""
    if fusion == ANCHOR_ROW:
        if ego_checkpoint is None:
            raise ConfigError("bench fusion: the anchor-centric row starts from the ego-only checkpoint "
                              "(--ego-checkpoint)")
        run = cfg.variant(strategy="anchor", train={"freeze_detector": True, "lr": ANCHOR_LR, "seed": seed})
        start, labels = ego_checkpoint, ("anchor-centric", "anchor-centric + motion")
    else:
        run = cfg.variant(strategy="intermediate", codec="codebook", fusion=fusion, train={"seed": seed})
        start, labels = checkpoints["max"], (fusion, fusion + " + motion")
    checkpoint = finetune_fusion(run, seeded_name(fusion, seed), start, train_dir, epochs, log, cache)
    return checkpoint, with_trained_fusion(run, checkpoint), labels  # the settings it was trained with


def anchor_ms(model: Any, senders: int = 3, runs: int = 20) -> dict[str, float]:
    """Median milliseconds of the anchor-centric ego side (`fusion`: refinement of its most confident
    anchors and `senders` full messages, then NMS) and of a sender's coding of its anchors
    (`sender_anchors`), on random anchors around the ego, no gradients."""
    import torch

    from coperception.device import synchronize
    from coperception.export.latency import time_runs
    from coperception.fusion.anchor_centric import ReceivedAnchors, cells_at
    from coperception.pipeline.anchor_exchange import refined_detections
    from coperception.types import AnchorSet

    fusion = model.anchor_fusion
    assert fusion is not None
    s = fusion.settings
    device = next(model.parameters()).device
    grid = model.feature_grid
    g = torch.Generator().manual_seed(0)

    def boxes(n: int) -> torch.Tensor:
        centre = (torch.rand(n, 2, generator=g) - 0.5) * torch.tensor([60.0, 40.0])
        return torch.cat([centre, torch.full((n, 1), -1.0), torch.tensor([[4.2, 1.8, 1.6]]).repeat(n, 1),
                          torch.rand(n, 1, generator=g) * 3], dim=1).to(device)

    own_boxes = boxes(s.ego_candidates)
    own = AnchorSet(own_boxes, torch.randn(len(own_boxes), generator=g).to(device), cells_at(grid, own_boxes[:, :2])[0])
    m = senders * s.max_anchors
    received = ReceivedAnchors(boxes(m), torch.randn(m, generator=g).to(device),
                               torch.randn(m, s.feature_dim, generator=g).to(device), torch.full((m,), 0.1, device=device),
                               torch.zeros(m, dtype=torch.int64, device=device))
    C = model.encoders.out_channels
    feats = torch.rand(1, C, grid.height, grid.width, generator=g).to(device)
    anchor_feats = torch.rand(s.max_anchors, C, generator=g).to(device)

    def median_ms(step: Callable[[], Any]) -> float:
        with torch.no_grad():
            return time_runs(lambda: (step(), synchronize(device)), runs, warmup=3)[0]["median_ms"]

    return {"fusion": median_ms(lambda: refined_detections(fusion.refine(feats, grid, [own], [received])[0], 0.2,
                                                           fusion.nms_threshold, s.merge_iou)),
            "sender_anchors": median_ms(lambda: fusion.code(anchor_feats))}


def finetune_fusion(cfg: ExperimentConfig, name: str, start: Path, out_dir: Path, epochs: int,
                    log: Callable[[str], None], sample_cache: dict | None = None) -> Path:
    """`cfg` fine-tuned from `start` for `epochs` into `out_dir/<name>`; an existing last.pt of the same
    training seed is reused (one of another seed is refused)."""
    target = out_dir / name / "last.pt"
    if target.is_file():
        stored = load_checkpoint(target).get("config")
        seed = stored.get("train", {}).get("seed") if isinstance(stored, dict) else None
        if seed is not None and seed != cfg.train.seed:
            raise ConfigError(f"{target} was trained with seed {seed}, not {cfg.train.seed}: move it away or "
                              "choose another --out")
        log(f"reusing {target}")
        return target
    run = cfg.variant(train={"out_dir": str(target.parent), "epochs": epochs, "init_from": str(start),
                             "validate_each_epoch": False})
    log(f"fine-tuning {name} from {start} ({epochs} epochs, seed {cfg.train.seed})")
    train(run, sample_cache=sample_cache, progress=False, overwrite=True)
    return target

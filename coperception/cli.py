"""The `coperception` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from coperception.errors import CoperceptionError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Cooperative V2X perception with measured, compressed message passing.")
# one `--device` for every command that runs a model: it sets train.device, which evaluation uses too
DEVICE_OPTION = typer.Option(None, "--device", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N; sets "
                             "train.device, which evaluation uses too.")


def _fail(exc: CoperceptionError) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def simulate(
    out: Path = typer.Option(..., "--out", help="Output folder (must be empty or absent)."),
    fmt: str = typer.Option("opv2v", "--format", help="opv2v | dair-v2x"),
    scenarios: Optional[int] = typer.Option(None, help="Total scenarios, shared out over train/validate/test "
                                            "in the config's proportions (default: the config's counts)."),
    frames: Optional[int] = typer.Option(None, help="Frames per scenario at 10 Hz (default: config)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default: config)."),
    workers: int = typer.Option(1, help="Worker processes (OPV2V layout only)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment YAML with a `simulator` section."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value, e.g. simulator.lidar.beams=64."),
) -> None:
    """Generate the synthetic cooperative world in the exact OPV2V or DAIR-V2X-C layout."""
    from coperception.config import load_config
    from coperception.datasets.sim import simulate as run_simulation

    try:
        cfg = load_config(config, overrides)
        if fmt not in ("opv2v", "dair-v2x"):
            raise CoperceptionError(f"--format {fmt!r}: expected 'opv2v' or 'dair-v2x'")
        path = run_simulation(fmt, out, cfg.simulator, scenarios=scenarios, frames=frames, seed=seed,  # type: ignore[arg-type]
                              workers=workers)
    except CoperceptionError as exc:
        _fail(exc)
    typer.echo(f"wrote {fmt} dataset to {path}")


@app.command()
def inspect(
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment YAML (its `dataset` section)."),
    split: str = typer.Option("test", help="Split to read."),
    root: Optional[Path] = typer.Option(None, help="Dataset root (default: dataset.root)."),
    out: Optional[Path] = typer.Option(None, help="Write the statistics as JSON here."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value."),
) -> None:
    """Read a split through the loaders and report how cooperation changes visibility."""
    import json

    from coperception.config import load_config
    from coperception.datasets.readers import build_dataset
    from coperception.datasets.stats import visibility_stats
    from coperception.io import write_json

    try:
        cfg = load_config(config, overrides)
        dataset = build_dataset(cfg.dataset, split, str(root) if root else None)
        stats = visibility_stats(dataset, cfg.dataset.gt_range())
    except CoperceptionError as exc:
        _fail(exc)
    if out:
        write_json(out, stats)
    typer.echo(json.dumps(stats, indent=2))


@app.command()
def train(
    config: Path = typer.Option(..., "--config", help="Experiment YAML."),
    device: Optional[str] = DEVICE_OPTION,
    overrides: list[str] = typer.Option([], "--set", help="Override a config value, e.g. train.epochs=5."),
    resume: bool = typer.Option(False, "--resume", help="Continue from <train.out_dir>/last.pt at its saved step."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in a non-empty train.out_dir."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train the configured cooperation method; `torchrun --nproc_per_node N` runs it with DDP."""
    import json

    from coperception.config import load_config
    from coperception.io import write_json
    from coperception.pipeline.model import validate_config
    from coperception.train import train as run_training

    try:
        cfg = load_config(config, _with_device(overrides, device))
        validate_config(cfg)
        summary = run_training(cfg, resume=resume, progress=progress, overwrite=overwrite)
    except CoperceptionError as exc:
        _fail(exc)
    if summary["rank"] == 0:
        write_json(Path(cfg.train.out_dir) / "summary.json", summary)
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


def _stored_config(checkpoint: Path, overrides: list[str], hint: str = "; pass --config"):
    """The config `checkpoint` was trained with, with `overrides` (a `CoperceptionError` when it holds none)."""
    from coperception.checkpoint import load_checkpoint
    from coperception.config import config_from_dict

    stored = load_checkpoint(checkpoint).get("config")
    if not isinstance(stored, dict):
        raise CoperceptionError(f"{checkpoint}: holds no config{hint}")
    return config_from_dict(stored, overrides, f"{checkpoint} (stored config)")


@app.command("eval")
def evaluate(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A checkpoint written by `coperception train`."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Instead of a checkpoint: a `coperception export` folder, "
                                        "run with onnxruntime (its agent and ego graphs)."),
    split: Optional[str] = typer.Option(None, help="Split to evaluate (default: dataset.eval_split)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment YAML (default: the one stored in "
                                          "the checkpoint)."),
    strategy: Optional[str] = typer.Option(None, help="Cooperation strategy (default: the one the checkpoint was "
                                           "trained for); e.g. `late` with an ego-only checkpoint."),
    out: Optional[Path] = typer.Option(None, help="JSON report path (default: next to the checkpoint)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N frames."),
    save_predictions: Optional[Path] = typer.Option(None, "--save-predictions", help="Also write every frame's "
                                                    "predictions and fused message cells as JSON (for `viz`)."),
    device: Optional[str] = DEVICE_OPTION,
    overrides: list[str] = typer.Option([], "--set", help="Override a config value."),
) -> None:
    """Evaluate a checkpoint: AP (global sort and OpenCOOD per-frame sort), measured bytes, ms per stage."""
    from coperception.config import load_config
    from coperception.evaluate import evaluate_method, format_table, report, save_predictions as write_predictions
    from coperception.io import write_json
    from coperception.pipeline.model import load_model, method_label

    try:
        if (checkpoint is None) == (onnx is None):
            raise CoperceptionError("give either --checkpoint or --onnx")
        if onnx is not None:
            from coperception.export.runtime import OnnxRuntimeModel, load_export_config

            cfg = load_config(config, overrides) if config is not None else load_export_config(onnx, overrides)
            ort_model = OnnxRuntimeModel(onnx, cfg)
            name = f"{method_label(cfg)}-onnx-{ort_model.spec['precision'].split()[0]}"
            chosen = split or cfg.dataset.eval_split
            entry = evaluate_method(ort_model, cfg, chosen, limit=limit)  # type: ignore[arg-type]
            rep = report({name: entry}, f"{cfg.dataset.format}:{cfg.dataset.root}", chosen)
            target = out or onnx / f"eval_{name}_{chosen}.json"
            write_json(target, rep)
            typer.echo(format_table(rep))
            typer.echo(f"wrote {target}")
            return
        assert checkpoint is not None
        if config is not None:
            cfg = load_config(config, _with_device(overrides, device))
        else:
            cfg = _stored_config(checkpoint, _with_device(overrides, device))
        if strategy:
            cfg = cfg.variant(strategy=strategy)
        name = method_label(cfg)
        model = load_model(checkpoint, cfg)
        chosen = split or cfg.dataset.eval_split
        entry = evaluate_method(model, cfg, chosen, limit=limit, keep_detections=save_predictions is not None)
        rep = report({name: entry}, f"{cfg.dataset.format}:{cfg.dataset.root}", chosen)
        target = out or checkpoint.with_name(f"eval_{name}_{chosen}.json")
        write_json(target, rep)
        if save_predictions is not None:
            write_predictions(save_predictions, entry, model.feature_grid if model.agent is not None else None)
            typer.echo(f"wrote {save_predictions}")
    except CoperceptionError as exc:
        _fail(exc)
    typer.echo(format_table(rep))
    typer.echo(f"wrote {target}")


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that write JSON reports (+ PNG) under outputs/bench/.")
app.add_typer(bench_app, name="bench")


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CoperceptionError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CoperceptionError(f"{option} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not values:
        raise CoperceptionError(f"{option} {text!r}: expected at least one integer")
    return values


def _codebook_specs(text: str) -> list[tuple[int, int, int]]:
    specs = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise CoperceptionError(f"--codebooks {item!r}: expected SEGMENTSxSTAGESxCODES, e.g. 4x2x256")
        specs.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return specs


DEMO_RUNS = typer.Option(Path("outputs/demo/train"), help="Folder with the max/ (and early/) runs of `demo`; every "
                         "model the bench fine-tunes starts from max/best.pt.")


def _demo_checkpoints(runs: Path) -> dict[str, Path]:
    """The demo's early and max checkpoints under `runs` (max is required)."""
    checkpoints = {m: runs / m / "best.pt" for m in ("early", "max") if (runs / m / "best.pt").is_file()}
    if "max" not in checkpoints:
        raise CoperceptionError(f"{runs / 'max' / 'best.pt'}: no intermediate-fusion checkpoint; run `coperception demo` first")
    return checkpoints


@bench_app.command("comm")
def bench_comm_command(
    config: Path = typer.Option(Path("configs/synthetic_codebook.yaml"), "--config", help="Experiment YAML; its train "
                                "section is the fine-tuning recipe of every benchmarked model."),
    runs: Path = DEMO_RUNS,
    out: Path = typer.Option(Path("outputs/bench"), help="Report folder."),
    thresholds: str = typer.Option("0.05,0.1,0.2,0.4", help="Selection thresholds to sweep."),
    codebooks: str = typer.Option("2x1x256,4x2x256,8x2x256", help="Codebooks to sweep as SEGMENTSxSTAGESxCODES "
                                  "(one fine-tuned model each)."),
    epochs: Optional[int] = typer.Option(None, help="Fine-tuning epochs of every benchmarked model "
                                         "(default: train.epochs of --config)."),
    device: Optional[str] = DEVICE_OPTION,
    overrides: list[str] = typer.Option([], "--set", help="Override a config value."),
) -> None:
    """AP@0.5 vs measured bytes: baselines, Where2comm-style fp32 messages and codebook messages."""
    from coperception.config import load_config
    from coperception.bench import bench_comm

    try:
        cfg = load_config(config, _with_device(overrides, device))
        checkpoints = _demo_checkpoints(runs)
        bench_comm(cfg, checkpoints, out, _float_list(thresholds), _codebook_specs(codebooks),
                   epochs or cfg.train.epochs, log=typer.echo)
    except CoperceptionError as exc:
        _fail(exc)


@bench_app.command("fusion")
def bench_fusion_command(
    config: Path = typer.Option(Path("configs/synthetic_fusion.yaml"), "--config", help="Experiment YAML: the codebook "
                                "messages and selection every fusion receives, and the fine-tuning recipe of each."),
    runs: Path = DEMO_RUNS,
    ego_checkpoint: Optional[Path] = typer.Option(Path("outputs/bench/train/none/last.pt"), help="Ego-only checkpoint "
                                                  "(ego-only and late rows; default: the one `bench comm` fine-tunes)."),
    fusions: str = typer.Option("max,attention,uncertainty_trust,anchor", help="Fusion methods to fine-tune and "
                                "compare; `anchor`: anchor-centric cooperation, trained on the frozen ego-only model."),
    out: Path = typer.Option(Path("outputs/bench"), help="Report folder (fusion.json, fusion.png; runs under fusion/train)."),
    epochs: Optional[int] = typer.Option(None, help="Fine-tuning epochs of every fusion (default: train.epochs of --config)."),
    seeds: Optional[str] = typer.Option(None, help="Training seeds, e.g. 0,1,2: every fusion is fine-tuned once per "
                                        "seed and its rows report the mean, each seed and the spread "
                                        "(default: train.seed of --config)."),
    threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Selection threshold of the evaluated "
                                              "messages; training keeps the config's (default: the config's for both)."),
    device: Optional[str] = DEVICE_OPTION,
    overrides: list[str] = typer.Option([], "--set", help="Override a config value (training and evaluation)."),
) -> None:
    """AP@0.3/0.5/0.7, measured bytes and fusion ms of every fusion, without and with motion compensation,
    on a clean channel and under delay, burst loss and pose noise."""
    from coperception.bench import ANCHOR_ROW, bench_fusion
    from coperception.config import load_config
    from coperception.fusion.base import FUSIONS

    try:
        cfg = load_config(config, _with_device(overrides, device))
        names = [f.strip() for f in fusions.split(",") if f.strip()]
        for name in names:
            if name != ANCHOR_ROW:
                FUSIONS.get(name)
        checkpoints = _demo_checkpoints(runs)
        ego = ego_checkpoint if ego_checkpoint is not None and ego_checkpoint.is_file() else None
        bench_fusion(cfg, checkpoints, ego, out, names, epochs or cfg.train.epochs, log=typer.echo,
                     seeds=_int_list(seeds, "--seeds") if seeds else None, threshold=threshold)
    except CoperceptionError as exc:
        _fail(exc)


@bench_app.command("latency")
def bench_latency_command(
    checkpoint: Path = typer.Option(Path("outputs/bench/train/codebook_8x2x256/last.pt"), help="The torch FP32 model "
                                    "(its stored config is used)."),
    onnx: list[Path] = typer.Option([], "--onnx", help="Export folders to time (repeat: an FP32 and an INT8 one)."),
    out: Path = typer.Option(Path("outputs/bench"), help="Report folder (latency.json)."),
    runs: int = typer.Option(100, help="Timed runs per stage (after 5 warm-up runs)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value."),
) -> None:
    """Milliseconds per stage for torch FP32 and each ONNX export, and the system latency (compute plus the
    transmission of the real bytes at comm.channel.bandwidth_mbps)."""
    from coperception.export.latency import bench_latency
    from coperception.io import read_json

    try:
        cfg = _stored_config(checkpoint, [*overrides, "train.device=cpu"], hint="")
        names = {}
        for folder in onnx:
            precision = read_json(folder / "spec.json")["precision"].split()[0]
            names[f"ort_{precision}" if f"ort_{precision}" not in names else f"ort_{precision}_{folder.name}"] = folder
        bench_latency(cfg, checkpoint, names, out, runs=runs, log=typer.echo)
    except CoperceptionError as exc:
        _fail(exc)
    typer.echo(f"wrote {out / 'latency.json'}")


@bench_app.command("attack")
def bench_attack_command(
    checkpoints: list[Path] = typer.Option([Path("outputs/demo/train/max/best.pt")], "--checkpoint",
                                           help="Intermediate-fusion checkpoint(s); repeat for each fusion to compare."),
    config: Path = typer.Option(Path("configs/synthetic.yaml"), "--config", help="Experiment YAML (its comm section: "
                                "codec, selection, channel, consistency thresholds)."),
    ghosts: int = typer.Option(30, help="Fabricated cells per message of the lying sender."),
    out: Path = typer.Option(Path("outputs/bench"), help="Report folder."),
    device: Optional[str] = DEVICE_OPTION,
    overrides: list[str] = typer.Option(["comm.codec=sparse"], "--set", help="Override a config value (default: "
                                        "comm.codec=sparse, messages through the wire format)."),
) -> None:
    """AP@0.5 when one sender sends well-formed lies (fabricated vehicles), with and without the ego's
    consistency check -> outputs/bench/attack.json."""
    from coperception.bench import bench_attack
    from coperception.config import load_config

    try:
        cfg = load_config(config, _with_device(overrides, device))
        for path in checkpoints:
            if not path.is_file():
                raise CoperceptionError(f"{path}: checkpoint does not exist (run `coperception demo` first)")
        names = [p.parent.name if p.parent.name not in ("", ".") else p.stem for p in checkpoints]
        bench_attack(cfg, dict(zip(names, checkpoints)), out, ghosts, log=typer.echo)
    except CoperceptionError as exc:
        _fail(exc)


@bench_app.command("robustness")
def bench_robustness_command(
    config: Path = typer.Option(Path("configs/synthetic.yaml"), "--config", help="Experiment YAML (its comm section "
                                "is the operating point)."),
    checkpoint: Path = typer.Option(Path("outputs/bench/train/codebook_8x2x256/last.pt"), help="Codebook checkpoint."),
    ego_checkpoint: Optional[Path] = typer.Option(Path("outputs/bench/train/none/last.pt"), help="Ego-only checkpoint "
                                                  "for the reference line (default: the one `bench comm` fine-tunes)."),
    out: Path = typer.Option(Path("outputs/bench"), help="Report folder."),
    device: Optional[str] = DEVICE_OPTION,
    overrides: list[str] = typer.Option([], "--set", help="Override a config value, e.g. comm.selection.threshold=0.2."),
) -> None:
    """AP@0.5 of codebook messages under packet loss, delay and pose noise."""
    from coperception.checkpoint import load_checkpoint
    from coperception.config import CodebookSettings, load_config
    from coperception.bench import bench_robustness, with_trained_fusion

    try:
        cfg = load_config(config, _with_device(overrides, device))
        stored = load_checkpoint(checkpoint).get("config") or {}
        if isinstance(stored.get("comm"), dict) and "codebook" in stored["comm"]:
            cfg.comm.codebook = CodebookSettings.model_validate(stored["comm"]["codebook"])  # the trained codebook's shape
        cfg = with_trained_fusion(cfg, checkpoint)  # and the fusion it was trained with
        ego = ego_checkpoint if ego_checkpoint is not None and ego_checkpoint.is_file() else None
        bench_robustness(cfg, checkpoint, ego, out, log=typer.echo)
    except CoperceptionError as exc:
        _fail(exc)


@app.command()
def demo(
    config: Path = typer.Option(Path("configs/synthetic.yaml"), "--config", help="Experiment YAML."),
    out: Path = typer.Option(Path("outputs/demo"), help="Where checkpoints, the report and the picture go."),
    workers: int = typer.Option(2, help="Simulation worker processes."),
    device: Optional[str] = DEVICE_OPTION,
    overrides: list[str] = typer.Option([], "--set", help="Override a config value, e.g. demo.ego_epochs=2."),
) -> None:
    """The main job on the synthetic world: simulate (if absent) -> train -> evaluate every baseline -> table,
    `report.json` and a BEV picture of a test frame."""
    from coperception.config import load_config
    from coperception.demo import run_demo

    try:
        cfg = load_config(config, _with_device(overrides, device))
        run_demo(cfg, out, workers=workers, log=typer.echo)
    except CoperceptionError as exc:
        _fail(exc)


@app.command("export")
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="An intermediate-fusion checkpoint."),
    out: Path = typer.Option(..., "--out", help="Folder for agent.onnx, ego.onnx and spec.json."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment YAML (default: the checkpoint's)."),
    int8: bool = typer.Option(False, "--int8", help="W8A8 post-training quantization with explicit Q/DQ."),
    calib_frames: int = typer.Option(32, "--calib-frames", help="Training frames for the INT8 calibration."),
    calibration: str = typer.Option("percentile", help="Activation ranges: percentile (99.99th, the best measured "
                                    "AP here), minmax or mse."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="Also build TensorRT engines (needs tensorrt; "
                                  "otherwise prints the trtexec commands)."),
    pillar_capacity: Optional[int] = typer.Option(None, "--pillar-capacity", min=1, help="Pillar slots of the agent "
                                                  "graph (default: 1.5x the fullest view of 64 training frames spread over the split)."),
    code_cells: int = typer.Option(512, "--code-cells", min=1, help="The agent graph codes its this many most "
                                   "confident cells (a selected cell beyond them is coded outside the graph)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value."),
) -> None:
    """Export the agent graph (pillars -> features, confidence, codes) and the ego graph (warp -> fusion ->
    head) to ONNX, write their spec and check both with onnxruntime."""
    from coperception.config import load_config
    from coperception.export.onnx import export_model

    try:
        if calibration not in ("minmax", "percentile", "mse"):
            raise CoperceptionError(f"--calibration {calibration!r}: expected minmax, percentile or mse")
        if config is not None:
            cfg = load_config(config, overrides)
        else:
            cfg = _stored_config(checkpoint, [*overrides, "train.device=cpu"])
        export_model(checkpoint, cfg, out, int8, calib_frames, calibration, log=typer.echo,  # type: ignore[arg-type]
                     capacity=pillar_capacity, code_cells=code_cells)
        if tensorrt:
            from coperception.export.tensorrt import build_engines

            typer.echo("wrote " + ", ".join(str(p) for p in build_engines(out, int8)))
    except CoperceptionError as exc:
        _fail(exc)
    typer.echo(f"wrote {out / 'agent.onnx'}, {out / 'ego.onnx'} and {out / 'spec.json'}")


viz_app = typer.Typer(no_args_is_help=True, help="Pictures: BEV frames, animations, benchmark plots.")
app.add_typer(viz_app, name="viz")
VIZ_CONFIG = typer.Option(Path("configs/synthetic.yaml"), "--config", help="Experiment YAML (dataset, and the "
                          "cooperation a --checkpoint is evaluated with).")
VIZ_INDEX = typer.Option(None, "--index", help="Frame index in the split (default: the middle one).")
VIZ_SPLIT = typer.Option(None, help="Split (default: dataset.eval_split).")
VIZ_PREDICTIONS = typer.Option(None, "--predictions", help="A `coperception eval --save-predictions` file.")
VIZ_CHECKPOINT = typer.Option(None, "--checkpoint", help="Evaluate this checkpoint up to the frame instead.")
VIZ_RANGE = typer.Option(None, "--range", help="Zoom: x0,y0,x1,y1 in metres of the ego frame (default: "
                         "the evaluation range).")
VIZ_FULL = typer.Option(False, "--full", help="Show everything, not only the evaluation range.")


def _viz_range(text: str | None, full: bool, cfg) -> list[float] | None:
    if full:
        return None
    if text is None:
        return list(cfg.dataset.eval_range)
    values = _float_list(text)
    if len(values) != 4 or values[0] >= values[2] or values[1] >= values[3]:
        raise CoperceptionError(f"--range {text!r}: expected x0,y0,x1,y1 with x0 < x1 and y0 < y1")
    return values


def _one_view(config: Path, overrides: list[str], split: str | None, index: int | None, predictions: Path | None,
              checkpoint: Path | None):
    """The config and the `FrameView` of frame `index` (default: the middle one) of `split`."""
    from coperception.config import load_config
    from coperception.datasets.readers import build_dataset
    from coperception.viz.frames import load_views

    cfg = load_config(config, overrides)
    chosen = split or cfg.dataset.eval_split
    at = index if index is not None else len(build_dataset(cfg.dataset, chosen)) // 2
    return cfg, load_views(cfg, chosen, [at], predictions, checkpoint)[0]


@viz_app.command("frame")
def viz_frame(
    out: Path = typer.Option(..., "--out", help="Picture to write (.png or .svg)."),
    index: Optional[int] = VIZ_INDEX,
    split: Optional[str] = VIZ_SPLIT,
    config: Path = VIZ_CONFIG,
    predictions: Optional[Path] = VIZ_PREDICTIONS,
    checkpoint: Optional[Path] = VIZ_CHECKPOINT,
    view_range: Optional[str] = VIZ_RANGE,
    full: bool = VIZ_FULL,
    iou: float = typer.Option(0.5, help="IoU at which a prediction counts as a true positive."),
    dpi: int = typer.Option(110, help="Resolution of a PNG."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value."),
) -> None:
    """One BEV frame: every agent's points, poses and links, the cells each sender sent (bytes, age), ground
    truth and predictions coloured by match (true positive, false positive, missed) with scores."""
    from coperception.viz.bev import render_frame, save_figure

    try:
        cfg, view = _one_view(config, overrides, split, index, predictions, checkpoint)
        save_figure(render_frame(view, _viz_range(view_range, full, cfg), iou, cfg.dataset.eval_range,
                                 cfg.dataset.gt_range(), dpi=dpi), out)
    except CoperceptionError as exc:
        _fail(exc)
    typer.echo(f"wrote {out}")


@viz_app.command("animate")
def viz_animate(
    out: Path = typer.Option(..., "--out", help="Animated GIF to write (.gif)."),
    start: int = typer.Option(0, help="First frame index in the split."),
    count: int = typer.Option(20, help="Number of frames."),
    fps: float = typer.Option(5.0, help="Frames per second."),
    dpi: int = typer.Option(80, help="Resolution of the frames."),
    split: Optional[str] = typer.Option(None, help="Split (default: dataset.eval_split)."),
    config: Path = VIZ_CONFIG,
    predictions: Optional[Path] = VIZ_PREDICTIONS,
    checkpoint: Optional[Path] = VIZ_CHECKPOINT,
    view_range: Optional[str] = VIZ_RANGE,
    full: bool = VIZ_FULL,
    overrides: list[str] = typer.Option([], "--set", help="Override a config value."),
) -> None:
    """Consecutive frames of a split as an animated GIF (the pictures of `viz frame`)."""
    from coperception.config import load_config
    from coperception.viz.frames import animate, load_views

    try:
        cfg = load_config(config, overrides)
        if count < 1 or fps <= 0:
            raise CoperceptionError("--count must be >= 1 and --fps > 0")
        views = load_views(cfg, split or cfg.dataset.eval_split, list(range(start, start + count)), predictions,
                           checkpoint)
        animate(views, out, _viz_range(view_range, full, cfg), fps, eval_range=cfg.dataset.eval_range,
                gt_range=cfg.dataset.gt_range(), dpi=dpi)
    except CoperceptionError as exc:
        _fail(exc)
    typer.echo(f"wrote {out}")


@viz_app.command("3d")
def viz_3d(
    out: Path = typer.Option(..., "--out", help="Picture to write (.png)."),
    index: Optional[int] = VIZ_INDEX,
    split: Optional[str] = VIZ_SPLIT,
    config: Path = VIZ_CONFIG,
    predictions: Optional[Path] = VIZ_PREDICTIONS,
    checkpoint: Optional[Path] = VIZ_CHECKPOINT,
    view_range: Optional[str] = VIZ_RANGE,
    engine: str = typer.Option("auto", help="open3d (offscreen), matplotlib, or auto: open3d when it can render "
                               "here, else matplotlib."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value."),
) -> None:
    """A 3D view of one frame: points by agent, boxes as line sets coloured by match."""
    from coperception.viz.views import render_3d

    try:
        cfg, view = _one_view(config, overrides, split, index, predictions, checkpoint)
        zoom = _viz_range(view_range, False, cfg) if view_range else None
        drawn = render_3d(view, out, zoom, eval_range=cfg.dataset.eval_range, gt_range=cfg.dataset.gt_range(),
                          engine=engine)
    except CoperceptionError as exc:
        _fail(exc)
    typer.echo(f"wrote {out} with {drawn}")


@viz_app.command("camera")
def viz_camera(
    out: Path = typer.Option(..., "--out", help="Picture to write (.png or .svg)."),
    camera: int = typer.Option(0, help="The ego's camera index."),
    index: Optional[int] = VIZ_INDEX,
    split: Optional[str] = VIZ_SPLIT,
    config: Path = VIZ_CONFIG,
    predictions: Optional[Path] = VIZ_PREDICTIONS,
    checkpoint: Optional[Path] = VIZ_CHECKPOINT,
    overrides: list[str] = typer.Option([], "--set", help="Override a config value."),
) -> None:
    """The ego's camera image with ground truth and predictions projected into it."""
    from coperception.viz.views import render_camera

    try:
        cfg, view = _one_view(config, overrides, split, index, predictions, checkpoint)
        render_camera(view, camera, out, eval_range=cfg.dataset.eval_range, gt_range=cfg.dataset.gt_range())
    except CoperceptionError as exc:
        _fail(exc)
    typer.echo(f"wrote {out}")


@viz_app.command("plots")
def viz_plots(
    bench: Path = typer.Option(Path("outputs/bench"), help="Folder with comm.json and/or robustness.json."),
    fmt: str = typer.Option("png", "--format", help="png or svg."),
) -> None:
    """Redraw the benchmark plots (comm, robustness) from their JSON reports."""
    from coperception.io import read_json
    from coperception.viz.curves import plot_ap_vs_bytes, plot_robustness

    try:
        if fmt not in ("png", "svg"):
            raise CoperceptionError(f"--format {fmt!r}: expected png or svg")
        done = []
        for name, plot in (("comm", plot_ap_vs_bytes), ("robustness", plot_robustness)):
            if (bench / f"{name}.json").is_file():
                plot(read_json(bench / f"{name}.json"), bench / f"{name}.{fmt}")
                done.append(str(bench / f"{name}.{fmt}"))
        if not done:
            raise CoperceptionError(f"{bench}: no comm.json or robustness.json")
    except CoperceptionError as exc:
        _fail(exc)
    typer.echo("wrote " + ", ".join(done))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder: outputs/demo, outputs/bench, ..."),
    out: Optional[Path] = typer.Option(None, help="HTML file (default: RUN_DIR/report.html)."),
) -> None:
    """One self-contained HTML page of a run folder (tables, plots, pictures) that opens offline."""
    from coperception.viz.report import write_report

    try:
        target = write_report(run_dir, out)
    except CoperceptionError as exc:
        _fail(exc)
    typer.echo(f"wrote {target}")


def _with_device(overrides: list[str], device: str | None) -> list[str]:
    return [*overrides, f"train.device={device}"] if device else overrides


def main() -> None:
    app()


if __name__ == "__main__":
    main()

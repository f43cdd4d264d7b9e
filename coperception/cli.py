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


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint written by `coperception train`."),
    split: Optional[str] = typer.Option(None, help="Split to evaluate (default: dataset.eval_split)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Experiment YAML (default: the one stored in "
                                          "the checkpoint)."),
    strategy: Optional[str] = typer.Option(None, help="Cooperation strategy (default: the one the checkpoint was "
                                           "trained for); e.g. `late` with an ego-only checkpoint."),
    out: Optional[Path] = typer.Option(None, help="JSON report path (default: next to the checkpoint)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N frames."),
    device: Optional[str] = DEVICE_OPTION,
    overrides: list[str] = typer.Option([], "--set", help="Override a config value."),
) -> None:
    """Evaluate a checkpoint: AP (global sort and OpenCOOD per-frame sort), measured bytes, ms per stage."""
    from coperception.checkpoint import load_checkpoint
    from coperception.config import config_from_dict, load_config
    from coperception.evaluate import evaluate_method, format_table, report
    from coperception.io import write_json
    from coperception.pipeline.model import load_model, method_label

    try:
        if config is not None:
            cfg = load_config(config, _with_device(overrides, device))
        else:
            stored = load_checkpoint(checkpoint).get("config")
            if not isinstance(stored, dict):
                raise CoperceptionError(f"{checkpoint}: holds no config; pass --config")
            cfg = config_from_dict(stored, _with_device(overrides, device), f"{checkpoint} (stored config)")
        if strategy:
            cfg = cfg.variant(strategy=strategy)
        name = method_label(cfg)
        model = load_model(checkpoint, cfg)
        chosen = split or cfg.dataset.eval_split
        entry = evaluate_method(model, cfg, chosen, limit=limit)
        rep = report({name: entry}, f"{cfg.dataset.format}:{cfg.dataset.root}", chosen)
        target = out or checkpoint.with_name(f"eval_{name}_{chosen}.json")
        write_json(target, rep)
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


def _codebook_specs(text: str) -> list[tuple[int, int, int]]:
    specs = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise CoperceptionError(f"--codebooks {item!r}: expected SEGMENTSxSTAGESxCODES, e.g. 4x2x256")
        specs.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return specs


@bench_app.command("comm")
def bench_comm_command(
    config: Path = typer.Option(Path("configs/synthetic_codebook.yaml"), "--config", help="Experiment YAML; its train "
                                "section is the fine-tuning recipe of every benchmarked model."),
    runs: Path = typer.Option(Path("outputs/demo/train"), help="Folder with the max/ (and early/) runs of `demo`; "
                       "every benchmarked model starts from max/best.pt."),
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
        checkpoints = {m: runs / m / "best.pt" for m in ("early", "max") if (runs / m / "best.pt").is_file()}
        if "max" not in checkpoints:
            raise CoperceptionError(f"{runs / 'max' / 'best.pt'}: no intermediate-fusion checkpoint; run `coperception demo` first")
        bench_comm(cfg, checkpoints, out, _float_list(thresholds), _codebook_specs(codebooks),
                   epochs or cfg.train.epochs, log=typer.echo)
    except CoperceptionError as exc:
        _fail(exc)


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


def _with_device(overrides: list[str], device: str | None) -> list[str]:
    return [*overrides, f"train.device={device}"] if device else overrides


def main() -> None:
    app()


if __name__ == "__main__":
    main()

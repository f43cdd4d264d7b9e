"""Training, checkpoints, resume, DDP and the real-data configs, on tiny simulated data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from coperception.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from coperception.cli import app
from coperception.config import load_config
from coperception.pipeline.model import architecture, build_model, load_model, method_label
from coperception.train import parameter_groups, train

REPO = Path(__file__).resolve().parents[1]
# a small grid and model so a step takes well under a second
TINY = ["dataset.point_cloud_range=[-51.2,-25.6,-3.0,51.2,25.6,1.0]", "dataset.eval_range=[-51.2,-25.6,-3.0,51.2,25.6,1.0]",
        "model.voxel_size=[0.8,0.8,4.0]", "model.pfn_channels=16", "model.layers=[1,1]", "model.strides=[2,2]",
        "model.filters=[16,32]", "model.upsample_filters=[16,16]", "train.batch_size=1", "train.num_workers=0",
        "train.validate_each_epoch=false"]


def tiny_config(opv2v_set, out_dir, *extra):
    root = opv2v_set.root
    return load_config(None, [f"dataset.root={root}", "dataset.train_split=test", "dataset.val_split=test",
                              "dataset.eval_split=test", f"train.out_dir={out_dir}", *TINY, *extra])


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_continues_from_saved_step_and_matches_uninterrupted_run(opv2v_set, tmp_path):
    common = ["train.epochs=2", "cooperation.strategy=intermediate", "train.checkpoint_every=1"]
    full = train(tiny_config(opv2v_set, tmp_path / "full", *common), progress=False)
    assert full["steps"] == 2 * 9 and full["resumed_from"] is None

    interrupted = train(tiny_config(opv2v_set, tmp_path / "cut", *common, "train.max_steps=5"), progress=False)
    assert interrupted["steps"] == 5
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 5
    resumed = train(tiny_config(opv2v_set, tmp_path / "cut", *common), resume=True, progress=False)
    assert resumed["resumed_from"] == 5 and resumed["steps"] == 18

    cfg = tiny_config(opv2v_set, tmp_path / "x", *common)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:  # same data order, same augmentation, same optimiser state -> same weights
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert load_model(tmp_path / "cut" / "last.pt", cfg) is not None


def test_resume_without_checkpoint_is_an_error(opv2v_set, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(tiny_config(opv2v_set, tmp_path / "none"), resume=True, progress=False)


def test_wrong_architecture_and_corrupt_checkpoints_are_refused(opv2v_set, tmp_path):
    cfg = tiny_config(opv2v_set, tmp_path / "a", "cooperation.strategy=none")
    model = build_model(cfg)
    good = tmp_path / "good.pt"
    save_checkpoint(good, arch=architecture(cfg), model=model.state_dict(), extra={"config": cfg.model_dump(mode="json")})
    assert load_model(good, cfg) is not None

    other = tiny_config(opv2v_set, tmp_path / "b", "cooperation.strategy=none", "model.filters=[16,48]")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_model(good, other)

    # same declared architecture, but a tensor of the wrong shape: named, not skipped
    state = model.state_dict()
    state["head.cls.weight"] = torch.zeros(3, 3, 1, 1)
    forged = tmp_path / "forged.pt"
    save_checkpoint(forged, arch=architecture(cfg), model=state, extra={})
    with pytest.raises(CheckpointError, match="head.cls.weight"):
        load_model(forged, cfg)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_model(corrupt, cfg)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": model.state_dict()}, foreign)
    with pytest.raises(CheckpointError, match="not a coperception checkpoint"):
        load_model(foreign, cfg)

    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(corrupt)])
    assert result.exit_code == 2 and "corrupt.pt" in result.output


def test_init_from_copies_weights_into_a_fusion_model(opv2v_set, tmp_path):
    ego = train(tiny_config(opv2v_set, tmp_path / "ego", "cooperation.strategy=none", "train.max_steps=1"), progress=False)
    assert ego["steps"] == 1
    cfg = tiny_config(opv2v_set, tmp_path / "max", "cooperation.strategy=intermediate",
                      f"train.init_from={tmp_path / 'ego' / 'best.pt'}",
                      "train.lr=1e-12", "train.max_steps=1")
    train(cfg, progress=False)
    a = load_checkpoint(tmp_path / "ego" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "max" / "last.pt")["model"]
    conv = "encoders.nets.pointpillars.backbone.blocks.0.0.0.weight"
    torch.testing.assert_close(a[conv], b[conv], rtol=1e-6, atol=1e-8)
    bad = tiny_config(opv2v_set, tmp_path / "bad", "cooperation.strategy=intermediate",
                      f"train.init_from={tmp_path / 'ego' / 'best.pt'}",
                      "model.filters=[16,48]")
    with pytest.raises(CheckpointError, match="another architecture"):
        train(bad, progress=False)


def test_the_fusion_learns_at_its_own_rate_and_resumes_so(opv2v_set, tmp_path):
    cfg = tiny_config(opv2v_set, tmp_path, "cooperation.strategy=intermediate", "fusion.method=attention",
                      "train.fusion_lr_scale=10", "train.max_steps=1")
    train(cfg, progress=False)
    groups = load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    names = [n for n, _ in build_model(cfg).named_parameters()]
    assert len(groups[1]["params"]) == sum(n.startswith("ego.fusion.") for n in names) > 0
    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 2})})
    assert train(longer, resume=True, progress=False)["steps"] == 2
    # scale 1 (or a fusion without weights): one group, as the optimiser states of earlier runs hold
    assert len(parameter_groups(build_model(cfg), 1e-3, 1.0)) == 1


def test_train_and_eval_cli_write_checkpoints_and_a_report(opv2v_set, tmp_path):
    runner = CliRunner()
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"cooperation": {"strategy": "none"}}))
    sets = [a for s in [f"dataset.root={opv2v_set.root}", "dataset.train_split=test", "dataset.val_split=test",
                        "dataset.eval_split=test", f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2", *TINY]
            for a in ("--set", s)]
    result = runner.invoke(app, ["train", "--config", str(cfg_path), "--no-progress", *sets])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "best.pt").is_file()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    for method in ("none", "late"):
        out = tmp_path / f"{method}.json"
        result = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--strategy", method,
                                     "--out", str(out), "--limit", "3"])
        assert result.exit_code == 0, result.output
        report = yaml.safe_load(out.read_text())
        entry = report["methods"][method]
        assert set(entry["ap"]) == {"0.3", "0.5", "0.7"} and set(entry["ap_opencood"]) == {"0.3", "0.5", "0.7"}
        assert "global" in report["protocol"] and report["frames"] == 3
        assert (entry["bytes_per_frame"] > 0) == (method == "late")


def _run_one_step(config_file: Path, data_root: Path, out_dir: Path, splits: str, extra: list[str] = ()) -> dict:
    cfg = load_config(config_file, [f"dataset.root={data_root}", f"dataset.train_split={splits}",
                                    f"dataset.val_split={splits}", f"train.out_dir={out_dir}", "train.max_steps=1",
                                    "train.num_workers=0", "train.batch_size=1", "train.validate_each_epoch=false",
                                    *extra])
    return train(cfg, progress=False)


@pytest.mark.slow  # end to end: `make test` runs it, plain `pytest` skips it
@pytest.mark.parametrize("method", ["none", "early", "late", "max"])
def test_real_data_configs_train_one_step_on_simulated_data(method, opv2v_set, dair_set, tmp_path):
    for folder, data in (("opv2v", opv2v_set), ("dair_v2x", dair_set)):
        path = REPO / "configs" / folder / f"{method}.yaml"
        cfg = load_config(path)
        assert method_label(cfg) == method and cfg.dataset.format == data.dataset_cfg.format
        summary = _run_one_step(path, data.root, tmp_path / folder, "test")
        assert summary["steps"] == 1
        assert np.isfinite(summary["history"][-1]["loss"])
    assert load_config(REPO / "configs" / "opv2v" / "base.yaml").model.voxel_size == (0.4, 0.4, 4.0)


@pytest.mark.slow  # end to end: `make test` runs it, plain `pytest` skips it
@pytest.mark.parametrize("mixed", [False, True])
def test_torchrun_two_processes_ddp(opv2v_set, tmp_path, mixed):
    cfg_path = tmp_path / "ddp.yaml"
    cfg = {"dataset": {"root": str(opv2v_set.root), "train_split": "test", "val_split": "test", "eval_split": "test"},
           "cooperation": {"strategy": "intermediate"}, "fusion": {"method": "max"},
           # the ego-alone loss runs the shared head twice per step: DDP's gradient reduction must take it
           "train": {"out_dir": str(tmp_path / "ddp"), "epochs": 1, "ego_loss_weight": 1.0}}
    if mixed:  # camera cars, LiDAR roadside units: a sample without a roadside unit leaves its encoder idle
        cfg["dataset"]["sensors"] = {"default": ["camera"], "rsu": ["lidar"]}
        cfg["model"] = {"encoders": {"default": "lss", "rsu": "pointpillars"}, "camera": {"image_size": [64, 48]}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [a for s in TINY for a in ("--set", s)]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "coperception.cli", "train", "--config",
           str(cfg_path), "--no-progress", *sets]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = yaml.safe_load((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == 5  # 9 samples over 2 ranks, batch 1 -> ceil(9 / 2) steps each

"""Run folders people can share: one run per folder, what reproduces it kept beside it, readable files,
presets shipped with the package."""

from __future__ import annotations

import json
import os
import stat

import pytest
import yaml
from typer.testing import CliRunner

from coperception.cli import app
from coperception.comm.keys import write_keys
from coperception.config import PACKAGED_CONFIGS, load_config, resolve_config_path
from coperception.errors import ConfigError, OutputError
from coperception.io import write_json
from coperception.train import prepare_run_folder, record_run


def test_non_empty_out_dir_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    prepare_run_folder(run, resume=False, overwrite=False)  # a new folder is made
    assert run.is_dir()
    prepare_run_folder(run, resume=False, overwrite=False)  # an empty one is fine
    (run / "last.pt").write_bytes(b"x")
    (run / "tensorboard").mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"run.*not empty.*--resume.*--overwrite"):
        prepare_run_folder(run, resume=False, overwrite=False)
    prepare_run_folder(run, resume=True, overwrite=False)  # resuming keeps everything
    assert (run / "last.pt").exists()
    prepare_run_folder(run, resume=False, overwrite=True)  # the run's files go, the user's stay
    assert not (run / "last.pt").exists() and not (run / "tensorboard").exists()
    assert (run / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_run_folder(tmp_path / "file", resume=False, overwrite=True)


def test_run_record_keeps_config_command_and_revision(tmp_path):
    cfg = load_config(None, ["train.lr=0.005"])
    record_run(tmp_path, cfg, resume=False)
    record_run(tmp_path, cfg, resume=True)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 0.005
    invocations = json.loads((tmp_path / "run.json").read_text())["invocations"]
    assert [i["resume"] for i in invocations] == [False, True]
    assert invocations[0]["command"] and "git_revision" in invocations[0]
    record_run(tmp_path, cfg, resume=False)  # a fresh run starts a fresh record
    assert len(json.loads((tmp_path / "run.json").read_text())["invocations"]) == 1


def test_cli_train_refuses_an_occupied_out_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"old")
    result = CliRunner().invoke(app, ["train", "--config", "configs/synthetic.yaml", "--set", f"train.out_dir={run}",
                                      "--set", "dataset.root=/nonexistent"])
    assert result.exit_code != 0
    assert "not empty" in result.output and (run / "best.pt").read_bytes() == b"old"


def test_written_files_follow_the_umask_and_keys_stay_private(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "report.json", {"a": 1})
        write_keys(tmp_path / "keys.json", [1, 2])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_presets_ship_with_the_package_and_a_missing_config_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # far from the checkout's configs/ folder
    assert resolve_config_path("configs/opv2v/max.yaml") == PACKAGED_CONFIGS / "opv2v" / "max.yaml"
    assert resolve_config_path("synthetic.yaml") == PACKAGED_CONFIGS / "synthetic.yaml"
    assert load_config("configs/dair_v2x/max.yaml").dataset.format == "dair-v2x"
    with pytest.raises(ConfigError, match=r"missing\.yaml.*does not exist.*synthetic\.yaml"):
        load_config("missing.yaml")
    result = CliRunner().invoke(app, ["demo", "--config", "missing.yaml", "--out", str(tmp_path / "demo")])
    assert result.exit_code != 0 and "missing.yaml" in result.output
    assert not (tmp_path / "demo").exists()

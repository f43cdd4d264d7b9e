"""The benchmark commands on tiny data: report shape (DESIGN §5), curves and pictures."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from coperception.cli import app
from coperception.train import train

from test_comm_pipeline import comm_config
from test_train import TINY


def test_bench_comm_and_robustness_write_reports(opv2v_set, tmp_path):
    runs = tmp_path / "runs"
    for method in ("none", "max"):
        train(comm_config(opv2v_set, runs / method, f"fusion.method={method}", "train.max_steps=2"), progress=False)
    sets = [a for s in [f"dataset.root={opv2v_set.root}", "dataset.eval_split=test", "dataset.val_split=test",
                        "dataset.train_split=test", "train.max_steps=2", *TINY] for a in ("--set", s)]
    out = tmp_path / "bench"
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "comm", "--runs", str(runs), "--out", str(out), "--thresholds", "0.1",
                                 "--codebooks", "2x1x16", "--codebook-epochs", "1", *sets])
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "comm.json").read_text())
    assert {"protocol", "dataset", "split", "frames", "methods", "points"} <= set(rep)
    assert set(rep["methods"]) == {"none", "late", "max", "where2comm"}
    for entry in [*rep["methods"].values(), *rep["points"]]:
        assert set(entry["ap"]) == {"0.3", "0.5", "0.7"} and "bytes_per_agent_frame" in entry and "ms" in entry
    curves = {p["params"]["curve"] for p in rep["points"]}
    assert curves == {"where2comm", "codebook 2x1x16", "codebook 2x1x16 + filling"}
    assert rep["methods"]["max"]["bytes_per_agent_frame"] > rep["methods"]["where2comm"]["bytes_per_agent_frame"]
    assert (out / "comm.png").stat().st_size > 1000

    result = runner.invoke(app, ["bench", "robustness", "--checkpoint", str(out / "train" / "codebook_2x1x16" / "best.pt"),
                                 "--ego-checkpoint", str(runs / "none" / "best.pt"), "--out", str(out), *sets])
    assert result.exit_code == 0, result.output
    rob = json.loads((out / "robustness.json").read_text())
    assert [len(rob["sweeps"][k]) for k in ("loss", "delay_ms", "pose_noise")] == [5, 4, 3]
    at_total_loss = rob["sweeps"]["loss"][-1]
    assert at_total_loss["bytes_per_agent_frame"] == 0.0
    assert (out / "robustness.png").stat().st_size > 1000

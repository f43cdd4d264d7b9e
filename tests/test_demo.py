"""`coperception demo` end to end on a tiny world: simulate -> train -> evaluate -> table, report, picture."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from coperception.cli import app

from test_simulate_cli import SMALL
from test_train import TINY


@pytest.mark.slow  # end to end: `make test` runs it, plain `pytest` skips it
def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    data, out = tmp_path / "world", tmp_path / "demo"
    sets = [a for s in [f"dataset.root={data}", "simulator.scenarios={train: 2, validate: 1, test: 1}", "simulator.frames=2",
                        "demo.ego_epochs=1", "demo.fusion_epochs=1", *TINY] for a in ("--set", s)]
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--workers", "1", *sets, *SMALL])
    assert result.exit_code == 0, result.output
    assert "global sort" in result.output and "early" in result.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"none", "late", "early", "max"}
    assert report["frames"] == 2 and report["split"] == "test"
    assert report["methods"]["none"]["bytes_per_frame"] == 0
    assert report["methods"]["max"]["bytes_per_frame"] > report["methods"]["early"]["bytes_per_frame"] > 0
    assert set(report["seconds"]) == {"simulate", "train", "evaluate", "total"}
    assert (out / "bev_test_frame.png").stat().st_size > 1000
    for method in ("none", "early", "max"):
        assert (out / "train" / method / "best.pt").is_file()

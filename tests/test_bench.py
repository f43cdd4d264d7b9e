"""The benchmark commands on tiny data: report shape (DESIGN §5), curves and pictures."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from coperception.bench import EvaluationStore, equal_ap_comparisons, finetune_fusion, losses_vs_clean, over_seeds
from coperception.checkpoint import load_checkpoint
from coperception.cli import app
from coperception.config import ExperimentConfig
from coperception.errors import ConfigError, DataFormatError
from coperception.train import train
from coperception.viz.curves import plot_fusion

from test_comm_pipeline import comm_config
from test_train import TINY


@pytest.mark.slow  # end to end: `make test` runs it, plain `pytest` skips it
def test_bench_comm_and_robustness_write_reports(opv2v_set, tmp_path):
    runs = tmp_path / "runs"
    train(comm_config(opv2v_set, runs / "max", "cooperation.strategy=intermediate", "train.max_steps=2"), progress=False)
    sets = [a for s in [f"dataset.root={opv2v_set.root}", "dataset.eval_split=test", "dataset.val_split=test",
                        "dataset.train_split=test", "train.max_steps=2", *TINY] for a in ("--set", s)]
    out = tmp_path / "bench"
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "comm", "--runs", str(runs), "--out", str(out), "--thresholds", "0.1",
                                 "--codebooks", "2x1x16", "--epochs", "1", *sets])
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "comm.json").read_text())
    assert {"protocol", "dataset", "split", "frames", "methods", "points"} <= set(rep)
    assert set(rep["methods"]) == {"none", "late", "max", "where2comm"}
    for name in ("none", "max", "where2comm", "codebook_2x1x16"):  # one start and one recipe for all
        stored = load_checkpoint(out / "train" / name / "last.pt")["config"]["train"]
        assert (stored["init_from"], stored["epochs"]) == (str(runs / "max" / "best.pt"), 1)
    for entry in [*rep["methods"].values(), *rep["points"]]:
        assert set(entry["ap"]) == {"0.3", "0.5", "0.7"} and "bytes_per_agent_frame" in entry and "ms" in entry
    curves = {p["params"]["curve"] for p in rep["points"]}
    assert curves == {"where2comm", "where2comm + filling", "codebook 2x1x16", "codebook 2x1x16 + filling"}
    assert rep["methods"]["max"]["bytes_per_agent_frame"] > rep["methods"]["where2comm"]["bytes_per_agent_frame"]
    assert (out / "comm.png").stat().st_size > 1000
    (vs_fp32,) = rep["comparisons"]["codebook_vs_where2comm"]
    assert vs_fp32["curve"] == "codebook 2x1x16" and vs_fp32["same_selection"]["curve"] == "where2comm"
    filling = rep["comparisons"]["filling_vs_plain"]
    assert [(c["curve"], c["same_selection"]["curve"]) for c in filling] == [
        ("where2comm + filling", "where2comm"), ("codebook 2x1x16 + filling", "codebook 2x1x16")]

    result = runner.invoke(app, ["bench", "robustness", "--checkpoint", str(out / "train" / "codebook_2x1x16" / "last.pt"),
                                 "--ego-checkpoint", str(out / "train" / "none" / "last.pt"), "--out", str(out), *sets])
    assert result.exit_code == 0, result.output
    rob = json.loads((out / "robustness.json").read_text())
    assert [len(rob["sweeps"][k]) for k in ("loss", "delay_ms", "pose_noise")] == [5, 4, 3]
    at_total_loss = rob["sweeps"]["loss"][-1]
    assert at_total_loss["bytes_per_agent_frame"] == 0.0
    assert (out / "robustness.png").stat().st_size > 1000


def test_rows_of_several_seeds_report_the_mean_each_seed_and_the_spread(tmp_path):
    def entry(ap50, size, age):
        return {"ap": {"0.5": ap50, "0.7": ap50 / 2}, "bytes_per_agent_frame": size, "mean_fused_age_s": age,
                "bytes_per_frame": 3 * size, "log2_bytes_per_frame": math.log2(3 * size),
                "params": {"condition": "clean", "flag": True}, "ms": {"fusion": 3.0}}

    by_seed = {0: (tmp_path / "a.pt", {"clean": entry(0.70, 500, None), "delay": entry(0.60, 480, 0.1)}),
               5: (tmp_path / "b.pt", {"clean": entry(0.66, 520, 0.0), "delay": entry(0.50, 500, 0.3)})}
    del by_seed[5][1]["clean"]["ms"]  # timed for the first seed only
    row = over_seeds(by_seed)
    assert row["seeds"] == [0, 5] and row["checkpoint"] == str(tmp_path / "a.pt")
    clean, delay = row["conditions"]["clean"], row["conditions"]["delay"]
    assert clean["ap"] == pytest.approx({"0.5": 0.68, "0.7": 0.34}) and clean["bytes_per_agent_frame"] == 510
    assert clean["log2_bytes_per_frame"] == pytest.approx(math.log2(1530))  # of the mean bytes, not a mean of logs
    assert clean["mean_fused_age_s"] == 0.0 and delay["mean_fused_age_s"] == pytest.approx(0.2)  # None is no value
    assert clean["params"] == {"condition": "clean", "flag": True} and clean["ms"] == {"fusion": 3.0}
    assert delay["ap_std"]["0.5"] == pytest.approx(0.0707107, abs=1e-6)
    assert row["per_seed"]["5"]["delay"] == {"ap": {"0.5": 0.50, "0.7": 0.25}, "bytes_per_agent_frame": 500}
    assert losses_vs_clean(row["conditions"]) == {"delay": pytest.approx(0.13)}
    assert "ap_std" not in over_seeds({0: by_seed[0]})["conditions"]["clean"]  # one seed: no spread
    rep = {"conditions": ["clean", "delay"], "rows": {"max": row, "late": {"conditions": by_seed[0][1]}},
           "methods": {"none": {"ap": {"0.5": 0.5}}}}
    plot_fusion(rep, tmp_path / "fusion.png")
    assert (tmp_path / "fusion.png").stat().st_size > 1000


def _point(curve, threshold, ap, size):
    return {"ap": {"0.5": ap}, "bytes_per_frame": size,
            "params": {"curve": curve, "selection": {"threshold": threshold, "top_k": None, "smooth_sigma": 0.0}}}


def test_equal_ap_comparison_pairs_same_cells_and_the_cheapest_fp32_point_within_a_point():
    points = [_point("where2comm", 0.05, 0.70, 80_000), _point("where2comm", 0.1, 0.695, 20_000),
              _point("where2comm", 0.2, 0.60, 5_000), _point("codebook 4x2x256", 0.05, 0.69, 800),
              _point("codebook 4x2x256", 0.2, 0.50, 100)]
    first, second = equal_ap_comparisons(points[3:], points[:3])
    assert first["same_selection"]["threshold"] == 0.05
    assert first["same_selection"]["bytes_ratio"] == 100.0
    assert first["cheapest_within_tolerance"]["threshold"] == 0.1  # 0.695 >= 0.69 - 0.01, 20 KB
    assert first["cheapest_within_tolerance"]["bytes_ratio"] == 25.0
    assert second["cheapest_within_tolerance"]["threshold"] == 0.2  # everything beats AP 0.50
    assert abs(second["same_selection"]["ap_gap"] - 0.10) < 1e-9


def test_an_evaluation_is_stored_and_made_again_only_for_another_model_or_config(tmp_path):
    checkpoint = tmp_path / "last.pt"
    checkpoint.write_bytes(b"weights")
    cfg = ExperimentConfig()
    calls: list[str] = []

    def evaluate(ap: float):
        return lambda: calls.append("run") or {"ap": {"0.5": ap}, "params": {}}

    path = tmp_path / "evaluations.json"
    assert EvaluationStore(path).entry(checkpoint, cfg, evaluate(0.5), print, "x")["ap"]["0.5"] == 0.5
    again = EvaluationStore(path)  # a bench started again reads what the interrupted one measured
    first = again.entry(checkpoint, cfg, evaluate(0.9), print, "x")
    assert first["ap"]["0.5"] == 0.5 and calls == ["run"]
    first["params"]["condition"] = "changed"  # a caller's copy: the store keeps its own
    assert again.entry(checkpoint, cfg, evaluate(0.9), print, "x")["params"] == {}
    assert again.entry(checkpoint, cfg.variant(channel={"latency_ms": 100.0}), evaluate(0.3), print, "x")["ap"]["0.5"] == 0.3
    # the tracker settings of motion compensation matter only while it is on
    def motion(**update: object) -> ExperimentConfig:
        return cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={
            "motion": cfg.fusion.motion.model_copy(update=update)})})

    assert again.entry(checkpoint, motion(gate_m=1.5), evaluate(0.9), print, "x")["ap"]["0.5"] == 0.5
    assert again.entry(checkpoint, motion(enabled=True), evaluate(0.4), print, "x")["ap"]["0.5"] == 0.4
    assert again.entry(checkpoint, motion(enabled=True, gate_m=1.5), evaluate(0.6), print, "x")["ap"]["0.5"] == 0.6
    calls.clear()
    checkpoint.write_bytes(b"retrained weights")  # a new model under the same path
    assert again.entry(checkpoint, cfg, evaluate(0.7), print, "x")["ap"]["0.5"] == 0.7 and calls == ["run"]
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a bench evaluation store"):
        EvaluationStore(path)
    path.write_text("{broken")
    with pytest.raises(DataFormatError, match="invalid JSON"):
        EvaluationStore(path)


@pytest.mark.slow  # end to end: `make test` runs it, plain `pytest` skips it
def test_bench_fusion_compares_fusions_with_and_without_motion_under_every_condition(opv2v_set, tmp_path):
    runs = tmp_path / "runs"
    train(comm_config(opv2v_set, runs / "max", "cooperation.strategy=intermediate", "train.max_steps=2"), progress=False)
    (runs / "max" / "last.pt").rename(runs / "max" / "best.pt")
    train(comm_config(opv2v_set, runs / "early", "cooperation.strategy=early", "train.max_steps=1"), progress=False)
    (runs / "early" / "last.pt").rename(runs / "early" / "best.pt")
    ego = tmp_path / "ego"
    train(comm_config(opv2v_set, ego, "cooperation.strategy=none", "train.max_steps=1"), progress=False)
    sets = [a for s in [f"dataset.root={opv2v_set.root}", "dataset.eval_split=test", "dataset.val_split=test",
                        "dataset.train_split=test", "train.max_steps=2", "comm.codebook.codes=16",
                        "comm.codebook.fit_samples=4", "comm.selection.threshold=0.0", "comm.selection.top_k=40",
                        *TINY] for a in ("--set", s)]
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "fusion", "--runs", str(runs), "--ego-checkpoint", str(ego / "last.pt"),
                                      "--out", str(out), "--fusions", "max,uncertainty_trust,anchor", "--epochs", "1", *sets])
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "fusion.json").read_text())
    assert set(rep["rows"]) == {"late", "late + motion", "early", "max", "max + motion", "uncertainty_trust",
                                "uncertainty_trust + motion", "anchor-centric", "anchor-centric + motion"}
    assert len(rep["conditions"]) == 7 and {"none", "late", "max", "uncertainty_trust"} <= set(rep["methods"])
    for label, row in rep["rows"].items():
        assert list(row["conditions"]) == rep["conditions"]
        clean = row["conditions"]["clean"]
        assert clean["bytes_per_agent_frame"] > 0
        # late fusion merges boxes, early fusion detects from one cloud: no fusion network
        assert label.startswith(("late", "early")) or clean["ms"]["fusion"] > 0
        assert set(row["loss_vs_clean"]) == set(rep["conditions"][1:])
    assert rep["rows"]["uncertainty_trust + motion"]["conditions"]["clean"]["ms"].keys() >= {"sender_uncertainty",
                                                                                              "sender_motion"}
    # the motion section costs bytes; the uncertainty the trust fusion uses too
    rows = rep["rows"]
    early = rows["early"]["conditions"]  # its points go through the channel: a lossy link delivers fewer bytes
    assert early["30 % burst loss"]["bytes_per_agent_frame"] < early["clean"]["bytes_per_agent_frame"]
    assert early["clean"]["mean_fused_age_s"] == 0.0
    for delay in (0.1, 0.2, 0.4):  # the test scenes are short: a late message may never arrive in one
        age = early[f"delay {delay * 1000:.0f} ms"]["mean_fused_age_s"]
        assert age is None or age == pytest.approx(delay)
    assert rows["max + motion"]["conditions"]["clean"]["bytes_per_frame"] >= rows["max"]["conditions"]["clean"]["bytes_per_frame"]
    assert rows["uncertainty_trust"]["conditions"]["clean"]["bytes_per_agent_frame"] > \
        rows["max"]["conditions"]["clean"]["bytes_per_agent_frame"]
    for name in ("max", "uncertainty_trust"):  # one start and one recipe for both
        stored = load_checkpoint(out / "fusion" / "train" / name / "last.pt")["config"]
        assert (stored["train"]["init_from"], stored["fusion"]["method"]) == (str(runs / "max" / "best.pt"), name)
    # the anchor-centric row: the ego-only model's detector, frozen, under the same conditions
    stored = load_checkpoint(out / "fusion" / "train" / "anchor" / "last.pt")["config"]
    assert (stored["train"]["init_from"], stored["cooperation"]["strategy"]) == (str(ego / "last.pt"), "anchor")
    assert stored["train"]["freeze_detector"] and "sender_anchors" in rows["anchor-centric"]["conditions"]["clean"]["ms"]
    assert (out / "fusion.png").stat().st_size > 1000
    # run again (as after an interruption): every evaluation comes from the store, the report is the same
    again = CliRunner().invoke(app, ["bench", "fusion", "--runs", str(runs), "--ego-checkpoint", str(ego / "last.pt"),
                                     "--out", str(out), "--fusions", "max,uncertainty_trust,anchor", "--epochs", "1", *sets])
    assert again.exit_code == 0, again.output
    assert "evaluated before" in again.output and "bytes/agent/frame" not in again.output
    assert json.loads((out / "fusion.json").read_text())["rows"]["max"]["conditions"]["delay 200 ms"]["ap"] == \
        rows["max"]["conditions"]["delay 200 ms"]["ap"]

    # several training seeds: the seed-0 run is reused, seed 1 trained beside it; evaluated at another threshold
    result = CliRunner().invoke(app, ["bench", "fusion", "--runs", str(runs), "--ego-checkpoint", str(ego / "last.pt"),
                                      "--out", str(out), "--fusions", "max", "--epochs", "1", "--seeds", "0,1",
                                      "--threshold", "0.3", *sets])
    assert result.exit_code == 0, result.output
    assert f"reusing {out / 'fusion' / 'train' / 'max' / 'last.pt'}" in result.output
    rep = json.loads((out / "fusion.json").read_text())
    assert rep["seeds"] == [0, 1] and rep["operating_point"]["selection"]["threshold"] == 0.3
    assert rep["operating_point"]["training_threshold"] == 0.0
    stored = load_checkpoint(out / "fusion" / "train" / "max_seed1" / "last.pt")["config"]
    assert (stored["train"]["seed"], stored["comm"]["selection"]["threshold"]) == (1, 0.0)
    row = rep["rows"]["max"]
    assert row["seeds"] == [0, 1] and set(row["per_seed"]) == {"0", "1"}
    for condition, entry in row["conditions"].items():
        seeds = [row["per_seed"][s][condition]["ap"]["0.5"] for s in ("0", "1")]
        assert entry["ap"]["0.5"] == pytest.approx(sum(seeds) / 2)
        assert entry["ap_std"]["0.5"] == pytest.approx(abs(seeds[0] - seeds[1]) / 2 ** 0.5)
        assert entry["params"]["selection"]["threshold"] == 0.3
    assert set(row["loss_vs_clean_per_seed"]) == {"0", "1"} and "late" in rep["rows"]
    run = ExperimentConfig.model_validate(stored).variant(train={"seed": 2})  # a folder of seed 1 is not seed 2's
    with pytest.raises(ConfigError, match="trained with seed 1, not 2"):
        finetune_fusion(run, "max_seed1", runs / "max" / "best.pt", out / "fusion" / "train", 1, print)
    result = CliRunner().invoke(app, ["bench", "fusion", "--runs", str(runs), "--out", str(out), "--seeds", "0,x", *sets])
    assert result.exit_code != 0 and "--seeds '0,x'" in result.output

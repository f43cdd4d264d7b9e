"""ONNX export: onnxruntime runs the FP32 graphs as torch does; the INT8 graphs follow TensorRT's
explicit-quantization rules; what cannot be exported says what."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from coperception.cli import app
from coperception.train import train

from test_train import tiny_config

onnx = pytest.importorskip("onnx")  # the `export` extra
pytest.importorskip("onnxruntime")

from coperception.export.checks import qdq_violations  # noqa: E402
from coperception.export.graphs import ExportError  # noqa: E402
from coperception.export.onnx import export_model  # noqa: E402


@pytest.fixture(scope="module")
def codebook_checkpoint(opv2v_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    cfg = tiny_config(opv2v_set, out, "cooperation.strategy=intermediate", "comm.codec=codebook", "comm.codebook.codes=16",
                      "comm.selection.threshold=0.0", "comm.selection.top_k=40", "train.max_steps=2",
                      "dataset.train_split=test")
    train(cfg, progress=False)
    return cfg, out / "last.pt"


@pytest.fixture(scope="module")
def fp32_export(codebook_checkpoint, tmp_path_factory):
    cfg, checkpoint = codebook_checkpoint
    folder = tmp_path_factory.mktemp("fp32_export")
    return folder, export_model(checkpoint, cfg, folder, check_frames=9, log=lambda _: None)


def test_onnxruntime_fp32_matches_torch(codebook_checkpoint, fp32_export):
    """Every view of the test split through the agent graph (over 20 runs) and every frame's delivery
    through the ego graph, onnxruntime against torch."""
    cfg, checkpoint = codebook_checkpoint
    tmp_path, spec = fp32_export
    check = spec["onnxruntime_check"]
    assert check["frames"] == 9
    assert check["agent"]["max_abs_diff"] < 1e-4 and check["ego"]["max_abs_diff"] < 1e-4
    assert check["agent"]["integer_mismatch"] < 0.01  # codes: only cells halfway between two codes may flip
    # the top cells the graph codes: the same set but for cells of equal confidence (e.g. empty ones)
    assert check["agent"]["top_cells_differing"] < 0.5
    assert spec["codebook_hash"] and spec["precision"] == "fp32"
    graph = spec["agent_graph"]  # pillar slots sized to the data: 1.5x the fullest view, in steps of 256
    assert graph["pillar_capacity"] % 256 == 0 and graph["pillar_capacity"] >= 1.5 * graph["fullest_view_pillars"]
    assert graph["pillar_capacity"] < graph["fullest_view_pillars"] * 1.5 + 256 and graph["code_cells"] == 512
    assert qdq_violations(onnx.load(tmp_path / "agent.onnx"))  # FP32: nothing is quantized (the check can fail)
    # the exported pipeline evaluates like the torch one: same messages on the wire, same AP
    from coperception.evaluate import evaluate_method
    from coperception.export.runtime import OnnxRuntimeModel, load_export_config
    from coperception.pipeline.model import load_model

    torch_entry = evaluate_method(load_model(checkpoint, cfg), cfg, "test", progress=False)
    ort_entry = evaluate_method(OnnxRuntimeModel(tmp_path, load_export_config(tmp_path, [])), cfg, "test", progress=False)
    assert ort_entry["bytes_per_frame"] == pytest.approx(torch_entry["bytes_per_frame"], rel=0.01)
    for t in ("0.3", "0.5", "0.7"):
        assert abs(ort_entry["ap"][t] - torch_entry["ap"][t]) < 0.01


def test_cells_beyond_the_graphs_coded_ones_and_views_beyond_its_capacity(codebook_checkpoint, tmp_path):
    """An agent graph that codes only its 4 most confident cells, with 64 pillar slots: the cells a
    sender selects beyond them are coded from their features (the same bytes as torch), and a view with
    more pillars keeps the same random subset every time."""
    from coperception.datasets.voxelize import Voxels
    from coperception.evaluate import evaluate_method
    from coperception.export.onnx import agent_inputs
    from coperception.export.runtime import OnnxRuntimeModel, load_export_config
    from coperception.pipeline.model import load_model

    cfg, checkpoint = codebook_checkpoint
    spec = export_model(checkpoint, cfg, tmp_path, check_frames=1, code_cells=4, capacity=64, log=lambda _: None)
    assert (spec["agent_graph"]["code_cells"], spec["agent_graph"]["pillar_capacity"]) == (4, 64)
    torch_entry = evaluate_method(load_model(checkpoint, cfg), cfg, "test", progress=False, limit=3)
    ort_entry = evaluate_method(OnnxRuntimeModel(tmp_path, load_export_config(tmp_path, [])), cfg, "test",
                                progress=False, limit=3)
    assert ort_entry["bytes_per_frame"] > 0  # 40 cells a sender (top_k) although the graph coded 4
    assert ort_entry["bytes_per_frame"] == pytest.approx(torch_entry["bytes_per_frame"], rel=0.05)
    rng = np.random.default_rng(0)
    many = Voxels(rng.random((100, 4, 4)).astype(np.float32), rng.integers(0, 50, (100, 3)).astype(np.int32),
                  np.full(100, 4, np.int32))
    first, again = agent_inputs(many, 64), agent_inputs(many, 64)
    assert all((a == b).all() for a, b in zip(first, again)) and int((first[1] > 0).sum()) == 64


def test_latency_bench_reports_every_stage(codebook_checkpoint, fp32_export, tmp_path):
    from coperception.export.latency import bench_latency

    cfg, checkpoint = codebook_checkpoint
    rep = bench_latency(cfg, checkpoint, {"ort_fp32": fp32_export[0]}, tmp_path, runs=2, warmup=1, log=lambda _: None)
    for engine in ("torch_fp32", "ort_fp32"):
        e = rep["engines"][engine]
        assert set(e["stages"]) == {"agent_graph", "select_serialize", "decode", "ego_graph", "nms"}
        assert e["bytes"] > 0 and e["transmission_ms"] == pytest.approx(e["bytes"] * 8 / 27e6 * 1e3)
        assert e["system_latency_ms"] > e["stages"]["agent_graph"]["median_ms"]
    assert rep["engines"]["ort_fp32"]["bytes"] == rep["engines"]["torch_fp32"]["bytes"]  # the same message
    assert (tmp_path / "latency.json").is_file()


def test_int8_graphs_follow_explicit_quantization_rules(codebook_checkpoint, tmp_path):
    cfg, checkpoint = codebook_checkpoint
    spec = export_model(checkpoint, cfg, tmp_path, int8=True, calib_frames=3, check_frames=2, log=lambda _: None)
    kept = spec["quantization"]["kept_in_float"]
    assert [k["layer"] for k in kept] == ["agent.encoder.pfn.linear"]
    for name in ("agent.onnx", "ego.onnx"):
        model = onnx.load(tmp_path / name)
        unquantized = {p.split(" input")[0] for p in qdq_violations(model)}
        # only the layers the spec lists as kept in float (the pillar feature net's MatMul) break the rules
        assert len(unquantized) == (len(kept) if name == "agent.onnx" else 0), (name, unquantized)
        assert all(u.startswith("MatMul") for u in unquantized)
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert spec["quantization"]["input_scales"] and all(v > 0 for v in spec["quantization"]["input_scales"].values())
    written = json.loads((tmp_path / "spec.json").read_text())
    assert written["precision"].startswith("int8")


def test_unsupported_models_fail_export_naming_what(opv2v_set, tmp_path):
    cfg = tiny_config(opv2v_set, tmp_path / "none", "cooperation.strategy=none", "train.max_steps=1",
                      "dataset.train_split=test")
    train(cfg, progress=False)
    with pytest.raises(ExportError, match="strategy 'none'"):
        export_model(tmp_path / "none" / "last.pt", cfg, tmp_path / "x", log=lambda _: None)
    from coperception.export.graphs import check_exportable
    from coperception.pipeline.model import build_model

    trust = tiny_config(opv2v_set, tmp_path / "t", "cooperation.strategy=intermediate", "comm.codec=sparse",
                        "fusion.method=uncertainty_trust")
    with pytest.raises(ExportError, match="fusion 'uncertainty_trust' unsupported"):
        check_exportable(build_model(trust))
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "none" / "last.pt"), "--out",
                                      str(tmp_path / "y")])
    assert result.exit_code == 2 and "intermediate" in result.output
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tmp_path / "none" / "last.pt"), "--out",
                                      str(tmp_path / "y"), "--calibration", "guess"])
    assert result.exit_code == 2 and "minmax" in result.output


def test_tensorrt_missing_says_what_and_prints_trtexec(fp32_export):
    from coperception.export.tensorrt import build_engines

    folder, spec = fp32_export
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        capacity = spec["agent_graph"]["pillar_capacity"]
        with pytest.raises(ExportError, match=rf"trtexec --onnx=.*agent.onnx --int8 --fp16 --minShapes=voxels:2x\d+x4,"
                                              rf".* --maxShapes=voxels:{capacity}x"):
            build_engines(folder, int8=True)
    else:  # pragma: no cover - only where TensorRT is installed
        pytest.skip("TensorRT is installed here; the engine build is exercised by `coperception export --tensorrt`")


def test_qdq_checker_names_a_per_tensor_weight():
    """A Conv whose weight has one scale for the tensor breaks the per-channel rule."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 2, 1, 1), np.float32), "w")
    one = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"]), helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, one, zero])
    problems = qdq_violations(helper.make_model(graph))
    assert len(problems) == 1 and "one per output channel on axis 0" in problems[0]

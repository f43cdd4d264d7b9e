"""TensorRT engines from the exported Q/DQ ONNX graphs (INT8 with FP16 fallback).

TensorRT cannot be installed on the machines this project is developed on, so this path is not
verified here: `build_engines` runs only where `tensorrt` is importable; elsewhere
`coperception export --tensorrt` says so and prints the `trtexec` command for the target.
"""

from __future__ import annotations

from pathlib import Path

from coperception.export.graphs import ExportError
from coperception.io import read_json


def shape_profiles(out_dir: str | Path) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """Per graph (`agent`, `ego`) and input, the (min, opt, max) shapes of its dynamic axis (pillars,
    agents) from the export's `spec.json`: what a TensorRT optimisation profile needs."""
    spec = read_json(Path(out_dir) / "spec.json")
    agent, ego = spec["agent_graph"], spec["ego_graph"]
    points = int(agent["inputs"]["voxels"][1])
    _, C, H, W = (int(v) if not isinstance(v, str) else 0 for v in ego["inputs"]["features"][:4])

    def each(axis: dict[str, int], shape) -> tuple[tuple[int, ...], ...]:
        return tuple(shape(axis[k]) for k in ("min", "opt", "max"))

    pillars, agents = agent["pillar_axis"], ego["agent_axis"]
    return {"agent": {"voxels": each(pillars, lambda n: (n, points, 4)), "num_points": each(pillars, lambda n: (n,)),
                      "coords": each(pillars, lambda n: (n, 3))},
            "ego": {"features": each(agents, lambda n: (n, C, H, W)), "theta": each(agents, lambda n: (n, 2, 3)),
                    "arrived": each(agents, lambda n: (n, H, W)), "age": each(agents, lambda n: (n,)),
                    "kind": each(agents, lambda n: (n,))}}


def trtexec_commands(out_dir: str | Path, int8: bool) -> list[str]:
    """The `trtexec` lines that build an engine from each exported graph on the target (with the
    optimisation profile of its dynamic axis)."""
    flags = "--int8 --fp16" if int8 else "--fp16"
    profiles = shape_profiles(out_dir)
    lines = []
    for name in ("agent", "ego"):
        shapes = " ".join(f"--{which}Shapes=" + ",".join(f"{k}:{'x'.join(map(str, v[i]))}"
                                                         for k, v in profiles[name].items())
                          for i, which in enumerate(("min", "opt", "max")))
        lines.append(f"trtexec --onnx={Path(out_dir) / name}.onnx {flags} {shapes} --saveEngine={Path(out_dir) / name}.plan")
    return lines


def build_engines(out_dir: str | Path, int8: bool) -> list[Path]:
    """Build `agent.plan` and `ego.plan` beside the ONNX files with the TensorRT Python API."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError:
        raise ExportError("TensorRT is not installed here (its wheels download from NVIDIA at install time); on the "
                          "target run:\n  " + "\n  ".join(trtexec_commands(out_dir, int8))) from None
    logger = trt.Logger(trt.Logger.WARNING)
    written = []
    for name in ("agent", "ego"):
        onnx_path = Path(out_dir) / f"{name}.onnx"
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for input_name, (low, opt, high) in shape_profiles(out_dir)[name].items():
            profile.set_shape(input_name, low, opt, high)
        config.add_optimization_profile(profile)
        config.set_flag(trt.BuilderFlag.FP16)
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise ExportError(f"{onnx_path}: TensorRT could not build an engine")
        target = onnx_path.with_suffix(".plan")
        target.write_bytes(bytes(engine))
        written.append(target)
    return written

"""TensorRT engines from the exported Q/DQ ONNX graphs (INT8 with FP16 fallback).

TensorRT cannot be installed on the machines this project is developed on, so this path is not
verified here: `build_engines` runs only where `tensorrt` is importable; elsewhere
`coperception export --tensorrt` says so and prints the `trtexec` command for the target.
"""

from __future__ import annotations

from pathlib import Path

from coperception.export.graphs import ExportError


def trtexec_commands(out_dir: str | Path, int8: bool) -> list[str]:
    """The `trtexec` lines that build an engine from each exported graph on the target."""
    flags = "--int8 --fp16" if int8 else "--fp16"
    return [f"trtexec --onnx={Path(out_dir) / name}.onnx {flags} --saveEngine={Path(out_dir) / name}.plan"
            for name in ("agent", "ego")]


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

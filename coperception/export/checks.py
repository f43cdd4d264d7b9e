"""The explicit-quantization rules TensorRT expects, checked on an exported ONNX graph.

Every Conv, ConvTranspose, Gemm, MatMul and Einsum takes its activation and its weight through a
QuantizeLinear -> DequantizeLinear pair (shape-only ops may sit between the pair and the layer), zero
points are 0, activations have one scale, weights one scale per output channel on that axis.
"""

from __future__ import annotations

import numpy as np

QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")
SHAPE_OPS = ("Transpose", "Reshape", "Unsqueeze", "Squeeze")


def qdq_violations(model) -> list[str]:
    """Every way the `onnx.ModelProto` breaks the rules above, one line each (empty: it follows them)."""
    from onnx import numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    problems = []
    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        for slot, name in enumerate(node.input[:2]):
            path = []
            src = producer.get(name)
            while src is not None and src.op_type in SHAPE_OPS:
                path.append(src)
                src = producer.get(src.input[0])
            where = f"{node.op_type} {node.name} input {slot}"
            if src is None or src.op_type != "DequantizeLinear":
                problems.append(f"{where}: not dequantized (from {src.op_type if src else 'a graph input or initializer'})")
                continue
            before = producer.get(src.input[0])
            stored = values.get(src.input[0])
            if not ((before is not None and before.op_type == "QuantizeLinear") or
                    (stored is not None and stored.dtype == np.int8)):
                problems.append(f"{where}: its DequantizeLinear does not follow a QuantizeLinear or an int8 initializer")
            zero = values.get(src.input[2]) if len(src.input) > 2 and src.input[2] else np.zeros(1, np.int8)
            if zero is None or np.any(zero != 0):
                problems.append(f"{where}: zero point is not 0")
            scale = values.get(src.input[1])
            if scale is None:
                problems.append(f"{where}: scale is not a constant")
                continue
            weight = _quantized_source(before, values) if before is not None else stored
            if weight is None:  # an activation: one scale for the whole tensor
                if scale.size != 1:
                    problems.append(f"{where}: activation scale has {scale.size} values, expected one (per tensor)")
                continue
            axis = next((a.i for a in src.attribute if a.name == "axis"), 1)
            expected_axis = _output_axis(node, path, weight.ndim)
            if scale.ndim != 1 or axis % weight.ndim != expected_axis or scale.size != weight.shape[expected_axis]:
                problems.append(f"{where}: weight scales {tuple(scale.shape)} on axis {axis}, expected one per output "
                                f"channel on axis {expected_axis} of a {tuple(weight.shape)} weight")
    return problems


def _quantized_source(quantize_node, values: dict) -> np.ndarray | None:
    """The float constant a QuantizeLinear quantizes (None when it quantizes an activation)."""
    if quantize_node is None or quantize_node.op_type != "QuantizeLinear":
        return None
    return values.get(quantize_node.input[0])


def _output_axis(node, path: list, ndim: int) -> int:
    """The weight axis that holds the layer's output channels, before the shape ops in `path`."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type in ("Conv", "Einsum"):  # Einsum: the codebook search's codes, one scale per code vector
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    # MatMul: output channels are B's last axis; follow a Transpose back to the stored weight
    axis = ndim - 1
    for op in path:
        if op.op_type == "Transpose":
            perm = next((list(a.ints) for a in op.attribute if a.name == "perm"), list(range(ndim))[::-1])
            axis = perm[axis]
    return axis

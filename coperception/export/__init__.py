"""Deployment: ONNX graphs, W8A8 quantization with explicit Q/DQ, onnxruntime evaluation and latency, TensorRT."""

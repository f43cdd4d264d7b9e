"""Where tensors live and in which precision the model runs: one switch for training, evaluation
and benches (`train.device`, `train.precision`, `--device`)."""

from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch

from coperception.errors import ConfigError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _this_process_cuda() -> torch.device:
    """The CUDA device of this process: under torchrun the one of its LOCAL_RANK."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def resolve_device(name: str) -> torch.device:
    """`auto`: this process's CUDA device when there is one (under torchrun the one of LOCAL_RANK), else the CPU."""
    if name == "auto":
        return _this_process_cuda() if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device: '{name}' is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device: '{name}' asked for, but this machine has no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device: '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)")
        if device.index is None:
            device = _this_process_cuda()
    elif device.type != "cpu":
        raise ConfigError(f"train.device: '{name}': only cpu and cuda devices are supported")
    return device


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Mixed precision for the forward pass and loss (`fp32`: none)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA device (use bf16 on the CPU)")
    return torch.autocast(device_type=device.type, dtype=dtype)


def distributed_backend(device: torch.device) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (so wall-clock timings measure it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

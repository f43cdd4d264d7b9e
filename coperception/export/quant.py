"""W8A8 post-training quantization with explicit Q/DQ (TensorRT's explicit-quantization form).

Batch norms are folded into the convolution or linear layer before them; then every Conv, ConvTranspose
and Linear layer quantizes its weight per output channel and its input per tensor, symmetric INT8
with zero point 0, through `torch.fake_quantize_per_{channel,tensor}_affine`, which the ONNX exporter
writes as QuantizeLinear/DequantizeLinear pairs. The codebook search of the agent graph is quantized
the same way (each stage's residual per tensor, the codes per code vector), so the codes it picks are
those of the INT8 features. Activation scales come from calibration frames: `minmax` (largest
magnitude), `percentile` (99.99th percentile of magnitudes) or `mse` (the clip that minimises the
quantization error of the calibration values).
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Literal

import torch
from torch import nn

from coperception.comm.codebook import ResidualVQ

Calibration = Literal["minmax", "percentile", "mse"]
QMAX = 127


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of `module` where every BatchNorm that directly follows a Conv2d, ConvTranspose2d or
    Linear in a Sequential (or the PFN's linear + norm) is folded into that layer (eval statistics)."""
    module = copy.deepcopy(module).eval()
    for parent in list(module.modules()):
        if isinstance(parent, nn.Sequential):
            layers = list(parent.children())
            for i in range(len(layers) - 1):
                if isinstance(layers[i + 1], (nn.BatchNorm1d, nn.BatchNorm2d)) and \
                        isinstance(layers[i], (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                    _fold(layers[i], layers[i + 1])
                    parent[i + 1] = nn.Identity()
        if hasattr(parent, "linear") and isinstance(getattr(parent, "norm", None), nn.BatchNorm1d):
            _fold(parent.linear, parent.norm)
            parent.norm = _ChannelsLastIdentity()
    return module


class _ChannelsLastIdentity(nn.Module):
    """Stands where the PFN's folded BatchNorm1d was (it is called on (P, C, N))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _fold(layer: nn.Module, bn: nn.Module) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    with torch.no_grad():
        w = layer.weight
        if isinstance(layer, nn.ConvTranspose2d):  # (in, out, kh, kw): the output channel is axis 1
            layer.weight.copy_(w * scale[None, :, None, None])
        else:
            layer.weight.copy_(w * scale.view(-1, *([1] * (w.dim() - 1))))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(shift)
        new_bias = bias * scale + shift
    layer.bias = nn.Parameter(new_bias.detach())


class Observer:
    """Collects the magnitudes an input takes over calibration (a subsample, for percentile / MSE)."""

    def __init__(self, keep: int = 200_000):
        self.amax = 0.0
        self.samples: list[torch.Tensor] = []
        self.keep = keep

    def __call__(self, x: torch.Tensor) -> None:
        a = x.detach().abs().flatten().float()
        if a.numel() == 0:
            return
        self.amax = max(self.amax, float(a.max()))
        step = max(1, a.numel() // 20_000)
        self.samples.append(a[::step].cpu())

    def scale(self, method: Calibration) -> float:
        if self.amax == 0.0:
            return 1.0 / QMAX
        if method == "minmax":
            return self.amax / QMAX
        values = torch.cat(self.samples)
        if len(values) > self.keep:
            values = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))[: self.keep]]
        if method == "percentile":
            return max(float(torch.quantile(values, 0.9999)), 1e-8) / QMAX
        best, best_err = self.amax, float("inf")  # mse: clip values from 30 % to 100 % of the maximum
        for frac in torch.linspace(0.3, 1.0, 36).tolist():
            s = self.amax * frac / QMAX
            q = torch.clamp(torch.round(values / s), -QMAX - 1, QMAX) * s
            err = float((q - values).pow(2).mean())
            if err < best_err:
                best, best_err = self.amax * frac, err
        return best / QMAX


def weight_scales(w: torch.Tensor, axis: int) -> torch.Tensor:
    """Symmetric per-output-channel scales of a weight (largest magnitude / 127)."""
    dims = [d for d in range(w.dim()) if d != axis]
    amax = w.detach().abs().amax(dim=dims)
    return torch.where(amax > 0, amax / QMAX, torch.full_like(amax, 1.0 / QMAX)).float()


class QuantLayer(nn.Module):
    """A Conv2d / ConvTranspose2d / Linear with INT8 per-channel weights and an INT8 per-tensor input."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
        self.register_buffer("w_scale", weight_scales(layer.weight, self.axis))
        self.register_buffer("w_zero", torch.zeros_like(self.w_scale, dtype=torch.int32))
        self.register_buffer("x_scale", torch.tensor(1.0))
        self.observer: Observer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x)
            return self.layer(x)
        xq = torch.fake_quantize_per_tensor_affine(x, self.x_scale, torch.zeros((), dtype=torch.int32), -QMAX - 1, QMAX)
        wq = torch.fake_quantize_per_channel_affine(self.layer.weight, self.w_scale, self.w_zero, self.axis, -QMAX - 1, QMAX)
        if isinstance(self.layer, nn.Linear):
            return nn.functional.linear(xq, wq, self.layer.bias)
        if isinstance(self.layer, nn.ConvTranspose2d):
            lay = self.layer
            return nn.functional.conv_transpose2d(xq, wq, lay.bias, lay.stride, lay.padding, lay.output_padding,
                                                  lay.groups, lay.dilation)
        return self.layer._conv_forward(xq, wq, self.layer.bias)


class QuantCodeSearch(nn.Module):
    """`ResidualVQ.encode` with each stage's distance products in INT8: the residual per tensor, the
    code vectors per code; the chosen codes are looked up in the full-precision codebook."""

    def __init__(self, quantizer: ResidualVQ):
        super().__init__()
        self.segments, self.stages, self.dim = quantizer.segments, quantizer.stages, quantizer.dim
        self.register_buffer("codebook", quantizer.codebook.detach().clone())  # (m, r, K, d)
        for s in range(self.stages):  # each stage's codes as one (m*K, d) constant: its Q/DQ sits on a stored weight
            flat = self.codebook[:, s].reshape(-1, self.dim).clone()
            self.register_buffer(f"codes_{s}", flat)
            amax = flat.abs().amax(dim=-1)  # one scale per code vector
            self.register_buffer(f"code_scale_{s}", torch.where(amax > 0, amax / QMAX, torch.full_like(amax, 1 / QMAX)))
        self.register_buffer("x_scale", torch.ones(quantizer.stages))
        self.observers: list[Observer] | None = None

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        residual = cells.reshape(-1, self.segments, self.dim)
        seg = torch.arange(self.segments, device=cells.device)[None, :]
        codes = []
        zero = torch.zeros((), dtype=torch.int32)
        for s in range(self.stages):
            book = self.codebook[:, s]  # (m, K, d)
            if self.observers is not None:
                self.observers[s](residual)
                rq, bq = residual, book
            else:
                rq = torch.fake_quantize_per_tensor_affine(residual, self.x_scale[s], zero, -QMAX - 1, QMAX)
                flat = getattr(self, f"codes_{s}")
                bq = torch.fake_quantize_per_channel_affine(flat, getattr(self, f"code_scale_{s}"),
                                                            torch.zeros(flat.shape[0], dtype=torch.int32), 0,
                                                            -QMAX - 1, QMAX).reshape(book.shape)
            dist = bq.pow(2).sum(-1)[None] - 2 * torch.einsum("nmd,mkd->nmk", rq, bq)
            index = dist.argmin(dim=-1)  # (N, m)
            codes.append(index)
            residual = residual - book[seg.expand_as(index), index]
        return torch.stack(codes, dim=-1)


# The pillar feature net's input mixes absolute x/y (up to the range, ~100 m) with offsets of a few
# centimetres in one tensor: one INT8 scale for all of it erases the offsets, so it stays in float
# (10 -> 64 channels per point, a small share of the agent graph's work).
KEEP_FLOAT = ("encoder.pfn.linear",)


def quantize(graph: nn.Module, keep_float: tuple[str, ...] = KEEP_FLOAT) -> nn.Module:
    """A W8A8 copy of an export graph: batch norms folded, every Conv/ConvTranspose/Linear wrapped in a
    `QuantLayer` except the modules named in `keep_float`, an agent graph's codebook search replaced by
    `QuantCodeSearch`. Calibrate it before use."""
    graph = fold_batchnorm(graph)
    for parent_name, parent in list(graph.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and not isinstance(parent, QuantLayer) \
                    and full not in keep_float:
                setattr(parent, name, QuantLayer(child))
    if getattr(graph, "quantizer", None) is not None:
        graph.quantizer = _CodeSearchAdapter(QuantCodeSearch(graph.quantizer))
    return graph.eval()


class _CodeSearchAdapter(nn.Module):
    """Gives `QuantCodeSearch` the `encode` the agent graph calls."""

    def __init__(self, search: QuantCodeSearch):
        super().__init__()
        self.search = search

    def encode(self, cells: torch.Tensor) -> torch.Tensor:
        return self.search(cells)


@torch.no_grad()
def calibrate(graph: nn.Module, inputs: Iterable[tuple[torch.Tensor, ...]], method: Calibration = "percentile",
              progress: Callable[[Iterable], Iterable] = lambda x: x) -> dict[str, float]:
    """Run the FP32 path of a `quantize`d graph over `inputs`, then set every input scale by `method`.
    Returns the scales by layer name."""
    layers = {n: m for n, m in graph.named_modules() if isinstance(m, QuantLayer)}
    searches = {n: m for n, m in graph.named_modules() if isinstance(m, QuantCodeSearch)}
    for m in layers.values():
        m.observer = Observer()
    for m in searches.values():
        m.observers = [Observer() for _ in range(m.stages)]
    try:
        for args in progress(inputs):
            graph(*args)
    finally:
        scales = {}
        for n, m in layers.items():
            assert m.observer is not None
            m.x_scale.fill_(m.observer.scale(method))
            scales[n] = float(m.x_scale)
            m.observer = None
        for n, m in searches.items():
            assert m.observers is not None
            for s, obs in enumerate(m.observers):
                m.x_scale[s] = obs.scale(method)
                scales[f"{n}.stage{s}"] = float(m.x_scale[s])
            m.observers = None
    return scales

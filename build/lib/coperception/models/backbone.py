"""2D BEV backbone with multi-scale upsampling (the PointPillars / SECOND RPN)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1), nn.ReLU(inplace=True))


class BEVBackbone(nn.Module):
    """Blocks at increasing stride; each block's output is brought back to the first block's
    resolution by a transposed convolution and the results are concatenated."""

    def __init__(self, in_channels: int, layers: Sequence[int], strides: Sequence[int], filters: Sequence[int],
                 upsample_filters: Sequence[int]):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.ups = nn.ModuleList()
        cin = in_channels
        total_stride = 1
        first_stride = None
        for n_layers, stride, cout, up in zip(layers, strides, filters, upsample_filters):
            block = [_conv(cin, cout, stride)] + [_conv(cout, cout) for _ in range(n_layers)]
            self.blocks.append(nn.Sequential(*block))
            total_stride *= stride
            if first_stride is None:
                first_stride = total_stride
            factor = total_stride // first_stride
            if factor == 1:
                self.ups.append(nn.Sequential(nn.Conv2d(cout, up, 1, bias=False), nn.BatchNorm2d(up, eps=1e-3, momentum=0.1),
                                              nn.ReLU(inplace=True)))
            else:
                self.ups.append(nn.Sequential(nn.ConvTranspose2d(cout, up, factor, stride=factor, bias=False),
                                              nn.BatchNorm2d(up, eps=1e-3, momentum=0.1), nn.ReLU(inplace=True)))
            cin = cout
        self.out_channels = int(sum(upsample_filters))
        self.stride = int(first_stride or 1)

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        outs = []
        x = bev
        for block, up in zip(self.blocks, self.ups):
            x = block(x)
            y = up(x)
            if outs and y.shape[-2:] != outs[0].shape[-2:]:  # odd sizes: crop/pad to the first scale
                y = nn.functional.interpolate(y, size=outs[0].shape[-2:], mode="nearest")
            outs.append(y)
        return torch.cat(outs, dim=1)

"""The encoder interface and registry (`models/encoders.py` and `models/second.py` register into it)."""

from __future__ import annotations

import abc
from typing import Callable, ClassVar

import torch
from torch import nn

from coperception.config import DatasetConfig, ModelConfig
from coperception.errors import ConfigError
from coperception.grid import BEVGrid
from coperception.models.backbone import BEVBackbone
from coperception.registry import Registry
from coperception.types import AgentBatch


class BEVEncoder(nn.Module, abc.ABC):
    inputs: ClassVar[tuple[str, ...]]  # names of the optional AgentBatch fields it reads
    out_channels: int
    grid: BEVGrid  # the grid of the features it returns

    @abc.abstractmethod
    def forward(self, batch: AgentBatch) -> torch.Tensor:
        """(batch.n_agents, out_channels, grid.height, grid.width), each view in its own frame."""

    def add_backbone(self, in_channels: int, mcfg: ModelConfig, point_range: list[float]) -> None:
        """The 2D BEV backbone an encoder ends with (`self.backbone`), and the grid and width of what it returns."""
        self.backbone = BEVBackbone(in_channels, mcfg.layers, mcfg.strides, mcfg.filters, mcfg.upsample_filters)
        self.out_channels = self.backbone.out_channels
        self.grid = BEVGrid.from_range(point_range, float(mcfg.voxel_size[0]) * self.backbone.stride)

    def take_training_loss(self) -> torch.Tensor | None:
        """The encoder's own training term from its forward passes since the last call (e.g. depth
        supervision), handed over once; None when it has none."""
        return None

    def on_grid(self, feats: torch.Tensor) -> torch.Tensor:
        """`feats` brought to the encoder's grid (odd input sizes leave a backbone a cell off)."""
        if feats.shape[-2:] != (self.grid.height, self.grid.width):
            feats = nn.functional.interpolate(feats, size=(self.grid.height, self.grid.width), mode="nearest")
        return feats

    def check_inputs(self, batch: AgentBatch) -> None:
        missing = [name for name in self.inputs if getattr(batch, name, None) is None]
        if missing:
            raise ConfigError(f"encoder {type(self).__name__} needs the batch input(s) {missing}, which the data "
                              f"preparation did not provide")


KIND_NAMES = ("vehicle", "rsu")  # AgentBatch.kind 0, 1

ENCODERS: Registry[Callable[[ModelConfig, DatasetConfig], BEVEncoder]] = Registry("model.encoders")


def input_grid(mcfg: ModelConfig, dcfg: DatasetConfig) -> tuple[list[float], BEVGrid]:
    """The point-cloud range and the x/y grid of the voxels (square cells)."""
    if abs(mcfg.voxel_size[0] - mcfg.voxel_size[1]) > 1e-9:
        raise ConfigError("model.voxel_size: square voxels expected (x == y)")
    r = [float(v) for v in dcfg.point_cloud_range]
    return r, BEVGrid.from_range(r, float(mcfg.voxel_size[0]))

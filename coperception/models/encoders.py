"""BEV encoders: one agent's sensor input -> BEV features on a shared grid.

Every encoder is registered by name, says which `AgentBatch` inputs it reads (`inputs`), and
returns `(n_views, out_channels, grid.height, grid.width)` features on its `grid`. Which encoder an
agent kind uses is `model.encoders` in the config.
"""

from __future__ import annotations

import torch
from torch import nn

from coperception.config import DatasetConfig, ModelConfig
from coperception.errors import ConfigError
from coperception.grid import BEVGrid
from coperception.models.backbone import BEVBackbone
from coperception.models.encoder_base import ENCODERS, KIND_NAMES, BEVEncoder, input_grid
from coperception.models import second  # noqa: F401  (registers `second`; spconv is imported when one is built)
from coperception.models.pillars import PillarFeatureNet, scatter_to_bev
from coperception.types import AgentBatch

__all__ = ["BEVEncoder", "ENCODERS", "KIND_NAMES", "EncoderSet", "PointPillarsEncoder"]


@ENCODERS.register("pointpillars")
class PointPillarsEncoder(BEVEncoder):
    """Pillar feature net -> scatter to a BEV pseudo-image -> 2D backbone (multi-scale, upsampled)."""

    inputs = ("lidar",)

    def __init__(self, mcfg: ModelConfig, dcfg: DatasetConfig):
        super().__init__()
        r, self.input_grid = input_grid(mcfg, dcfg)
        self.pfn = PillarFeatureNet(mcfg.pfn_channels, self.input_grid, (r[2], r[5]))
        self.backbone = BEVBackbone(mcfg.pfn_channels, mcfg.layers, mcfg.strides, mcfg.filters, mcfg.upsample_filters)
        self.out_channels = self.backbone.out_channels
        self.grid = BEVGrid.from_range(r, float(mcfg.voxel_size[0]) * self.backbone.stride)

    def forward(self, batch: AgentBatch) -> torch.Tensor:
        self.check_inputs(batch)
        lidar = batch.lidar
        assert lidar is not None
        pillars = self.pfn(lidar.voxels, lidar.num_points, lidar.coords)
        return self.on_grid(self.backbone(scatter_to_bev(pillars, lidar.coords, batch.n_agents, self.input_grid)))


class EncoderSet(nn.Module):
    """The BEV encoder of every agent kind (`model.encoders`); kinds naming the same encoder share it."""

    def __init__(self, mcfg: ModelConfig, dcfg: DatasetConfig):
        super().__init__()
        self.by_kind = dict(mcfg.encoders)
        self.nets = nn.ModuleDict({name: ENCODERS.get(name)(mcfg, dcfg) for name in dict.fromkeys(self.by_kind.values())})
        first: BEVEncoder = next(iter(self.nets.values()))  # type: ignore[assignment]
        for name, net in self.nets.items():
            if net.grid != first.grid or net.out_channels != first.out_channels:
                raise ConfigError(f"model.encoders: {name!r} gives {net.out_channels} channels on {net.grid}, "
                                  f"another encoder {first.out_channels} on {first.grid}; all must share grid and channels")
        self.grid, self.out_channels = first.grid, first.out_channels

    def forward(self, batch: AgentBatch) -> torch.Tensor:
        """(N_total, C, H, W) features of every view, each by its agent kind's encoder."""
        names = [self.by_kind.get(KIND_NAMES[int(k)], self.by_kind["default"]) for k in batch.kind.tolist()]
        if len(set(names)) == 1:
            return self.nets[names[0]](batch)
        out: torch.Tensor | None = None
        for name in dict.fromkeys(names):
            views = torch.tensor([i for i, n in enumerate(names) if n == name])
            feats = self.nets[name](batch.subset_views(views))
            if out is None:
                out = feats.new_zeros(len(names), *feats.shape[1:])
            out[views.to(feats.device)] = feats
        assert out is not None
        return out


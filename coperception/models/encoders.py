"""BEV encoders: one agent's sensor input -> BEV features on a shared grid.

Every encoder is registered by name, says which `AgentBatch` inputs it reads (`inputs`), and
returns `(n_views, out_channels, grid.height, grid.width)` features on its `grid`. Which encoder an
agent kind uses is `model.encoders` in the config; `a+b` runs both and fuses their maps
(`CombinedEncoder`: a LiDAR+camera agent fuses its two BEV maps before it communicates).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from coperception.config import DatasetConfig, ModelConfig
from coperception.errors import ConfigError
from coperception.models.encoder_base import ENCODERS, KIND_NAMES, BEVEncoder, input_grid
from coperception.models import camera  # noqa: F401  (registers `lss`)
from coperception.models import second  # noqa: F401  (registers `second`; spconv is imported when one is built)
from coperception.models.pillars import PillarFeatureNet, scatter_to_bev
from coperception.types import AgentBatch

__all__ = ["BEVEncoder", "ENCODERS", "KIND_NAMES", "CombinedEncoder", "EncoderSet", "PointPillarsEncoder",
           "build_encoder", "encoder_parts"]


@ENCODERS.register("pointpillars")
class PointPillarsEncoder(BEVEncoder):
    """Pillar feature net -> scatter to a BEV pseudo-image -> 2D backbone (multi-scale, upsampled)."""

    inputs = ("lidar",)

    def __init__(self, mcfg: ModelConfig, dcfg: DatasetConfig):
        super().__init__()
        r, self.input_grid = input_grid(mcfg, dcfg)
        self.pfn = PillarFeatureNet(mcfg.pfn_channels, self.input_grid, (r[2], r[5]))
        self.add_backbone(mcfg.pfn_channels, mcfg, r)

    def forward(self, batch: AgentBatch) -> torch.Tensor:
        self.check_inputs(batch)
        lidar = batch.lidar
        assert lidar is not None
        pillars = self.pfn(lidar.voxels, lidar.num_points, lidar.coords)
        return self.on_grid(self.backbone(scatter_to_bev(pillars, lidar.coords, batch.n_agents, self.input_grid)))


def encoder_parts(name: str) -> list[str]:
    """The registered encoders a `model.encoders` value names (`pointpillars+lss` -> both)."""
    return [part.strip() for part in name.split("+")]


class CombinedEncoder(BEVEncoder):
    """Several encoders of one agent (e.g. LiDAR and camera) on the same grid; their maps are concatenated
    and mixed by a 1x1 convolution back to the shared channel count."""

    def __init__(self, parts: list[BEVEncoder]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        first = parts[0]
        for part in parts[1:]:
            if part.grid != first.grid or part.out_channels != first.out_channels:
                raise ConfigError(f"model.encoders: {type(part).__name__} and {type(first).__name__} do not share "
                                  "grid and channels, so they cannot be combined")
        self.inputs = tuple(dict.fromkeys(i for part in parts for i in part.inputs))  # type: ignore[misc]
        self.grid, self.out_channels = first.grid, first.out_channels
        self.mix = nn.Sequential(nn.Conv2d(len(parts) * first.out_channels, first.out_channels, 1, bias=False),
                                 nn.BatchNorm2d(first.out_channels), nn.ReLU(inplace=True))

    def forward(self, batch: AgentBatch) -> torch.Tensor:
        self.check_inputs(batch)
        return self.mix(torch.cat([part(batch) for part in self.parts], dim=1))

    def take_training_loss(self) -> torch.Tensor | None:
        return summed(part.take_training_loss() for part in self.parts)


def build_encoder(name: str, mcfg: ModelConfig, dcfg: DatasetConfig) -> BEVEncoder:
    """The encoder a `model.encoders` value names: one registered encoder, or a combination `a+b`."""
    parts = encoder_parts(name)
    if len(parts) == 1:
        return ENCODERS.get(parts[0])(mcfg, dcfg)
    return CombinedEncoder([ENCODERS.get(part)(mcfg, dcfg) for part in parts])


class EncoderSet(nn.Module):
    """The BEV encoder of every agent kind (`model.encoders`); kinds naming the same encoder share it."""

    def __init__(self, mcfg: ModelConfig, dcfg: DatasetConfig):
        super().__init__()
        self.by_kind = dict(mcfg.encoders)
        # ModuleDict keys cannot hold '.', and '+' reads badly in weight names: `pointpillars+lss` -> `pointpillars_lss`
        self.nets = nn.ModuleDict({key(name): build_encoder(name, mcfg, dcfg) for name in dict.fromkeys(self.by_kind.values())})
        first: BEVEncoder = next(iter(self.nets.values()))  # type: ignore[assignment]
        for name, net in self.nets.items():
            if net.grid != first.grid or net.out_channels != first.out_channels:
                raise ConfigError(f"model.encoders: {name!r} gives {net.out_channels} channels on {net.grid}, "
                                  f"another encoder {first.out_channels} on {first.grid}; all must share grid and channels")
        self.grid, self.out_channels = first.grid, first.out_channels

    def forward(self, batch: AgentBatch) -> torch.Tensor:
        """(N_total, C, H, W) features of every view, each by its agent kind's encoder."""
        names = [key(self.by_kind.get(KIND_NAMES[int(k)], self.by_kind["default"])) for k in batch.kind.tolist()]
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

    def take_training_loss(self) -> torch.Tensor | None:
        """The encoders' own training terms (e.g. camera depth supervision) since the last call, summed."""
        return summed(net.take_training_loss() for net in self.nets.values())


def summed(losses: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """The sum of the losses that are there, or None when none is."""
    present = [loss for loss in losses if loss is not None]
    return sum(present[1:], present[0]) if present else None


def key(name: str) -> str:
    """The `EncoderSet.nets` key of a `model.encoders` value."""
    return "_".join(encoder_parts(name))

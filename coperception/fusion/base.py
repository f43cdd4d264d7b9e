"""The fusion interface and registry.

Every fusion module is `fuse(features, valid, meta) -> [B, C, H, W]` on ego-aligned inputs (the
warp in `fusion.warp` runs once before any of them), with the ego at index 0 of L. A module may
declare its hyperparameters as a pydantic `Settings` model; they come from `fusion.options`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from coperception.errors import ConfigError
from coperception.io import format_validation_error
from coperception.registry import Registry


@dataclass
class FusionMeta:
    """Per agent slot (B, L): message age in seconds, agent kind (0 vehicle, 1 rsu), T_ego_from_agent;
    for fusions that ask for them (`needs_confidence`, `needs_uncertainty`), ego-aligned per-cell maps:
    the detector's confidence of each agent's feature as the ego reads it, and the uncertainty each
    sender sent with its message (aleatoric std, epistemic std; the ego's own computed locally)."""

    age: torch.Tensor  # (B, L)
    kind: torch.Tensor  # (B, L) int64
    T_ego_from_agent: torch.Tensor  # (B, L, 4, 4)
    confidence: torch.Tensor | None = None  # (B, L, H, W)
    uncertainty: torch.Tensor | None = None  # (B, L, 2, H, W)


class NoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Fusion(nn.Module, abc.ABC):
    """Base class: `forward(features, valid, meta) -> (B, C, H, W)`; built with the feature channels
    and the validated `Settings`."""

    Settings: ClassVar[type[BaseModel]] = NoSettings
    needs_confidence: ClassVar[bool] = False  # the ego side fills `meta.confidence`
    needs_uncertainty: ClassVar[bool] = False  # senders compute and send per-cell uncertainty (`meta.uncertainty`)

    def __init__(self, channels: int, settings: BaseModel | None = None):
        super().__init__()
        self.channels = channels
        self.settings = settings if settings is not None else self.Settings()

    @abc.abstractmethod
    def forward(self, features: torch.Tensor, valid: torch.Tensor, meta: FusionMeta) -> torch.Tensor:
        """Fuse ego-aligned agent features (B, L, C, H, W) where `valid` (B, L, H, W); index 0 of L is the ego."""


def usable_cells(features: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, H, W) the cells each agent usefully delivered (valid and every value finite; the ego's own
    always: the fallback where nothing else arrived) and the features with every other cell zeroed, so
    nothing non-finite reaches the arithmetic."""
    mask = valid & torch.isfinite(features).all(dim=2)
    mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, 1:]], dim=1)
    return mask, features.masked_fill(~mask[:, :, None], 0.0)


def masked_max(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) per cell and channel the largest value among the agents `mask` keeps (the ego always)."""
    return features.masked_fill(~mask[:, :, None], float("-inf")).amax(dim=1)


FUSIONS: Registry[type[Fusion]] = Registry("fusion.method")
register_fusion = FUSIONS.register


def fusion_settings(name: str, options: dict[str, Any]) -> BaseModel:
    """`fusion.options` validated against the `Settings` of fusion `name`."""
    cls = FUSIONS.get(name)
    try:
        return cls.Settings.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(f"fusion.options for {name!r}: {format_validation_error(exc)}") from None


def build_fusion(name: str, channels: int, options: dict[str, Any] | None = None) -> Fusion:
    return FUSIONS.get(name)(channels, fusion_settings(name, options or {}))

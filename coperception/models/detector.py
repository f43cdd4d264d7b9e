"""PointPillars detector with an optional intermediate-fusion stage between backbone and head.

pillar feature net -> scatter to BEV -> 2D backbone -> [warp to ego + fusion] -> anchor head.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from coperception.config import DatasetConfig, ModelConfig
from coperception.datasets.collate import AgentBatch
from coperception.fusion.base import FusionMeta, build_fusion, warp_to_ego
from coperception.models.anchors import BEVGrid, make_anchors
from coperception.models.backbone import BEVBackbone
from coperception.models.heads import AnchorHead, HeadOutput
from coperception.models.pillars import PillarFeatureNet, scatter_to_bev


class PointPillars(nn.Module):
    """`fusion=None`: each sample's first view is detected alone (no fusion / early / late)."""

    def __init__(self, mcfg: ModelConfig, dcfg: DatasetConfig, fusion: str | None = None):
        super().__init__()
        r = tuple(float(v) for v in dcfg.point_cloud_range)
        self.input_grid = BEVGrid(r, float(mcfg.voxel_size[0]))  # type: ignore[arg-type]
        if abs(mcfg.voxel_size[0] - mcfg.voxel_size[1]) > 1e-9:
            raise ValueError("square pillars expected (voxel_size x == y)")
        self.pfn = PillarFeatureNet(mcfg.pfn_channels, self.input_grid, (r[2], r[5]))
        self.backbone = BEVBackbone(mcfg.pfn_channels, mcfg.layers, mcfg.strides, mcfg.filters, mcfg.upsample_filters)
        self.feature_grid = BEVGrid(r, float(mcfg.voxel_size[0]) * self.backbone.stride)  # type: ignore[arg-type]
        yaws = np.radians(mcfg.anchor_yaws_deg)
        self.anchors_np = make_anchors(self.feature_grid, mcfg.anchor_size, mcfg.anchor_z, yaws)
        self.register_buffer("anchors", torch.from_numpy(self.anchors_np.reshape(-1, 7)), persistent=False)
        self.fusion = build_fusion(fusion, self.backbone.out_channels) if fusion else None
        self.head = AnchorHead(self.backbone.out_channels, len(yaws))

    def encode(self, batch: AgentBatch) -> torch.Tensor:
        """Per-view BEV features (N_total, C, H, W), each in its own frame."""
        pillars = self.pfn(batch.voxels, batch.num_points, batch.coords)
        bev = scatter_to_bev(pillars, batch.coords, batch.n_agents, self.input_grid)
        feats = self.backbone(bev)
        H, W = self.feature_grid.height, self.feature_grid.width
        if feats.shape[-2:] != (H, W):
            feats = nn.functional.interpolate(feats, size=(H, W), mode="nearest")
        return feats

    def fuse(self, feats: torch.Tensor, batch: AgentBatch) -> torch.Tensor:
        """Ego-frame features (B, C, H, W): fused over agents, or the first view of each sample."""
        if self.fusion is None:
            firsts = np.cumsum([0] + batch.record_len[:-1])
            return feats[torch.as_tensor(firsts, dtype=torch.long)]
        warped, valid = warp_to_ego(feats, batch.record_len, batch.T_ego_from_agent, self.feature_grid)
        meta = _meta(batch, warped.shape[1])
        return self.fusion(warped, valid, meta)

    def forward(self, batch: AgentBatch) -> HeadOutput:
        return self.head(self.fuse(self.encode(batch), batch))

    def forward_each_view(self, batch: AgentBatch) -> HeadOutput:
        """Head on every view separately (late fusion): outputs (N_total, A, ...), each in its own frame."""
        return self.head(self.encode(batch))


def _meta(batch: AgentBatch, slots: int) -> FusionMeta:
    B = len(batch.record_len)
    age = torch.zeros(B, slots)
    kind = torch.zeros(B, slots, dtype=torch.int64)
    T = torch.eye(4).repeat(B, slots, 1, 1)
    start = 0
    for b, n in enumerate(batch.record_len):
        age[b, :n] = batch.age[start : start + n]
        kind[b, :n] = batch.kind[start : start + n]
        T[b, :n] = batch.T_ego_from_agent[start : start + n]
        start += n
    return FusionMeta(age, kind, T)

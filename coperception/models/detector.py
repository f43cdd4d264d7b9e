"""PointPillars detector with an optional intermediate-fusion stage between backbone and head.

pillar feature net -> scatter to BEV -> 2D backbone -> [warp to ego + fusion] -> anchor head.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from coperception.comm.codebook import ResidualVQ
from coperception.comm.select import select_for_senders
from coperception.config import CommConfig, DatasetConfig, ModelConfig
from coperception.datasets.collate import AgentBatch
from coperception.fusion.base import FusionMeta, build_fusion, warp_to_ego
from coperception.models.anchors import BEVGrid, make_anchors
from coperception.models.backbone import BEVBackbone
from coperception.models.heads import AnchorHead, HeadOutput
from coperception.models.pillars import PillarFeatureNet, scatter_to_bev


class PointPillars(nn.Module):
    """`fusion=None`: each sample's first view is detected alone (no fusion / early / late).
    With `comm`, senders' features are reduced to their selected cells before fusion (and, with
    `codebook`, quantized by the residual codebook) exactly as the wire would carry them."""

    def __init__(self, mcfg: ModelConfig, dcfg: DatasetConfig, fusion: str | None = None, comm: CommConfig | None = None,
                 codebook: bool = False):
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
        self.selection = comm.selection if comm is not None else None
        self.message_dropout = 0.0  # set by training (TrainConfig.message_dropout)
        self.ego_supervision = False  # set by training (TrainConfig.ego_loss_weight > 0)
        self.quantizer: ResidualVQ | None = None
        if codebook:
            if comm is None:
                raise ValueError("a codebook needs the comm settings")
            cb = comm.codebook
            self.quantizer = ResidualVQ(self.backbone.out_channels, cb.segments, cb.stages, cb.codes, cb.decay,
                                        cb.commitment)

    def encode(self, batch: AgentBatch) -> torch.Tensor:
        """Per-view BEV features (N_total, C, H, W), each in its own frame."""
        pillars = self.pfn(batch.voxels, batch.num_points, batch.coords)
        bev = scatter_to_bev(pillars, batch.coords, batch.n_agents, self.input_grid)
        feats = self.backbone(bev)
        H, W = self.feature_grid.height, self.feature_grid.width
        if feats.shape[-2:] != (H, W):
            feats = nn.functional.interpolate(feats, size=(H, W), mode="nearest")
        return feats

    def sparsify(self, feats: torch.Tensor, batch: AgentBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keep only what senders would transmit: (features, arrived (N_total, H, W), commitment loss).
        The ego's own view stays whole; senders keep their selected cells, quantized with a codebook."""
        arrived = self.selected_cells(feats, batch)
        out = feats * arrived[:, None].to(feats.dtype)
        aux = None
        if self.quantizer is not None:
            n_idx, y_idx, x_idx = self._sent(arrived, batch)
            cells = feats[n_idx, :, y_idx, x_idx]
            q = self.quantizer(cells)
            out = _put_cells(out, n_idx, y_idx, x_idx, q.quantized)
            aux = q.commitment_loss
        return out, arrived, aux

    def selected_cells(self, feats: torch.Tensor, batch: AgentBatch) -> torch.Tensor:
        """(N_total, H, W) bool: every cell of an ego view, the cells each sender selects for the ego."""
        assert self.selection is not None
        arrived = torch.ones(feats.shape[0], *feats.shape[-2:], dtype=torch.bool, device=feats.device)
        with torch.no_grad():
            conf = self.head.confidence_map(feats)
        start = 0
        for n in batch.record_len:
            if n > 1:
                T = batch.T_ego_from_agent[start + 1 : start + n]
                masks, _ = select_for_senders(conf[start], conf[start + 1 : start + n], T, self.feature_grid, self.selection)
                arrived[start + 1 : start + n] = masks
            start += n
        return arrived

    @staticmethod
    def _sent(arrived: torch.Tensor, batch: AgentBatch) -> tuple[torch.Tensor, ...]:
        senders = ~batch.is_ego.to(arrived.device)[:, None, None]
        return torch.nonzero(arrived & senders, as_tuple=True)

    @torch.no_grad()
    def message_vectors(self, batch: AgentBatch) -> torch.Tensor:
        """(K, C) features of the cells the senders of `batch` would transmit (what the codebook codes)."""
        feats = self.encode(batch)
        n_idx, y_idx, x_idx = self._sent(self.selected_cells(feats, batch), batch)
        return feats[n_idx, :, y_idx, x_idx]

    def fuse(self, feats: torch.Tensor, batch: AgentBatch, arrived: torch.Tensor | None = None) -> torch.Tensor:
        """Ego-frame features (B, C, H, W): fused over agents, or the first view of each sample."""
        if self.fusion is None:
            return feats[batch.ego_index.to(feats.device)]
        warped, valid = warp_to_ego(feats, batch.record_len, batch.T_ego_from_agent, self.feature_grid, arrived)
        meta = _meta(batch, warped.shape[1])
        return self.fusion(warped, valid, meta)

    def _dropped_messages(self, batch: AgentBatch, like: torch.Tensor) -> torch.Tensor | None:
        """Training only: (N_total, H, W) arrived mask. With probability `message_dropout` a sample
        loses every sender's message (the ego detects alone, as under total loss); otherwise each
        sender's message is lost with probability `message_dropout / 2` (partial loss)."""
        if not (self.training and self.message_dropout > 0 and self.fusion is not None):
            return None
        N, H, W = like.shape[0], like.shape[-2], like.shape[-1]
        sample_of_view = torch.repeat_interleave(torch.arange(len(batch.record_len)), torch.tensor(batch.record_len))
        alone = torch.rand(len(batch.record_len)) < self.message_dropout
        keep = (torch.rand(N) >= self.message_dropout / 2) & ~alone[sample_of_view]
        keep |= batch.is_ego
        return keep.to(like.device)[:, None, None].expand(N, H, W)

    def forward(self, batch: AgentBatch) -> HeadOutput:
        feats = self.encode(batch)
        kept = self._dropped_messages(batch, feats)
        alone = None
        if self.training and self.ego_supervision and self.fusion is not None:
            alone = self.head(feats[batch.ego_index.to(feats.device)])
        if self.selection is None:
            out = self.head(self.fuse(feats, batch, kept))
        else:
            feats, arrived, aux = self.sparsify(feats, batch)
            if kept is not None:
                arrived = arrived & kept
            out = self.head(self.fuse(feats, batch, arrived))
            out.aux_loss = aux
        out.ego_alone = alone
        return out

    def forward_each_view(self, batch: AgentBatch) -> HeadOutput:
        """Head on every view separately (late fusion): outputs (N_total, A, ...), each in its own frame."""
        return self.head(self.encode(batch))


def _put_cells(feats: torch.Tensor, n: torch.Tensor, y: torch.Tensor, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `feats` (N, C, H, W) with the cells (n, :, y, x) replaced by `values` (K, C), differentiably."""
    N, C, H, W = feats.shape
    flat = feats.permute(0, 2, 3, 1).reshape(-1, C)
    index = (n * H + y) * W + x
    flat = flat.index_copy(0, index, values)
    return flat.reshape(N, H, W, C).permute(0, 3, 1, 2)


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

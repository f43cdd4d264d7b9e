"""The two graphs a deployment runs, as plain tensor-in / tensor-out modules that export to ONNX.

- `AgentGraph` (every car and roadside unit): a view's pillars (up to a capacity) -> BEV features -> the
  confidence map its selection ranks -> for codebook messages, the codes of its `code_cells` most
  confident cells (the cells a selection sends come from the top of that ranking).
- `EgoGraph` (the ego): the decoded features of up to L agents, the sampling matrices of their
  warps and their arrived masks -> warp -> fusion -> detection head.

What ONNX does not express stays in numpy around them (`export/runtime.py`): voxelization (a subset
of the pillars above the capacity), choosing the cells (threshold / top-k), packet coding, the
conversion of poses into sampling matrices, box decoding and NMS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coperception.comm.codecs import CodebookCodec, DenseCodec, SparseFp32Codec
from coperception.errors import ConfigError
from coperception.fusion.base import FUSIONS, FusionMeta
from coperception.models.encoders import PointPillarsEncoder

EXPORTABLE_FUSIONS = ("max", "mean", "attention")


class ExportError(ConfigError):
    """A model or config the export does not support; the message names what."""


def check_exportable(model) -> None:
    """Raise `ExportError` naming the first part of `model` (a `CooperativeModel`) export cannot handle."""
    if model.agent is None or model.ego is None:
        raise ExportError(f"export: cooperation strategy {model.strategy.name!r} has no agent and ego graphs; "
                          "export an intermediate-fusion model (cooperation.strategy: intermediate)")
    nets = list(model.encoders.nets.items())
    if len(nets) != 1 or not isinstance(nets[0][1], PointPillarsEncoder):
        raise ExportError(f"export: encoders {[n for n, _ in nets]} unsupported; one `pointpillars` encoder for every "
                          "agent kind is what the agent graph exports")
    name = next((n for n in FUSIONS if FUSIONS.get(n) is type(model.ego.fusion)), type(model.ego.fusion).__name__)
    if name not in EXPORTABLE_FUSIONS:
        raise ExportError(f"export: fusion {name!r} unsupported; exportable: {', '.join(EXPORTABLE_FUSIONS)}")
    if not isinstance(model.agent.codec, (CodebookCodec, SparseFp32Codec, DenseCodec)):
        raise ExportError(f"export: codec {type(model.agent.codec).__name__} unsupported")


class AgentGraph(nn.Module):
    """voxels (P, N, 4), num_points (P,), coords (P, 3) as (z, y, x) with unused slots at num_points 0
    -> features (1, C, H, W), confidence (1, H, W) and, for codebook messages, the flat indices of the
    `code_cells` most confident cells (K,) and their codes (K, m, r) int64."""

    def __init__(self, model, code_cells: int = 512):
        super().__init__()
        check_exportable(model)
        self.encoder: PointPillarsEncoder = next(iter(model.encoders.nets.values()))
        self.head_cls = model.head.cls
        codec = model.agent.codec
        self.quantizer = codec.quantizer if isinstance(codec, CodebookCodec) else None
        self.code_cells = min(code_cells, model.feature_grid.cells)

    def forward(self, voxels: torch.Tensor, num_points: torch.Tensor, coords: torch.Tensor):
        enc = self.encoder
        grid = enc.input_grid
        batch_coords = torch.cat([torch.zeros_like(coords[:, :1]), coords], dim=1)
        pillars = enc.pfn(voxels, num_points, batch_coords)
        # empty slots go to one extra cell that is cut off, so they never overwrite a real pillar
        flat = coords[:, 1].long() * grid.width + coords[:, 2].long()
        flat = torch.where(num_points > 0, flat, torch.full_like(flat, grid.height * grid.width))
        canvas = pillars.new_zeros(grid.height * grid.width + 1, pillars.shape[1])
        canvas = canvas.index_copy(0, flat, pillars)
        bev = canvas[:-1].reshape(1, grid.height, grid.width, -1).permute(0, 3, 1, 2)
        feats = enc.backbone(bev)
        if feats.shape[-2:] != (enc.grid.height, enc.grid.width):
            feats = F.interpolate(feats, size=(enc.grid.height, enc.grid.width), mode="nearest")
        confidence = torch.sigmoid(self.head_cls(feats)).amax(dim=1)
        if self.quantizer is None:
            return feats, confidence
        top = torch.topk(confidence.flatten(), self.code_cells).indices  # searching codes for every cell costs most
        cells = feats[0].flatten(1).transpose(0, 1)[top]  # (K, C)
        return feats, confidence, top, self.quantizer.encode(cells)


class EgoGraph(nn.Module):
    """features (L, C, H, W) with the ego first, theta (L, 2, 3) `affine_grid` matrices of each warp
    (`grid.affine_to_source`), arrived (L, H, W) bool, age (L,), kind (L,) int64 -> the head's cls
    (1, A), reg (1, A, 7) and direction (1, A, 2) (anchor order H, W, R)."""

    def __init__(self, model):
        super().__init__()
        check_exportable(model)
        self.fusion = model.ego.fusion
        self.head = model.head

    def forward(self, features: torch.Tensor, theta: torch.Tensor, arrived: torch.Tensor, age: torch.Tensor,
                kind: torch.Tensor):
        L, C, H, W = features.shape
        sampling = F.affine_grid(theta, [L, C, H, W], align_corners=False)
        warped = F.grid_sample(features, sampling, mode="bilinear", padding_mode="zeros", align_corners=False)
        mask = F.grid_sample(arrived[:, None].to(features.dtype), sampling, mode="nearest", padding_mode="zeros",
                             align_corners=False)
        valid = mask[:, 0] > 0.5
        T = torch.eye(4, dtype=features.dtype, device=features.device).expand(1, L, 4, 4)
        fused = self.fusion(warped[None], valid[None], FusionMeta(age[None], kind[None], T))
        out = self.head(fused)
        return out.cls, out.reg, out.direction

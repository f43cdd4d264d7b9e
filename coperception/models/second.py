"""SECOND encoder: voxels -> sparse 3D convolutions (spconv) -> BEV map -> the 2D backbone.

Behind the `spconv` extra (`pip install 'coperception-v2x[spconv]'`: spconv 2.3.8, cumm 0.7.11). Two fixes
make spconv run on a CPU-only torch (DESIGN §8): its ops ask for the current CUDA stream unconditionally
(`spconv_on_cpu` answers 0 where torch has no CUDA), and its CPU scatter-add is racy with more than one
torch thread, so on CPU the sparse layers run with one thread, forward and backward (`_one_thread`).
The voxel grid has `model.voxel_size` cells (e.g. 0.8 x 0.8 x 0.4 m: 10 height layers); the sparse
part halves the height twice and keeps the x/y resolution, so the BEV map sits on the same grid as
PointPillars' and the same backbone and head follow.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from coperception.config import DatasetConfig, ModelConfig
from coperception.errors import ConfigError
from coperception.models.encoder_base import ENCODERS, BEVEncoder, input_grid
from coperception.types import AgentBatch

SPARSE_CHANNELS = (16, 32, 32)  # sub-manifold stem, then two stages that halve the height


def import_spconv() -> Any:
    """`spconv.pytorch`, patched to run on CPU-only torch; a ConfigError names the extra when missing."""
    try:
        import spconv.pytorch as spconv
    except ImportError:
        raise ConfigError("encoder `second` needs spconv: pip install 'coperception-v2x[spconv]' "
                          "(spconv 2.3.8, cumm 0.7.11)") from None
    spconv_on_cpu()
    return spconv


def spconv_on_cpu() -> None:
    """Where torch has no CUDA, spconv's stream getter (called on CPU too) answers 0 instead of failing."""
    if torch.cuda.is_available():
        return
    import importlib

    for name in ("cppcore", "ops", "hash", "utils"):
        module = importlib.import_module(f"spconv.pytorch.{name}")
        if hasattr(module, "get_current_stream"):
            module.get_current_stream = lambda: 0  # type: ignore[attr-defined]


@contextlib.contextmanager
def _one_thread(active: bool) -> Iterator[None]:
    previous = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class SparseMiddle(nn.Module):
    """Sparse 3D convolutions on (V, C_in) voxel features at (V, 4) (slot, z, y, x) indices -> a dense
    (B, C * D_out, H, W) BEV map."""

    def __init__(self, in_channels: int, spatial_shape: tuple[int, int, int]):
        super().__init__()
        spconv = import_spconv()
        self.spconv = spconv
        self.spatial_shape = list(spatial_shape)
        c0, c1, c2 = SPARSE_CHANNELS

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)

        self.net = spconv.SparseSequential(
            spconv.SubMConv3d(in_channels, c0, 3, padding=1, bias=False, indice_key="stem"), norm(c0), nn.ReLU(),
            spconv.SubMConv3d(c0, c0, 3, padding=1, bias=False, indice_key="stem"), norm(c0), nn.ReLU(),
            spconv.SparseConv3d(c0, c1, 3, stride=(2, 1, 1), padding=1, bias=False), norm(c1), nn.ReLU(),
            spconv.SubMConv3d(c1, c1, 3, padding=1, bias=False, indice_key="s1"), norm(c1), nn.ReLU(),
            spconv.SparseConv3d(c1, c2, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0), bias=False), norm(c2), nn.ReLU(),
        )
        depth = spatial_shape[0]
        for _ in range(2):
            depth = (depth - 1) // 2 + 1  # kernel 3, padding 1, stride 2
        self.out_depth = depth
        self.out_channels = c2 * depth

    def forward(self, features: torch.Tensor, indices: torch.Tensor, batch_size: int) -> torch.Tensor:
        cpu = features.device.type == "cpu"
        with _one_thread(cpu):
            x = self.spconv.SparseConvTensor(features, indices.int(), self.spatial_shape, batch_size)
            dense = self.net(x).dense()  # (B, C, D, H, W)
        if cpu and features.requires_grad and dense.requires_grad:
            # the backward through the sparse layers: one thread from the gradient of their output until the
            # gradient of their input, then the count it had
            restore = torch.get_num_threads()
            dense.register_hook(lambda grad: (torch.set_num_threads(1), grad)[1])
            features.register_hook(lambda grad: (torch.set_num_threads(restore), grad)[1])
        B, C, D, H, W = dense.shape
        return dense.reshape(B, C * D, H, W)


@ENCODERS.register("second")
class SecondEncoder(BEVEncoder):
    """Mean of each voxel's points -> a linear voxel feature -> `SparseMiddle` -> `BEVBackbone`."""

    inputs = ("lidar",)

    def __init__(self, mcfg: ModelConfig, dcfg: DatasetConfig):
        super().__init__()
        r, self.input_grid = input_grid(mcfg, dcfg)
        depth = int(np.round((r[5] - r[2]) / mcfg.voxel_size[2]))
        if depth < 2:
            raise ConfigError(f"encoder `second`: model.voxel_size z {mcfg.voxel_size[2]} gives {depth} height layer(s) "
                              f"over the range's {r[5] - r[2]:.1f} m; SECOND needs several (e.g. 0.4 m)")
        self.voxel_features = nn.Sequential(nn.Linear(4, mcfg.pfn_channels, bias=False),
                                            nn.BatchNorm1d(mcfg.pfn_channels, eps=1e-3, momentum=0.01), nn.ReLU())
        self.middle = SparseMiddle(mcfg.pfn_channels, (depth, self.input_grid.height, self.input_grid.width))
        self.add_backbone(self.middle.out_channels, mcfg, r)

    def forward(self, batch: AgentBatch) -> torch.Tensor:
        self.check_inputs(batch)
        lidar = batch.lidar
        assert lidar is not None
        n = lidar.num_points.clamp(min=1).to(lidar.voxels.dtype)[:, None]
        mask = (torch.arange(lidar.voxels.shape[1], device=lidar.voxels.device)[None, :] < lidar.num_points[:, None])
        mean = (lidar.voxels * mask[..., None]).sum(dim=1) / n  # (V, 4)
        feats = self.middle(self.voxel_features(mean), lidar.coords, batch.n_agents)
        return self.on_grid(self.backbone(feats))

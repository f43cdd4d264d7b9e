"""SECOND's sparse 3D convolutions (spconv, the `spconv` extra) against dense `conv3d`, forward and
gradient, on CPU with the fixes of DESIGN §8; the encoder end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

spconv_module = pytest.importorskip("spconv.pytorch")

from coperception.config import DatasetConfig, ModelConfig  # noqa: E402
from coperception.models.encoders import ENCODERS  # noqa: E402
from coperception.models.second import _one_thread, import_spconv  # noqa: E402
from coperception.types import AgentBatch, PillarBatch  # noqa: E402

SHAPE = (5, 6, 7)  # D, H, W


def _sparse_input(seed: int = 0, channels: int = 3, count: int = 30):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(int(np.prod(SHAPE)), generator=g)[:count]
    z, rest = flat // (SHAPE[1] * SHAPE[2]), flat % (SHAPE[1] * SHAPE[2])
    indices = torch.stack([torch.zeros_like(z), z, rest // SHAPE[2], rest % SHAPE[2]], dim=1).int()
    features = torch.randn(count, channels, generator=g)
    return indices, features


def _dense(indices: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(1, features.shape[1], *SHAPE)
    i = indices.long()
    out[0, :, i[:, 1], i[:, 2], i[:, 3]] = features.T
    return out


@pytest.mark.parametrize("submanifold", [False, True])
def test_sparse_convolution_equals_dense_conv3d_forward_and_gradient(submanifold):
    spconv = import_spconv()
    torch.manual_seed(0)
    indices, features = _sparse_input()
    layer = (spconv.SubMConv3d if submanifold else spconv.SparseConv3d)(3, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        layer.weight.normal_()
    weight = layer.weight.detach().permute(0, 4, 1, 2, 3).contiguous().requires_grad_(True)  # (out, in, kD, kH, kW)
    sparse_in = features.clone().requires_grad_(True)
    dense_in = _dense(indices, features).requires_grad_(True)
    with _one_thread(True):
        out = layer(spconv_module.SparseConvTensor(sparse_in, indices, list(SHAPE), 1)).dense()
    expected = torch.nn.functional.conv3d(dense_in, weight, padding=1)
    if submanifold:  # outputs only where there was input
        expected = expected * (_dense(indices, torch.ones(len(indices), 1)) > 0)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    with _one_thread(True):
        (out * probe).sum().backward()
    (expected * probe).sum().backward()
    i = indices.long()
    torch.testing.assert_close(sparse_in.grad, dense_in.grad[0, :, i[:, 1], i[:, 2], i[:, 3]].T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.weight.grad.permute(0, 4, 1, 2, 3), weight.grad, atol=1e-3, rtol=1e-4)


def test_second_encoder_gives_the_pointpillars_grid_and_trains_on_cpu():
    dcfg = DatasetConfig(point_cloud_range=[-12.8, -6.4, -3.0, 12.8, 6.4, 1.0])
    mcfg = ModelConfig(encoders={"default": "second"}, voxel_size=(0.8, 0.8, 0.4), max_points_per_voxel=4,
                       layers=[1, 1], strides=[2, 2], filters=[8, 16], upsample_filters=[8, 8], pfn_channels=8)
    second = ENCODERS.get("second")(mcfg, dcfg)
    pillars = ENCODERS.get("pointpillars")(mcfg.model_copy(update={"voxel_size": (0.8, 0.8, 4.0)}), dcfg)
    assert second.grid == pillars.grid and second.out_channels == pillars.out_channels
    g = torch.Generator().manual_seed(0)
    n = 40
    coords = torch.stack([torch.randint(0, 2, (n,), generator=g), torch.randint(0, 10, (n,), generator=g),
                          torch.randint(0, 16, (n,), generator=g), torch.randint(0, 32, (n,), generator=g)], dim=1)
    coords = torch.unique(coords, dim=0)
    lidar = PillarBatch(torch.randn(len(coords), 4, 4, generator=g), torch.randint(1, 5, (len(coords),), generator=g),
                        coords)
    batch = AgentBatch([1, 1], torch.eye(4).repeat(2, 1, 1), torch.zeros(2), torch.zeros(2, dtype=torch.int64), lidar)
    threads = torch.get_num_threads()
    out = second.train()(batch)
    assert out.shape == (2, second.out_channels, second.grid.height, second.grid.width)
    out.square().mean().backward()
    assert second.voxel_features[0].weight.grad.abs().sum() > 0
    assert torch.get_num_threads() == threads  # the one-thread guard of the sparse layers is undone

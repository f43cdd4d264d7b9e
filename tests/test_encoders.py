"""Encoders are chosen per agent kind through their registry; kinds naming the same encoder share it."""

from __future__ import annotations

import pytest
import torch

from coperception.config import load_config
from coperception.datasets.collate import collate, prepare_sample
from coperception.datasets.readers import build_dataset
from coperception.errors import ConfigError
from coperception.models.encoders import ENCODERS, BEVEncoder, PointPillarsEncoder
from coperception.pipeline.model import build_model

from test_train import TINY


class ConstantEncoder(BEVEncoder):
    """A stand-in for a second sensor's encoder: the PointPillars grid and width, every value 5."""

    inputs = ()

    def __init__(self, mcfg, dcfg):
        super().__init__()
        reference = PointPillarsEncoder(mcfg, dcfg)
        self.grid, self.out_channels = reference.grid, reference.out_channels

    def forward(self, batch):
        return torch.full((batch.n_agents, self.out_channels, self.grid.height, self.grid.width), 5.0)


if "test-constant" not in ENCODERS:
    ENCODERS.register("test-constant")(ConstantEncoder)


def _batch(opv2v_set, cfg, kinds):
    sample = build_dataset(cfg.dataset, "test")[0]
    batch, _, _ = collate([prepare_sample(sample, "projected", cfg.dataset, cfg.model)])
    batch.kind = torch.tensor(kinds[: batch.n_agents])
    return batch


def test_each_agent_kind_uses_its_own_encoder(opv2v_set):
    base = [f"dataset.root={opv2v_set.root}", *TINY]
    mixed = build_model(load_config(None, [*base, "model.encoders={default: pointpillars, rsu: test-constant}"]))
    assert set(mixed.encoders.nets) == {"pointpillars", "test-constant"}
    batch = _batch(opv2v_set, load_config(None, base), [0, 1, 0, 1])
    mixed.eval()
    feats = mixed.encode(batch)
    rsu = batch.kind == 1
    assert (feats[rsu] == 5.0).all() and not (feats[~rsu] == 5.0).all()
    # the vehicles' views are exactly what the LiDAR encoder gives them on its own
    alone = mixed.encoders.nets["pointpillars"](batch.subset_views(torch.nonzero(~rsu)[:, 0]))
    torch.testing.assert_close(feats[~rsu], alone)


def test_kinds_naming_one_encoder_share_its_weights(opv2v_set):
    shared = build_model(load_config(None, [*TINY, "model.encoders={default: pointpillars, rsu: pointpillars}"]))
    assert list(shared.encoders.nets) == ["pointpillars"]


def test_an_encoder_without_its_input_says_so(opv2v_set):
    cfg = load_config(None, [f"dataset.root={opv2v_set.root}", *TINY])
    model = build_model(cfg)
    batch = _batch(opv2v_set, cfg, [0, 0, 0, 0])
    batch.lidar = None
    with pytest.raises(ConfigError, match=r"needs the batch input\(s\) \['lidar'\]"):
        model.encode(batch)


def test_a_subset_renumbers_views_and_keeps_views_without_pillars():
    from coperception.types import PillarBatch

    coords = torch.tensor([[0, 0, 1, 1], [2, 0, 3, 3], [2, 0, 4, 4]])
    pillars = PillarBatch(torch.arange(3.0).view(3, 1, 1).repeat(1, 2, 4), torch.ones(3, dtype=torch.int32), coords)
    sub = pillars.subset(torch.tensor([2, 3]))  # view 3 has no pillar at all
    assert sub.coords[:, 0].tolist() == [0, 0] and sub.voxels[:, 0, 0].tolist() == [1.0, 2.0]
    assert len(pillars.subset(torch.tensor([1])).coords) == 0

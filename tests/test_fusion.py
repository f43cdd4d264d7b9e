"""The warp-once step, the fusion modules with masks, and the registries they are chosen from."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coperception.config import load_config
from coperception.errors import ConfigError
from coperception.fusion.attention import AttentionFusion
from coperception.fusion.base import FUSIONS, FusionMeta, build_fusion
from coperception.fusion.warp import warp_to_ego
from coperception.grid import BEVGrid


def _pose(x: float = 0.0, y: float = 0.0, yaw_deg: float = 0.0) -> torch.Tensor:
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    T = torch.eye(4)
    T[:2, :2] = torch.tensor([[c, -s], [s, c]])
    T[0, 3], T[1, 3] = x, y
    return T


def _meta(B: int, L: int) -> FusionMeta:
    return FusionMeta(torch.zeros(B, L), torch.zeros(B, L, dtype=torch.int64), torch.eye(4).repeat(B, L, 1, 1))


def test_warp_shifts_a_sender_by_its_translation():
    grid = BEVGrid(-8.0, -4.0, 1.0, 8, 16)  # 16 x 8 cells of 1 m
    feats = torch.zeros(2, 1, 8, 16)
    feats[0, 0, 2, 5] = 7.0  # the ego's own cell stays where it is
    feats[1, 0, 6, 4] = 3.0  # sender cell: x = -8 + 4.5, y = -4 + 6.5 in its frame
    T = torch.stack([_pose(), _pose(x=3.0)])  # the sender sits 3 m ahead of the ego
    warped, valid = warp_to_ego(feats, [2], T, grid)
    assert warped.shape == (1, 2, 1, 8, 16) and valid.shape == (1, 2, 8, 16)
    assert warped[0, 0, 0, 2, 5] == 7.0 and valid[0, 0].all()
    assert warped[0, 1, 0, 6, 7] == pytest.approx(3.0)  # 3 cells further along x
    assert warped[0, 1].sum() == pytest.approx(3.0)
    assert not valid[0, 1, :, :3].any() and valid[0, 1, :, 3:].all()  # ego cells behind the sender's grid


def test_warp_turns_a_sender_by_its_yaw():
    grid = BEVGrid(-8.0, -8.0, 1.0, 16, 16)
    feats = torch.zeros(2, 1, 16, 16)
    feats[1, 0, 8, 10] = 5.0  # sender frame (x 2.5, y 0.5): ahead of it
    T = torch.stack([_pose(), _pose(yaw_deg=90.0)])  # its x axis is the ego's y axis
    warped, valid = warp_to_ego(feats, [2], T, grid)
    # ego frame (-0.5, 2.5): row 10, col 7
    assert warped[0, 1, 0, 10, 7] == pytest.approx(5.0)
    assert warped[0, 1].sum() == pytest.approx(5.0)
    assert valid[0, 1].all()  # a square grid turned by 90 degrees still covers every cell


def test_warp_pads_samples_with_fewer_agents_and_respects_arrived_cells():
    grid = BEVGrid(-4.0, -4.0, 1.0, 8, 8)
    feats = torch.rand(3, 2, 8, 8)
    arrived = torch.ones(3, 8, 8, dtype=torch.bool)
    arrived[1, :4] = False  # half of the first sample's sender did not arrive
    warped, valid = warp_to_ego(feats, [2, 1], torch.eye(4).repeat(3, 1, 1), grid, arrived)
    assert warped.shape == (2, 2, 2, 8, 8)
    torch.testing.assert_close(warped[0, 0], feats[0])
    torch.testing.assert_close(warped[1, 0], feats[2])
    assert not valid[1, 1].any() and (warped[1, 1] == 0).all()  # padding slot
    assert not valid[0, 1, :4].any() and valid[0, 1, 4:].all()


def test_max_and_mean_fuse_only_valid_cells():
    ego = torch.tensor([1.0, -2.0])
    sender = torch.tensor([3.0, -5.0])
    garbage = torch.tensor([1e9, float("nan")])
    features = torch.stack([ego, sender, garbage])[None, :, :, None, None].repeat(1, 1, 1, 1, 2)  # (1, 3, 2, 1, 2)
    valid = torch.tensor([[[[True, True]], [[True, False]], [[False, False]]]])  # (1, 3, 1, 2)
    fused_max = build_fusion("max", 2)(features, valid, _meta(1, 3))
    fused_mean = build_fusion("mean", 2)(features, valid, _meta(1, 3))
    torch.testing.assert_close(fused_max[0, :, 0, 0], torch.tensor([3.0, -2.0]))
    torch.testing.assert_close(fused_max[0, :, 0, 1], ego)  # only the ego covers it
    torch.testing.assert_close(fused_mean[0, :, 0, 0], torch.tensor([2.0, -3.5]))
    torch.testing.assert_close(fused_mean[0, :, 0, 1], ego)
    nothing = torch.zeros_like(valid)
    assert (build_fusion("max", 2)(features, nothing, _meta(1, 3)) == 0).all()
    assert (build_fusion("mean", 2)(features, nothing, _meta(1, 3)) == 0).all()


def test_attention_keeps_the_ego_where_nothing_else_arrived_and_ignores_invalid_senders():
    torch.manual_seed(0)
    fusion = build_fusion("attention", 8, {"heads": 2, "key_channels": 4})
    assert isinstance(fusion, AttentionFusion)
    features = torch.randn(2, 3, 8, 4, 5)
    valid = torch.ones(2, 3, 4, 5, dtype=torch.bool)
    valid[:, 1:, :, :2] = False  # senders miss the first two columns
    valid[1, 2] = False  # sample 1's second sender missed entirely
    meta = FusionMeta(torch.tensor([[0.0, 0.1, 0.2], [0.0, 0.1, 0.3]]), torch.tensor([[0, 0, 1], [0, 1, 0]]),
                      torch.eye(4).repeat(2, 3, 1, 1))
    out = fusion(features, valid, meta)
    assert out.shape == (2, 8, 4, 5)
    torch.testing.assert_close(out[:, :, :, :2], features[:, 0, :, :, :2])  # ego alone there: its own feature
    poisoned = features.clone()
    poisoned[1, 2] = float("nan")  # what an invalid sender holds must not leak in
    torch.testing.assert_close(fusion(poisoned, valid, meta)[1], out[1])
    # where senders arrived the result mixes them in, with weights that depend on their kind and age
    assert not torch.allclose(out[0, :, :, 2:], features[0, 0, :, :, 2:])
    max_fused = build_fusion("max", 8)(features, valid, meta)
    torch.testing.assert_close(out, max_fused)  # base max: the correction starts at zero (training starts from max)
    torch.nn.init.normal_(fusion.out.weight)  # as training leaves it: the attention's correction counts
    out = fusion(features, valid, meta)
    torch.testing.assert_close(out[:, :, :, :2], features[:, 0, :, :, :2])
    older = FusionMeta(meta.age + torch.tensor([0.0, 0.4, 0.0]), meta.kind, meta.T_ego_from_agent)
    assert not torch.allclose(fusion(features, valid, older)[0, :, :, 2:], out[0, :, :, 2:])
    out.sum().backward()
    assert fusion.query.weight.grad is not None and fusion.age_embedding.weight.grad.abs().sum() > 0


def test_attention_without_base_is_the_weighted_mean_of_the_agents():
    torch.manual_seed(0)
    fusion = build_fusion("attention", 8, {"heads": 2, "key_channels": 4, "base": "none"})
    features = torch.rand(1, 3, 8, 4, 5)
    valid = torch.ones(1, 3, 4, 5, dtype=torch.bool)
    out = fusion(features, valid, _meta(1, 3))
    lo, hi = features.amin(dim=1), features.amax(dim=1)
    assert ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()  # a convex combination of the agents' values


def test_fusion_registry_and_settings_errors_name_what_is_known():
    assert {"max", "mean", "attention"} <= set(FUSIONS)
    with pytest.raises(ConfigError, match=r"fusion.method 'maximum' is unknown; known: .*attention.*max.*mean"):
        build_fusion("maximum", 8)
    with pytest.raises(ConfigError, match=r"fusion.options for 'attention': heads"):
        build_fusion("attention", 8, {"heads": 0})
    with pytest.raises(ConfigError, match=r"fusion.options for 'max': heads: Extra inputs"):
        build_fusion("max", 8, {"heads": 2})
    with pytest.raises(ValueError, match="must divide"):
        build_fusion("attention", 10, {"heads": 3})
    with pytest.raises(ConfigError, match="context: .*must be odd"):
        build_fusion("attention", 8, {"context": 2})


def test_attention_fusion_trains_and_evaluates_through_the_comm_session(opv2v_set, tmp_path):
    from coperception.evaluate import evaluate_method
    from coperception.pipeline.model import load_model
    from coperception.train import train

    from test_train import TINY

    cfg = load_config(None, [f"dataset.root={opv2v_set.root}", "dataset.train_split=test", "dataset.val_split=test",
                             "dataset.eval_split=test", f"train.out_dir={tmp_path}", *TINY, "train.max_steps=2",
                             "comm.codec=sparse", "fusion.method=attention", "fusion.options={heads: 2, key_channels: 8}"])
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["history"][-1]["loss"]) and summary["method"] == "sparse-attention"
    entry = evaluate_method(load_model(tmp_path / "last.pt", cfg), cfg, "test", progress=False, limit=3)
    assert entry["bytes_per_agent_frame"] > 0 and set(entry["ap"]) == {"0.3", "0.5", "0.7"}
    fusion = entry["params"]["fusion"]
    assert (fusion["method"], fusion["options"], fusion["motion"]["enabled"]) == \
        ("attention", {"heads": 2, "key_channels": 8}, False)

"""Properties every registered fusion keeps (shape, masks, agent order, a lone ego), the uncertainty-trust
fusion and its uncertainty head, and motion compensation of late messages (sender tracker, wire, warp)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from coperception.comm.kinds import MalformedMessage, MessageKind
from coperception.comm.wire import FLAG_MOTION, Message, decode_packets, encode_message
from coperception.config import MotionSettings
from coperception.fusion import warp
from coperception.fusion.base import FUSIONS, FusionMeta, build_fusion
from coperception.fusion.motion import (MotionTracker, compensate, least_squares_velocity, moving_objects,
                                        robust_velocity)
from coperception.fusion.trust import UncertaintyTrustFusion
from coperception.fusion.warp import warp_to_ego
from coperception.grid import BEVGrid
from coperception.models.heads import AnchorHead
from coperception.models.uncertainty import UncertaintyHead, as_sent, dequantize, quantize, uncertainty_loss

# every fusion, with settings that make the learned parts matter (a zero-initialised output would hide them)
VARIANTS = {"max": {}, "mean": {}, "attention": {"heads": 2, "key_channels": 4},
            "attention_none": {"heads": 2, "key_channels": 4, "base": "none"},
            "attention_context": {"heads": 2, "key_channels": 4, "context": 3},
            "uncertainty_trust": {"initial_trust": 0.6}}


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    options = dict(VARIANTS[name])
    fusion = build_fusion(name.replace("_none", "").replace("_context", ""), 8, options)
    for module in fusion.modules():  # as training would leave it: nothing zero
        if isinstance(module, torch.nn.Conv2d) and not module.weight.abs().sum():
            torch.nn.init.normal_(module.weight, std=0.3)
    return fusion.eval()


def _inputs(B: int = 2, L: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(B, L, 8, 5, 6, generator=g)
    valid = torch.rand(B, L, 5, 6, generator=g) > 0.3
    valid[:, 0] = True
    meta = FusionMeta(torch.rand(B, L, generator=g) * 0.4, torch.randint(0, 2, (B, L), generator=g),
                      torch.eye(4).repeat(B, L, 1, 1), torch.rand(B, L, 5, 6, generator=g),
                      torch.rand(B, L, 2, 5, 6, generator=g) * 0.3)
    meta.age[:, 0] = 0.0
    return features, valid, meta


def _permuted(features, valid, meta, order):
    return (features[:, order], valid[:, order],
            FusionMeta(meta.age[:, order], meta.kind[:, order], meta.T_ego_from_agent[:, order],
                       meta.confidence[:, order], meta.uncertainty[:, order]))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_fusion_keeps_shape_ignores_masked_cells_and_agent_order(name):
    fusion = _build(name)
    features, valid, meta = _inputs()
    with torch.no_grad():
        out = fusion(features, valid, meta)
        assert out.shape == (2, 8, 5, 6) and torch.isfinite(out).all()
        garbage = features.clone()
        garbage[:, 1:][~valid[:, 1:][:, :, None].expand_as(garbage[:, 1:])] = float("nan")
        torch.testing.assert_close(fusion(garbage, valid, meta), out)  # what did not arrive does not count
        order = [0, 3, 1, 2]
        torch.testing.assert_close(fusion(*_permuted(features, valid, meta, order)), out, atol=1e-5, rtol=1e-5)
        # a lone ego, or an ego whose senders all missed: its own feature
        lone = FusionMeta(meta.age[:, :1], meta.kind[:, :1], meta.T_ego_from_agent[:, :1], meta.confidence[:, :1],
                          meta.uncertainty[:, :1])
        torch.testing.assert_close(fusion(features[:, :1], valid[:, :1], lone), features[:, 0])
        nothing = valid.clone()
        nothing[:, 1:] = False
        torch.testing.assert_close(fusion(features, nothing, meta), features[:, 0])


def test_trust_scales_senders_and_its_extremes_are_ego_only_and_max():
    fusion = UncertaintyTrustFusion(8, UncertaintyTrustFusion.Settings(initial_trust=0.5))
    features, valid, meta = _inputs()
    with torch.no_grad():
        trust = fusion.trust_of(meta, features.shape, features)
        assert trust.shape == (2, 4, 5, 6) and (trust[:, 0] == 1).all() and torch.allclose(trust[:, 1:], torch.tensor(0.5))
        fusion.trust[2].bias.fill_(-100.0)  # distrust everyone: the ego alone
        torch.testing.assert_close(fusion(features, valid, meta), features[:, 0])
        fusion.trust[2].bias.fill_(100.0)  # trust everyone: max fusion
        torch.testing.assert_close(fusion(features, valid, meta), build_fusion("max", 8)(features, valid, meta))
    # the trust network reads the message age and the uncertainty: both change the fused result
    fusion = _build("uncertainty_trust")
    with torch.no_grad():
        out = fusion(features, valid, meta)
        older = FusionMeta(meta.age + 0.3, meta.kind, meta.T_ego_from_agent, meta.confidence, meta.uncertainty)
        assert not torch.allclose(fusion(features, valid, older), out)
        surer = FusionMeta(meta.age, meta.kind, meta.T_ego_from_agent, meta.confidence, meta.uncertainty * 0.1)
        assert not torch.allclose(fusion(features, valid, surer), out)


def test_uncertainty_head_estimates_quantizes_and_learns():
    torch.manual_seed(0)
    head = UncertaintyHead(8, 2, hidden=8, dropout=0.3, passes=4)
    feats = torch.rand(3, 8, 5, 6)
    u = head.estimate(feats)
    assert u.shape == (3, 2, 5, 6) and (u >= 0).all()
    assert u[:, 1].max() > 0  # MC dropout passes disagree somewhere
    # one byte each: the quantization error is within half a step
    values = torch.tensor([[0.01, 0.0], [0.5, 0.123], [3.0, 0.5]])
    back = dequantize(quantize(values))
    assert quantize(values).dtype == torch.uint8
    assert torch.allclose(torch.log(back[:, 0]), torch.log(values[:, 0]), atol=16 / 255 / 2 + 1e-6)
    assert torch.allclose(back[:, 1], values[:, 1], atol=0.5 / 255 / 2 + 1e-6)
    torch.testing.assert_close(as_sent(as_sent(u)), as_sent(u))
    # the loss falls when the log-variance fits the detector's error
    detector = AnchorHead(8, 2)
    out = detector(feats)
    labels = torch.zeros(3, 5 * 6 * 2, dtype=torch.int64)
    labels[:, ::7] = 1
    residuals = torch.randn(3, 5 * 6 * 2, 7)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        logits, log_var = head(feats)
        loss = uncertainty_loss(logits, log_var, out, labels, residuals)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1


# ---------------------------------------------------------------- motion compensation

def test_a_message_moved_by_a_known_motion_lands_in_the_right_cells():
    grid = BEVGrid(-8.0, -4.0, 1.0, 8, 16)
    feats = torch.zeros(2, 1, 8, 16)
    feats[1, 0, 4, 3] = 5.0  # a car at x = -4.5, y = 0.5 in the sender's frame (3 m ahead of the ego)
    feats[1, 0, 1, 12] = 2.0  # a parked car elsewhere
    T = torch.stack([torch.eye(4), torch.eye(4)])
    T[1, 0, 3] = 3.0
    car = torch.tensor([[-4.5, 0.5, 10.0, 0.0, 1.0, 1.0, 0.0]])  # 10 m/s along x, 1 m x 1 m
    age = torch.tensor([0.0, 0.4])  # 0.4 s old: the car is now 4 m further
    warped, valid = warp_to_ego(feats, [2], T, grid, None, [None, car], age, margin=0.0)
    # sender (-4.5 + 4, 0.5) -> ego (2.5, 0.5): row 4, col 10
    assert warped[0, 1, 0, 4, 10] == pytest.approx(5.0)
    assert not valid[0, 1, 4, 6] and valid[0, 1, 4, 10]  # where it was (ego col 6) the message no longer counts
    assert warped[0, 1, 0, 1, 15] == pytest.approx(2.0)  # the parked car stays (sender col 12 -> ego col 15)
    # the same message without motion keeps the car where it was captured
    still, _ = warp_to_ego(feats, [2], T, grid)
    assert still[0, 1, 0, 4, 6] == pytest.approx(5.0) and still[0, 1, 0, 4, 10] == 0
    # age 0: nothing moves
    fresh, _ = warp_to_ego(feats, [2], T, grid, None, [None, car], torch.zeros(2), margin=0.0)
    torch.testing.assert_close(fresh, still)


def test_a_move_snapped_to_whole_cells_keeps_the_features_intact():
    grid = BEVGrid(-8.0, -4.0, 1.0, 8, 16)
    feats = torch.zeros(2, 1, 8, 16)
    feats[1, 0, 4, 3] = 5.0
    T = torch.stack([torch.eye(4), torch.eye(4)])
    car = torch.tensor([[-4.5, 0.5, 9.0, 0.0, 1.0, 1.0, 0.0]])  # 0.4 s at 9 m/s: 3.6 m, not a whole cell
    age = torch.tensor([0.0, 0.4])
    snapped, valid = warp_to_ego(feats, [2], T, grid, None, [None, car], age, margin=0.5)
    assert snapped[0, 1, 0, 4, 7] == pytest.approx(5.0)  # moved 4 cells, its value whole
    assert abs(snapped[0, 1, 0, 4, 6]) < 1e-4 and abs(snapped[0, 1, 0, 4, 8]) < 1e-4 and not valid[0, 1, 4, 3]
    blurred, _ = warp_to_ego(feats, [2], T, grid, None, [None, car], age, margin=0.5, snap=False)
    assert 0 < blurred[0, 1, 0, 4, 7] < 5.0 and 0 < blurred[0, 1, 0, 4, 6] < 5.0  # split between two cells


def test_compensate_without_objects_is_the_identity():
    grid = BEVGrid(-4.0, -4.0, 1.0, 8, 8)
    sampling = torch.rand(2, 8, 8, 2) * 2 - 1
    out, left = compensate(sampling, [None, torch.zeros(0, 7)], torch.tensor([0.3, 0.3]), grid, 0.5)
    torch.testing.assert_close(out, sampling)
    assert not left.any()


def test_sender_tracker_estimates_velocity_from_its_own_frames():
    tracker = MotionTracker(MotionSettings())
    rng = np.random.default_rng(0)
    start = np.array([[0.0, 0.0], [20.0, 5.0], [-10.0, 3.0]])
    velocity = np.array([[12.0, 0.0], [0.0, -8.0], [0.0, 0.0]])
    for k in range(6):
        centres = start + velocity * 0.1 * k
        order = rng.permutation(3)  # detections come in any order
        estimate = tracker.update(centres[order] + rng.normal(0, 0.02, (3, 2)), 0.1 * k)
    np.testing.assert_allclose(estimate, velocity[order], atol=0.6)
    # a gap longer than max_gap_s restarts the tracks (objects at rest until seen twice again)
    assert (tracker.update(start, 5.0) == 0).all()


def test_tracker_fits_velocity_over_its_window_coasts_through_misses_and_uses_heading_when_young():
    rng = np.random.default_rng(1)
    truth = np.array([[10.0, 0.0], [0.0, 0.0]])  # a car at 10 m/s along x, a parked one
    start = np.array([[0.0, 0.0], [30.0, 10.0]])
    noise = 0.3  # metres: one frame's difference alone would be off by ~4 m/s
    tracker = MotionTracker(MotionSettings(window=10, heading_below=1))
    for k in range(12):
        if k == 6:  # the detector misses the moving car once: its track coasts, not restarts
            tracker.update(start[1:] + rng.normal(0, noise, (1, 2)), 0.1 * k)
            continue
        estimate = tracker.update(start + truth * 0.1 * k + rng.normal(0, noise, (2, 2)), 0.1 * k)
    np.testing.assert_allclose(estimate, truth, atol=1.2)
    assert tracker.seen[0] == 11  # one track through the miss
    # a young track keeps only its velocity along the detected heading: lateral noise is gone
    young = MotionTracker(MotionSettings(heading_below=6))
    young.update(np.array([[0.0, 0.0]]), 0.0, np.array([0.0]))
    v = young.update(np.array([[1.0, 0.4]]), 0.1, np.array([np.pi]))  # yaw pi: the same axis as 0
    np.testing.assert_allclose(v, [[10.0, 0.0]], atol=1e-9)
    # a matched track never takes a detection beyond the fastest object's reach
    far = MotionTracker(MotionSettings(max_speed_mps=20.0))
    far.update(np.array([[0.0, 0.0]]), 0.0)
    assert (far.update(np.array([[3.0, 0.0]]), 0.1) == 0).all() and far.seen[0] == 1


def test_tracker_gate_keeps_a_track_off_a_neighbour_and_outliers_leave_its_velocity_fit():
    # a parked car seen twice, then a detection of another car 3 m away where it should be
    for gate, expected_seen in ((None, 3), (1.5, 1)):
        tracker = MotionTracker(MotionSettings(gate_m=gate, heading_below=1))
        tracker.update(np.array([[0.0, 0.0]]), 0.0)
        tracker.update(np.array([[0.0, 0.0]]), 0.1)
        v = tracker.update(np.array([[3.0, 0.0]]), 0.2)
        assert tracker.seen[0] == expected_seen  # with the gate a new track at rest, not a 15 m/s jump
        assert (v == 0).all() == (gate is not None)
    # a track at 8 m/s whose history holds one position of another object: refitted without it
    times = np.arange(6) * 0.1
    history = np.column_stack([times, 8.0 * times, np.zeros(6)])[None].copy()
    history[0, 1, 1:] = [-3.0, 2.5]
    off = robust_velocity(history, None)
    assert np.linalg.norm(off - [[8.0, 0.0]]) > 1.0
    np.testing.assert_allclose(robust_velocity(history, 1.0), [[8.0, 0.0]], atol=1e-9)
    clean = np.column_stack([times, 8.0 * times, np.zeros(6)])[None]
    np.testing.assert_allclose(robust_velocity(clean, 1.0), least_squares_velocity(clean))


def test_moving_objects_are_stated_in_the_message_frame():
    boxes = np.array([[1.0, 2.0, 0.0, 4.5, 1.9, 1.6, 0.2], [5.0, 5.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
    v_world = np.array([[0.0, 10.0], [0.3, 0.0]])  # the second is too slow to be sent
    yaw = math.pi / 2
    T = np.eye(4)
    T[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]  # frame x axis = world y
    objects = moving_objects(boxes, v_world, T, min_speed=1.0)
    assert objects.shape == (1, 7)
    np.testing.assert_allclose(objects[0], [1.0, 2.0, 10.0, 0.0, 4.5, 1.9, 0.2], atol=1e-9)
    # above `max_objects` the fastest are sent
    many = np.tile(boxes[:1], (5, 1))
    speeds = np.array([[3.0, 0], [9.0, 0], [5.0, 0], [9.0, 0], [1.5, 0]])
    fastest = moving_objects(many, speeds, np.eye(4), min_speed=1.0, max_objects=2)
    np.testing.assert_allclose(fastest[:, 2], [9.0, 9.0])


def test_uncertainty_and_motion_travel_in_the_wire_format_and_count_their_bytes():
    grid = BEVGrid(-20.0, -20.0, 0.8, 50, 50)
    cells = np.sort(np.random.default_rng(0).choice(grid.cells, 300, replace=False))
    codes = np.random.default_rng(1).integers(0, 256, (300, 8, 2))
    unc = np.random.default_rng(2).integers(0, 256, (300, 2)).astype(np.uint8)
    motion = np.array([[3.0, -4.2, 10.0, -2.5, 4.5, 1.9, 0.3], [1.0, 2.0, -6.0, 0.0, 4.0, 2.0, 3.0]])
    plain = Message(MessageKind.CODES, 5, 1, 0.1, np.eye(4), grid, cells, codes, bits=8)
    rich = Message(MessageKind.CODES, 5, 1, 0.1, np.eye(4), grid, cells, codes, bits=8, uncertainty=unc, motion=motion)
    # in one packet each: two bytes per cell, one count byte and nine bytes per moving object more
    one_plain, one_rich = encode_message(plain, 65000), encode_message(rich, 65000)
    assert len(one_plain) == len(one_rich) == 1
    assert len(one_rich[0]) - len(one_plain[0]) == 2 * 300 + 1 + 9 * 2
    packets = encode_message(rich)
    assert len(packets) > 1 and all(len(p) <= 1200 for p in packets)
    msg = decode_packets(packets)
    np.testing.assert_array_equal(msg.uncertainty, unc)
    np.testing.assert_allclose(msg.motion[:, :6], motion[:, :6], atol=0.051)
    assert abs(math.remainder(msg.motion[1, 6] - motion[1, 6], math.pi)) < math.pi / 256
    # losing the first packet loses the motion (and only its own cells)
    rest = decode_packets(packets[1:])
    assert rest.motion is None and rest.uncertainty is not None and len(rest.cells) < 300
    # a motion section whose length does not match its count is refused
    first = bytearray(packets[0])
    assert first[6] & FLAG_MOTION
    with pytest.raises(MalformedMessage):
        decode_packets([_reseal(bytes(first[:-4 - 9]))])
    with pytest.raises(ValueError, match="REQUEST"):
        encode_message(Message(MessageKind.REQUEST, 0, 1, 0.0, np.eye(4), grid, cells[:3], motion=motion))


def _reseal(body: bytes) -> bytes:
    import struct
    import zlib

    return body + struct.pack("<I", zlib.crc32(body))


def test_every_fusion_is_registered():
    assert {"max", "mean", "attention", "uncertainty_trust"} <= set(FUSIONS)


def test_delayed_senders_come_from_earlier_frames(opv2v_set):
    from coperception.datasets.prepared import delayed_senders
    from coperception.datasets.readers import build_dataset

    data = build_dataset(opv2v_set.dataset_cfg, "test")
    sample = data[2]  # the third frame of the first scenario: two earlier frames exist
    old = delayed_senders(sample, 2)
    assert old.agents[0] is sample.agents[0] and np.array_equal(old.gt_boxes, sample.gt_boxes)
    for now, then in zip(sample.agents[1:], old.agents[1:]):
        assert then.agent_id == now.agent_id
        assert then.capture_time == pytest.approx(now.capture_time - 0.2)
    first = data[0]  # nothing earlier: unchanged
    assert [a.capture_time for a in delayed_senders(first, 1).agents] == [a.capture_time for a in first.agents]


@pytest.mark.parametrize("mode", ["all", "projected"])
def test_true_motion_moves_a_late_view_onto_the_objects_as_they_are_now(opv2v_set, mode):
    from coperception.config import ModelConfig
    from coperception.datasets.collate import collate, prepare_sample
    from coperception.datasets.prepared import delayed_senders, true_motion
    from coperception.datasets.readers import build_dataset

    data = build_dataset(opv2v_set.dataset_cfg, "test")
    sample = data[2]  # the third frame of the first scenario: two earlier frames exist
    delayed = delayed_senders(sample, 2)
    records = true_motion(sample, delayed, 2, 0.0, 255)
    assert records is not None and records[0] is None and len(records) == len(sample.agents)
    moving = [r for r in records[1:] if r is not None and len(r)]
    assert moving, "the scene should have moving objects"
    # records in the ego frame: the old box moved by velocity x age is the box now
    age = sample.ego.capture_time - delayed.agents[1].capture_time
    now = records[1][:, :2] + records[1][:, 2:4] * age
    assert np.abs(now[:, None] - sample.gt_boxes[None, :, :2]).sum(-1).min(axis=1).max() < 1e-6
    # each view carries them in its own frame, through the scene augmentation (mirror, rotation, scale)
    prepared = prepare_sample(delayed, mode, opv2v_set.dataset_cfg, ModelConfig(), rng=np.random.default_rng(5),
                              motion=records)
    assert prepared.agents[0].motion is None
    for view, r in zip(prepared.agents[1:], records[1:]):
        assert view.motion is not None and view.motion.shape == r.shape
        T = view.T_ego_from_frame
        moved = (view.motion[:, :2] + view.motion[:, 2:4] * age) @ T[:2, :2].T + T[:2, 3]
        gap = np.abs(moved[:, None] - prepared.gt_boxes[None, :, :2]).sum(-1)
        match = gap.argmin(axis=1)
        assert gap.min(axis=1).max() < 1e-4
        assert np.allclose(view.motion[:, 4:6], prepared.gt_boxes[match, 3:5], atol=1e-4)
        yaw_in_ego = view.motion[:, 6] + math.atan2(T[1, 0], T[0, 0])
        assert np.allclose(np.sin(2 * (yaw_in_ego - prepared.gt_boxes[match, 6])), 0.0, atol=1e-3)
    batch = collate([prepared])[0]
    assert batch.motion is not None and batch.motion[0] is None and batch.motion[1].dtype == torch.float32
    assert batch.subset_views(torch.tensor([1])).motion[0] is batch.motion[1]
    # a reader without earlier ground truth: no records
    assert true_motion(replace(sample, earlier_truth=None), delayed, 2, 0.0, 255) is None


def test_true_motion_needs_delayed_senders():
    from coperception.config import TrainConfig

    with pytest.raises(ValueError, match="delay_frames"):
        TrainConfig(true_motion=True)
    assert TrainConfig(true_motion=True, delay_frames=2).true_motion


def test_uncertainty_trust_with_motion_trains_on_late_messages_and_sends_what_it_uses(opv2v_set, tmp_path, monkeypatch):
    from coperception.evaluate import evaluate_method
    from coperception.pipeline.model import load_model
    from coperception.train import train

    from test_train import TINY, tiny_config

    cfg = tiny_config(opv2v_set, tmp_path, "train.max_steps=2", "comm.codec=sparse", "fusion.method=uncertainty_trust",
                      "fusion.options={passes: 2}", "train.delay_frames=2", "train.delay_probability=1.0",
                      "train.true_motion=true")
    moved: list[int] = []  # objects the warp moved: the late senders' true motion reached the fusion in training
    compensate_now = warp.compensate
    monkeypatch.setattr(warp, "compensate", lambda sampling, motion, *rest: moved.append(
        sum(len(m) for m in motion if m is not None)) or compensate_now(sampling, motion, *rest))
    summary = train(cfg, progress=False)
    monkeypatch.undo()
    assert summary["steps"] == 2 and np.isfinite(summary["history"][-1]["loss"])
    assert sum(moved) > 0
    model = load_model(tmp_path / "last.pt", cfg)
    assert model.uncertainty is not None and model.uncertainty.passes == 2
    plain = evaluate_method(model, cfg, "test", progress=False, limit=3)
    moving = cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={"motion": MotionSettings(enabled=True,
                                                                                                      min_speed_mps=0.0)})})
    late = evaluate_method(model, moving, "test", progress=False, limit=3)
    assert set(late["ap"]) == {"0.3", "0.5", "0.7"} and late["params"]["fusion"]["motion"]["enabled"]
    # the motion section travels with every message: more bytes than without it (uncertainty in both)
    assert late["bytes_per_frame"] > plain["bytes_per_frame"] > 0
    # MC dropout draws from the evaluation's own seed: the same uncertainty sent every time, the caller's random
    # state kept
    with torch.no_grad():  # a head whose passes disagree (two training steps leave it near its constant start)
        for layer in (model.uncertainty.cls, model.uncertainty.log_var):
            layer.weight.normal_(0.0, 0.5)
            layer.bias.zero_()
    sent: list[torch.Tensor] = []
    estimate = model.sent_uncertainty
    model.sent_uncertainty = lambda feats: sent.append(estimate(feats)) or sent[-1]
    evaluate_method(model, cfg, "test", progress=False, limit=3)
    first, sent[:] = list(sent), []
    torch.rand(3)  # the caller draws in between (as building the next model does)
    state = torch.random.get_rng_state()
    evaluate_method(model, cfg, "test", progress=False, limit=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(first) == len(sent) > 0 and all(torch.equal(a, b) for a, b in zip(first, sent))
    del TINY

"""Anchor-centric cooperation: the anchor wire format (exact bytes, refusals), the refinement's properties
(shape, agent order, a lone ego, the radius) and the strategy end to end through the channel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coperception.comm.anchor_wire import (ANCHOR_HEADER, AnchorMessage, anchor_message_size, decode_anchor_message,
                                           encode_anchor_message)
from coperception.comm.kinds import MalformedMessage
from coperception.comm.wire import AuthenticationError, CodebookMismatch, CRCError
from coperception.config import AnchorSettings, MotionSettings
from coperception.comm.codebook import ResidualVQ
from coperception.fusion.anchor_centric import (AnchorFusion, ReceivedAnchors, anchor_loss, box_points, cells_at,
                                                relative_encoding, sample_features, transform_boxes_torch)
from coperception.geometry import pose_matrix, transform_boxes
from coperception.grid import BEVGrid
from coperception.types import AnchorSet

GRID = BEVGrid(-20.0, -10.0, 1.0, 20, 40)


def _message(count: int = 5, seed: int = 0) -> AnchorMessage:
    rng = np.random.default_rng(seed)
    boxes = np.column_stack([rng.uniform(-60, 60, (count, 2)), rng.uniform(-2, 0, count), rng.uniform(3.5, 4.5, count),
                             rng.uniform(1.5, 2.0, count), rng.uniform(1.4, 1.7, count), rng.uniform(0, 2 * np.pi, count)])
    return AnchorMessage(sender=-7, sequence=3, capture_time=12.3, pose=pose_matrix(100.0, -50.0, 1.0, 0.3),
                         boxes=boxes, scores=rng.uniform(0, 1, count), codes=rng.integers(0, 256, (count, 1)), bits=8,
                         codebook_hash=b"abcd")


def test_anchor_message_round_trip_has_the_stated_size_and_precision():
    msg = _message()
    data = encode_anchor_message(msg, 1200)
    assert ANCHOR_HEADER.size == 55
    assert len(data) == anchor_message_size(5, 1, 8) == 55 + 5 * 10 + 5 + 4
    out = decode_anchor_message(data, codebook_hash=b"abcd", stages=1, bits=8)
    assert (out.sender, out.sequence, out.capture_time) == (-7, 3, 12.3)
    np.testing.assert_allclose(out.pose, msg.pose, atol=1e-5)
    np.testing.assert_allclose(out.boxes[:, :2], msg.boxes[:, :2], atol=0.005 + 1e-9)
    np.testing.assert_allclose(out.boxes[:, 3:6], msg.boxes[:, 3:6], atol=0.025 + 1e-9)
    yaw_err = np.abs((out.boxes[:, 6] - msg.boxes[:, 6] + np.pi) % (2 * np.pi) - np.pi)
    assert yaw_err.max() <= np.pi / 256 + 1e-9
    np.testing.assert_allclose(out.scores, msg.scores, atol=0.5 / 255 + 1e-9)
    np.testing.assert_array_equal(out.codes, msg.codes)
    empty = decode_anchor_message(encode_anchor_message(_message(0), 1200))
    assert empty.boxes.shape == (0, 7) and empty.codes.shape == (0, 1)


def test_anchor_messages_that_do_not_decode_are_refused_by_name():
    data = bytearray(encode_anchor_message(_message(), 1200))
    flipped = bytearray(data)
    flipped[60] ^= 0xFF
    with pytest.raises(CRCError):
        decode_anchor_message(bytes(flipped))
    with pytest.raises(MalformedMessage, match="need"):
        decode_anchor_message(bytes(data[:-3]))
    with pytest.raises(CodebookMismatch):
        decode_anchor_message(bytes(data), codebook_hash=b"wxyz")
    with pytest.raises(MalformedMessage, match="stages"):
        decode_anchor_message(bytes(data), stages=2, bits=8)
    with pytest.raises(MalformedMessage, match="magic"):
        decode_anchor_message(b"XX" + bytes(data[2:]))
    signed = encode_anchor_message(_message(), 1200, key=b"k" * 32)
    assert decode_anchor_message(signed, keys={-7: b"k" * 32}, require_auth=True).sequence == 3
    with pytest.raises(AuthenticationError):
        decode_anchor_message(signed, keys={-7: b"j" * 32})
    with pytest.raises(AuthenticationError):
        decode_anchor_message(bytes(data), require_auth=True)
    with pytest.raises(ValueError, match="MTU"):
        encode_anchor_message(_message(40), 200)


def _fusion(seed: int = 0) -> AnchorFusion:
    torch.manual_seed(seed)
    fusion = AnchorFusion(8, AnchorSettings(hidden=16, heads=2, feature_dim=4, radius_m=4.0, refine_boxes=True),
                          nms_threshold=0.15,
                          quantizer=ResidualVQ(4, segments=1, stages=1, codes=16))
    for layer in (fusion.score, fusion.box):  # as training leaves them: not zero
        torch.nn.init.normal_(layer.weight, std=0.3)
    return fusion.eval()


def _anchors(n: int, seed: int, spread: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(n, 2, generator=g) - 0.5) * 2 * spread
    boxes = torch.cat([centres, torch.full((n, 1), -1.0), torch.tensor([[4.0, 1.7, 1.5]]).repeat(n, 1),
                       torch.rand(n, 1, generator=g) * 3], dim=1)
    return boxes, torch.randn(n, generator=g)


def _received(n: int, seed: int, kind: int = 0) -> ReceivedAnchors:
    boxes, logits = _anchors(n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    return ReceivedAnchors(boxes, logits, torch.randn(n, 4, generator=g), torch.full((n,), 0.1),
                           torch.full((n,), kind, dtype=torch.int64))


def _own(n: int = 6) -> AnchorSet:
    boxes, logits = _anchors(n, 1)
    return AnchorSet(boxes, logits, cells_at(GRID, boxes[:, :2])[0])


def test_refinement_keeps_shape_and_ignores_the_order_of_the_senders():
    fusion = _fusion()
    feats = torch.randn(1, 8, GRID.height, GRID.width)
    a, b = _received(4, 2), _received(3, 3, kind=1)
    with torch.no_grad():
        one = fusion.refine(feats, GRID, [_own()], [ReceivedAnchors.cat([a, b], 4, "cpu")])[0]
        two = fusion.refine(feats, GRID, [_own()], [ReceivedAnchors.cat([b, a], 4, "cpu")])[0]
    assert one.boxes.shape == (6 + 7, 7) and one.logits.shape == (13,)
    assert one.has_context.any()
    # own candidates keep their order; received ones come in the senders' order, so compare them as sets
    torch.testing.assert_close(one.logits[:6], two.logits[:6])
    torch.testing.assert_close(one.boxes[:6], two.boxes[:6])
    torch.testing.assert_close(torch.sort(one.logits[6:]).values, torch.sort(two.logits[6:]).values)
    # the refinement changed something where a received anchor was near
    before = torch.cat([_own().logits, a.logits, b.logits])
    assert not torch.allclose(one.logits[one.has_context], before[one.has_context])


def test_a_lone_ego_keeps_the_detector_and_anchors_out_of_reach_change_nothing():
    fusion = _fusion()
    feats = torch.randn(1, 8, GRID.height, GRID.width)
    own = _own()
    with torch.no_grad():
        alone = fusion.refine(feats, GRID, [own], [ReceivedAnchors.empty(4, "cpu")])[0]
    assert not alone.received_any and not alone.has_context.any()
    torch.testing.assert_close(alone.boxes, own.boxes)
    torch.testing.assert_close(alone.logits, own.logits)
    far = _received(3, 5)
    far.boxes[:, 0] += 100.0  # every received anchor 100 m away: outside every own candidate's radius
    with torch.no_grad():
        out = fusion.refine(feats, GRID, [own], [far])[0]
    assert not out.has_context[:6].any() and out.received_any
    # an ego that received something rescores its own candidates (one score scale), but an anchor that lies
    # outside the radius of everything changes nothing of them: moving it
    moved = ReceivedAnchors(far.boxes.clone(), far.logits, far.vectors, far.age, far.kind)
    moved.boxes[0, 1] += 30.0
    with torch.no_grad():
        again = fusion.refine(feats, GRID, [own], [moved])[0]
    torch.testing.assert_close(again.logits[:6], out.logits[:6])


def test_relative_encoding_is_in_the_query_box_frame():
    query = torch.tensor([[[0.0, 0.0, 0.0, 4.0, 2.0, 1.5, np.pi / 2]]])
    memory = torch.tensor([[[0.0, 2.0, 0.0, 4.0, 2.0, 1.5, np.pi / 2]]])
    rel = relative_encoding(query, memory, radius=4.0)[0, 0, 0]
    torch.testing.assert_close(rel[:3], torch.tensor([0.5, 0.0, 0.5]), atol=1e-6, rtol=0)  # 2 m straight ahead
    torch.testing.assert_close(rel[3:5], torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)


def test_boxes_move_into_the_ego_frame_as_the_numpy_transform_does():
    boxes, _ = _anchors(5, 4)
    T = pose_matrix(3.0, -2.0, 0.5, 0.7)
    torch.testing.assert_close(transform_boxes_torch(torch.from_numpy(T).float(), boxes),
                               torch.from_numpy(transform_boxes(T, boxes.double().numpy())).float(), atol=1e-5, rtol=0)


def test_anchor_loss_rewards_boxes_on_the_ground_truth_and_trains_the_refinement():
    fusion = _fusion()
    fusion.train()
    feats = torch.randn(1, 8, GRID.height, GRID.width)
    received = _received(5, 6)
    gt = received.boxes[:3].clone()
    gt[:, 0] += 0.4  # the truth lies a little off what the senders saw
    out = fusion.refine(feats, GRID, [_own()], [received])
    terms = anchor_loss(out, [gt], positive_iou=0.5)
    assert terms["anchor_total"].requires_grad and float(terms["anchor_reg"].detach()) > 0
    terms["anchor_total"].backward()
    assert fusion.box.weight.grad is not None and fusion.box.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_anchor_centric_trains_and_evaluates_through_the_channel(opv2v_set, tmp_path):
    from coperception.evaluate import evaluate_method
    from coperception.pipeline.model import load_model
    from coperception.train import train

    from test_train import tiny_config

    cfg = tiny_config(opv2v_set, tmp_path, "train.max_steps=2", "cooperation.strategy=anchor",
                      "fusion.anchor={max_anchors: 5, min_score: 0.0, candidate_score: 0.0}")
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["history"][-1]["loss"])
    model = load_model(tmp_path / "last.pt", cfg)
    entry = evaluate_method(model, cfg, "test", progress=False, limit=3)
    # every sender sent one packet of 5 anchors (min_score 0: an untrained detector still has 5): its exact size
    assert entry["bytes_per_agent_frame"] == anchor_message_size(5, 1, 8)
    assert entry["params"]["method"] == "anchor-centric" and entry["broadcast_bytes_per_frame"] == 0
    # with motion compensation every anchor carries its velocity: two bytes more each
    moving = cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={"motion": MotionSettings(enabled=True)})})
    assert evaluate_method(model, moving, "test", progress=False, limit=3)["bytes_per_agent_frame"] == \
        anchor_message_size(5, 1, 8, velocity=True)
    # a channel that loses everything: the ego detects exactly as the same detector alone
    lost = cfg.model_copy(update={"comm": cfg.comm.model_copy(update={"channel": cfg.comm.channel.model_copy(
        update={"loss_rate": 1.0})})})
    alone = evaluate_method(model, lost, "test", progress=False, limit=3, keep_detections=True)
    ego_cfg = cfg.model_copy(update={"cooperation": cfg.cooperation.model_copy(update={"strategy": "none"})})
    assert alone["bytes_per_agent_frame"] == 0
    reference = evaluate_method(_ego_only(load_model(tmp_path / "last.pt", cfg)), ego_cfg, "test", progress=False, limit=3, keep_detections=True)
    for a, r in zip(alone["_detections"], reference["_detections"]):
        np.testing.assert_allclose(a.detections.boxes, r.detections.boxes)
        np.testing.assert_allclose(a.detections.scores, r.detections.scores)


def _ego_only(model):
    """The same weights run as ego-only cooperation."""
    from coperception.pipeline.strategies import STRATEGIES

    model.strategy = STRATEGIES.get("none")()
    model.anchor_fusion = None
    return model


def test_the_ego_reads_its_features_at_the_cell_under_each_point():
    feats = torch.arange(GRID.height * GRID.width, dtype=torch.float32).view(1, 1, GRID.height, GRID.width)
    # the centre of row 3, column 7, and a point off the grid
    points = torch.tensor([[[[GRID.x_min + 7.5, GRID.y_min + 3.5], [GRID.x_min - 5.0, 0.0]]]])
    out = sample_features(feats, GRID, points)[0, 0, :, 0]
    torch.testing.assert_close(out, torch.tensor([3.0 * GRID.width + 7, 0.0]), atol=1e-3, rtol=0)
    box = torch.tensor([[1.0, 2.0, 0.0, 4.0, 2.0, 1.5, np.pi / 2]])
    torch.testing.assert_close(box_points(box)[0], torch.tensor([[1.0, 2.0], [1.0, 4.0], [1.0, 0.0], [0.0, 2.0],
                                                                 [2.0, 2.0]]), atol=1e-6, rtol=0)


def test_anchor_velocities_travel_at_two_bytes_each():
    msg = _message(4)
    msg.velocity = np.array([[10.0, -3.1], [0.0, 0.0], [40.0, 0.2], [-1.3, 5.0]])
    data = encode_anchor_message(msg, 1200)
    assert len(data) == anchor_message_size(4, 1, 8) + 8 == anchor_message_size(4, 1, 8, velocity=True)
    out = decode_anchor_message(data)
    # 0.25 m/s units, clipped to what an int8 holds (31.75 m/s)
    np.testing.assert_allclose(out.velocity, [[10.0, -3.0], [0.0, 0.0], [31.75, 0.25], [-1.25, 5.0]])
    np.testing.assert_array_equal(out.codes, msg.codes)
    assert decode_anchor_message(encode_anchor_message(_message(4), 1200)).velocity is None


def test_merged_boxes_average_the_overlapping_candidates_by_score():
    from coperception.pipeline.anchor_exchange import merged_boxes

    kept = np.array([[0.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.1], [30.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.0]])
    # a second view of the first object 0.4 m further and turned a full half-turn (the same footprint)
    other = np.array([[0.4, 0.0, -1.0, 4.4, 2.0, 1.5, 0.1 + np.pi]])
    candidates = np.concatenate([kept, other])
    out = merged_boxes(kept, candidates, np.array([0.75, 0.9, 0.25]), merge_iou=0.3)
    np.testing.assert_allclose(out[0, :6], [0.1, 0.0, -1.0, 4.1, 2.0, 1.5])
    assert abs(out[0, 6] - 0.1) < 1e-9  # the kept box's direction
    np.testing.assert_allclose(out[1], kept[1])  # nothing else overlaps it

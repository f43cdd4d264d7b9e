"""Late fusion's boxes go through the anchor wire format and the channel (bytes, loss, delay, pose)."""

from __future__ import annotations

import numpy as np
import pytest

from coperception.comm.anchor_wire import anchor_message_size
from coperception.config import load_config
from coperception.datasets.collate import prepare_sample
from coperception.datasets.readers import build_dataset
from coperception.geometry import transform_boxes, wrap_angle
from coperception.models.postprocess import Detections, rotated_nms
from coperception.pipeline.late_exchange import LateSession, boxes_that_fit

from test_train import TINY


def consecutive_frames(opv2v_set, strategy="late", mode="all", n=3):
    """The config of `strategy` on the test set and its first `n` frames (of the first scenario), prepared in `mode`."""
    cfg = load_config(None, [f"dataset.root={opv2v_set.root}", *TINY, f"cooperation.strategy={strategy}"])
    data = build_dataset(cfg.dataset, "test")
    samples = [data[i] for i in range(n)]  # consecutive frames of the first scenario
    assert len(samples[0].agents) >= 2
    return cfg, [prepare_sample(s, mode, cfg.dataset, cfg.model) for s in samples]


def _detections(prepared, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in prepared.agents:
        k = 6
        boxes = np.column_stack([rng.uniform(-30, 30, k), rng.uniform(-20, 20, k), rng.uniform(-1.5, -0.5, k),
                                 np.full(k, 4.2), np.full(k, 1.8), np.full(k, 1.5), rng.uniform(-np.pi, np.pi, k)])
        out.append(Detections(boxes, rng.uniform(0.3, 1.0, k), np.zeros(k, dtype=np.int64)))
    return out


def test_senders_boxes_arrive_in_the_ego_frame_at_their_measured_size(opv2v_set):
    cfg, frames = consecutive_frames(opv2v_set)
    session = LateSession(cfg=cfg)
    p = frames[0]
    dets = _detections(p, 0)
    merged, stats = session.deliver_boxes(p, dets, nms_threshold=1.0)  # NMS at IoU 1 keeps everything distinct
    senders = p.agents[1:]
    assert list(stats.delivered_bytes.values()) == [anchor_message_size(6, 0, 1)] * len(senders)
    assert set(stats.fused_ages) == {v.sender for v in senders} and all(a == 0.0 for a in stats.fused_ages.values())
    expected = np.concatenate([dets[0].boxes] + [transform_boxes(v.T_ego_from_frame, d.boxes) for v, d in
                                                 zip(senders, dets[1:])])
    assert len(merged.boxes) == len(expected)
    for box in expected:  # each within the wire's precision (1 cm in x/y, 10 cm z, 1/256 turn)
        j = int(np.argmin(np.hypot(*(merged.boxes[:, :2] - box[:2]).T)))
        assert np.hypot(*(merged.boxes[j, :2] - box[:2])) < 0.02
        assert abs(merged.boxes[j, 2] - box[2]) < 0.06
        assert abs(wrap_angle(merged.boxes[j, 6] - box[6])) < np.pi / 256 + 1e-6


def test_lost_messages_leave_the_ego_alone_and_late_ones_are_old(opv2v_set):
    cfg, frames = consecutive_frames(opv2v_set)
    lossy = cfg.variant(channel={"loss_rate": 1.0, "mean_burst_packets": 1.0})
    p = frames[0]
    dets = _detections(p, 1)
    merged, stats = LateSession(cfg=lossy).deliver_boxes(p, dets, nms_threshold=0.15)
    alone = rotated_nms(dets[0].boxes, dets[0].scores, 0.15)
    np.testing.assert_array_equal(merged.boxes, dets[0].boxes[alone])
    assert stats.fused_ages == {} and all(b == 0 for b in stats.delivered_bytes.values())

    slow = cfg.variant(channel={"latency_ms": 150.0})
    session = LateSession(cfg=slow)
    ages = []
    for i, p in enumerate(frames):
        _, stats = session.deliver_boxes(p, _detections(p, i), nms_threshold=0.15)
        ages.append(sorted(stats.fused_ages.values()))
    assert ages[0] == [] and ages[1] == []  # nothing has arrived 50 ms after capture yet
    assert ages[2] and all(a == pytest.approx(0.2, abs=1e-6) for a in ages[2])  # frame 0's boxes, two frames old


def test_a_sender_sends_what_fits_one_packet():
    assert anchor_message_size(boxes_that_fit(1200, False, False), 0, 1) <= 1200
    assert anchor_message_size(boxes_that_fit(1200, False, False) + 1, 0, 1) > 1200
    assert boxes_that_fit(1200, True, True) < boxes_that_fit(1200, False, False)

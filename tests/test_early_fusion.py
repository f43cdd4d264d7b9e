"""Early fusion's points go through the point wire format and the channel (bytes, loss, delay, pose)."""

from __future__ import annotations

import numpy as np
import pytest

from coperception.comm.kinds import MalformedMessage
from coperception.comm.point_wire import (POINT_HEADER, PointMessage, decode_point_packet, decode_point_packets,
                                          encode_point_message, point_message_size, points_per_packet)
from coperception.comm.wire import AuthenticationError, CRCError
from coperception.geometry import transform_points
from coperception.pipeline.early_exchange import EarlySession

from test_late_fusion import consecutive_frames


def _cloud(n, seed=0):
    rng = np.random.default_rng(seed)
    xy, z, intensity = rng.uniform(-120, 120, (n, 2)), rng.uniform(-3, 2, n), rng.uniform(0, 1, n)
    return np.column_stack([xy, z, intensity]).astype(np.float32)


def _pose(x=10.0, y=-4.0, yaw=0.3):
    T = np.eye(4)
    T[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    T[:3, 3] = [x, y, 1.7]
    return T


def test_points_round_trip_within_a_centimetre_in_packets_that_fit_the_mtu():
    points = _cloud(1000)
    packets = encode_point_message(PointMessage(7, 3, 12.5, _pose(), points), mtu=1200)
    assert all(len(p) <= 1200 for p in packets)
    assert len(packets) == -(-1000 // points_per_packet(1200))
    assert sum(map(len, packets)) == point_message_size(1000, 1200)
    msg = decode_point_packets(packets)
    assert (msg.sender, msg.sequence, msg.capture_time) == (7, 3, 12.5)
    np.testing.assert_allclose(msg.pose, _pose(), atol=1e-5)
    assert np.abs(msg.points[:, :3] - points[:, :3]).max() <= 0.005 + 2e-5  # half a step (+ float32 at 120 m)
    assert np.abs(msg.points[:, 3] - points[:, 3]).max() <= 0.5 / 255 + 1e-6
    # an empty cloud is one header-only packet; 7 bytes a point against 16 as float32 rows
    assert len(encode_point_message(PointMessage(7, 4, 12.6, _pose(), np.zeros((0, 4))), 1200)) == 1
    assert point_message_size(10_000, 1200) < 0.5 * 16 * 10_000


def test_a_lost_packet_costs_only_its_points():
    points = _cloud(700, seed=1)
    packets = encode_point_message(PointMessage(1, 1, 0.0, np.eye(4), points), mtu=600)
    per = points_per_packet(600)
    kept = decode_point_packets(packets[:2] + packets[3:])  # the third packet lost
    expected = np.concatenate([points[:2 * per], points[3 * per:]])
    np.testing.assert_allclose(kept.points[:, :3], expected[:, :3], atol=0.0051)


def test_bad_point_packets_are_refused_by_name():
    packets = encode_point_message(PointMessage(2, 5, 1.0, np.eye(4), _cloud(300)), mtu=1200)
    broken = bytearray(packets[0])
    broken[POINT_HEADER.size + 3] ^= 0xFF
    with pytest.raises(CRCError):
        decode_point_packet(bytes(broken))
    with pytest.raises(MalformedMessage, match="magic"):
        decode_point_packet(b"XX" + packets[0][2:])
    with pytest.raises(MalformedMessage, match="bytes"):
        decode_point_packet(packets[0][:-9])
    with pytest.raises(MalformedMessage, match="twice"):
        decode_point_packets([packets[0], packets[0]])
    other = encode_point_message(PointMessage(2, 6, 1.1, np.eye(4), _cloud(10)), mtu=1200)
    with pytest.raises(MalformedMessage, match="different messages"):
        decode_point_packets([packets[0], other[0]])
    key = b"k" * 32
    signed = encode_point_message(PointMessage(2, 7, 1.2, np.eye(4), _cloud(10)), mtu=1200, key=key)
    assert decode_point_packets(signed, keys={2: key}, require_auth=True).sender == 2
    with pytest.raises(AuthenticationError):
        decode_point_packets(signed, keys={2: b"x" * 32})
    with pytest.raises(AuthenticationError):
        decode_point_packets(packets, keys={2: key}, require_auth=True)
    with pytest.raises(ValueError, match="beyond"):
        encode_point_message(PointMessage(2, 8, 1.3, np.eye(4), np.array([[400.0, 0, 0, 0.5]])), mtu=1200)


def _frames(opv2v_set):
    return consecutive_frames(opv2v_set, "early", "merged")


def test_senders_points_arrive_in_the_ego_frame_at_their_measured_size(opv2v_set):
    cfg, frames = _frames(opv2v_set)
    p = frames[0]
    cloud, stats = EarlySession(cfg=cfg).merged_points(p)
    expected = np.concatenate([p.agents[0].points[:, :4]] + [transform_points(T, pts[:, :4])
                                                             for _, _, T, pts in p.sent_points])
    assert cloud.shape == expected.shape
    assert np.abs(cloud[:, :3] - expected[:, :3]).max() < 0.01  # 1 cm steps, moved by the stated pose
    assert list(stats.delivered_bytes.values()) == [point_message_size(len(pts), cfg.comm.channel.mtu)
                                                    for *_, pts in p.sent_points]
    assert all(a == 0.0 for a in stats.fused_ages.values()) and len(stats.fused_ages) == len(p.sent_points)
    view, _ = EarlySession(cfg=cfg).deliver_points(p)
    assert len(view.voxels.coords) > 0 and view.points is None


def test_lost_points_leave_the_ego_alone_and_late_ones_are_old(opv2v_set):
    cfg, frames = _frames(opv2v_set)
    lossy = cfg.variant(channel={"loss_rate": 1.0, "mean_burst_packets": 1.0})
    p = frames[0]
    cloud, stats = EarlySession(cfg=lossy).merged_points(p)
    np.testing.assert_array_equal(cloud, p.agents[0].points[:, :4])
    assert stats.fused_ages == {} and all(b == 0 for b in stats.delivered_bytes.values())

    slow = cfg.variant(channel={"latency_ms": 150.0})
    session = EarlySession(cfg=slow)
    results = [session.merged_points(p) for p in frames]
    assert results[0][1].fused_ages == {} and results[1][1].fused_ages == {}  # nothing arrived 50 ms after capture
    cloud, stats = results[2]
    assert stats.fused_ages and all(a == pytest.approx(0.2, abs=1e-6) for a in stats.fused_ages.values())
    # frame 0's points, moved with the senders' poses of frame 0 into the ego's frame of frame 2
    ego0, ego2 = frames[0].agents[0], frames[2].agents[0]
    T_ego2_from_ego0 = np.linalg.inv(ego2.T_world_from_agent) @ ego0.T_world_from_agent
    old = np.concatenate([transform_points(T_ego2_from_ego0 @ T, pts[:, :4]) for _, _, T, pts in frames[0].sent_points])
    assert np.abs(cloud[len(ego2.points):, :3] - old[:, :3]).max() < 0.01


def test_pose_noise_moves_a_senders_points_rigidly(opv2v_set):
    cfg, frames = _frames(opv2v_set)
    p = frames[0]
    noisy = cfg.variant(channel={"pose_noise_m": 0.5, "pose_noise_deg": 1.0})
    cloud, _ = EarlySession(cfg=noisy).merged_points(p)
    n_ego = len(p.agents[0].points)
    _, _, T, pts = p.sent_points[0]
    true = transform_points(T, pts[:, :4])[:, :3]
    got = cloud[n_ego:n_ego + len(pts), :3]
    assert np.linalg.norm(got - true, axis=1).mean() > 0.05  # misplaced by the pose it stated
    i, j = np.random.default_rng(0).integers(0, len(pts), (2, 200))
    np.testing.assert_allclose(np.linalg.norm(got[i] - got[j], axis=1), np.linalg.norm(true[i] - true[j], axis=1),
                               atol=0.02)  # but as one rigid cloud

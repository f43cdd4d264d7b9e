"""The V2X channel: burst loss statistics, delay -> older frames, pose noise, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from coperception.comm.channel import Channel, GilbertElliott, frames_back_needed, newest_arrived
from coperception.config import ChannelConfig


def test_gilbert_elliott_from_rate_has_the_requested_stationary_loss():
    for rate, burst in ((0.0, 1.0), (0.1, 1.0), (0.3, 3.0), (0.5, 2.0), (1.0, 4.0)):
        assert GilbertElliott.from_rate(rate, burst).stationary_loss == pytest.approx(rate)
    with pytest.raises(ValueError):
        GilbertElliott.from_rate(1.5, 2.0)


@pytest.mark.parametrize("rate,burst", [(0.1, 2.0), (0.3, 3.0), (0.5, 2.0)])
def test_delivered_fraction_matches_the_stationary_loss_over_10000_packets(rate, burst):
    channel = Channel(ChannelConfig(loss_rate=rate, mean_burst_packets=burst), np.random.default_rng(0))
    packets = [b"x" * 100] * 100
    delivered = sum(len(channel.transmit(5, packets, 0.1 * k).deliveries) for k in range(100))
    assert abs((1 - delivered / 10_000) - rate) <= 0.02
    # losses come in bursts: the mean run of consecutive losses is close to the configured burst length
    channel = Channel(ChannelConfig(loss_rate=rate, mean_burst_packets=burst), np.random.default_rng(1))
    t = channel.transmit(1, [bytes([k % 256, k // 256]) for k in range(10_000)], 0.0)
    arrived = np.zeros(10_000, dtype=bool)
    arrived[[d.packet[0] + 256 * d.packet[1] for d in t.deliveries]] = True
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[1], arrived.astype(int), [1]])) != 0))[::2]
    assert abs(runs.mean() - burst) < 0.25 * burst


def test_no_loss_and_total_loss():
    packets = [b"y" * 500] * 20
    assert len(Channel(ChannelConfig(), np.random.default_rng(0)).transmit(1, packets, 0.0).deliveries) == 20
    assert Channel(ChannelConfig(loss_rate=1.0), np.random.default_rng(0)).transmit(1, packets, 0.0).deliveries == []
    assert newest_arrived([Channel(ChannelConfig(loss_rate=1.0), np.random.default_rng(0)).transmit(1, packets, 0.0)],
                          10.0) is None


def test_a_250_ms_delay_at_10_hz_makes_the_ego_fuse_the_frame_3_steps_older():
    cfg = ChannelConfig(latency_ms=250.0, bandwidth_mbps=1000.0)
    channel = Channel(cfg, np.random.default_rng(0))
    dt = 0.1
    ego_time = 2.0
    back = frames_back_needed(cfg, dt)
    sent = [channel.transmit(7, [b"z" * 1200] * 3, ego_time - k * dt) for k in reversed(range(back + 1))]
    for deadline in (0.0, cfg.fusion_deadline_ms / 1e3):  # with or without waiting 50 ms for messages
        chosen = newest_arrived(sent, ego_time + deadline)
        assert chosen is not None and round((ego_time - chosen.capture_time) / dt) == 3


def test_bandwidth_gives_transmission_time_from_the_byte_count():
    channel = Channel(ChannelConfig(bandwidth_mbps=8.0), np.random.default_rng(0))  # 1 byte per microsecond
    t = channel.transmit(1, [b"a" * 1000, b"b" * 1000], 0.0)
    assert [d.arrival_time for d in t.deliveries] == pytest.approx([0.001, 0.002])
    # the radio is busy: the next message's packets queue behind the first
    t2 = channel.transmit(1, [b"c" * 1000], 0.0005)
    assert t2.deliveries[0].arrival_time == pytest.approx(0.003)


def test_pose_noise_has_the_configured_spread_and_same_seed_same_run():
    cfg = ChannelConfig(pose_noise_m=0.5, pose_noise_deg=1.0, loss_rate=0.3, jitter_ms=20.0)
    T = np.eye(4)
    T[:3, 3] = [10.0, -5.0, 1.0]
    channel = Channel(cfg, np.random.default_rng(3))
    noisy = np.stack([channel.noisy_pose(T) for _ in range(4000)])
    assert np.std(noisy[:, 0, 3] - 10.0) == pytest.approx(0.5, rel=0.08)
    yaw = np.degrees(np.arctan2(noisy[:, 1, 0], noisy[:, 0, 0]))
    assert np.std(yaw) == pytest.approx(1.0, rel=0.08)
    np.testing.assert_allclose(noisy[:, 2, 3], 1.0)

    def run(seed):
        ch = Channel(cfg, np.random.default_rng(seed))
        out = []
        for k in range(20):
            t = ch.transmit(2, [bytes([k, j]) for j in range(5)], 0.1 * k)
            out.append([(d.packet, d.arrival_time) for d in t.deliveries])
            out.append(ch.noisy_pose(T).tobytes())
        return out

    assert run(11) == run(11)
    assert run(11) != run(12)

"""A V2X radio link between a sender and the ego: bandwidth, latency, jitter, burst loss, pose noise.

Packets of a message leave one after another at the link's bandwidth (transmission time from the
real byte count), then take the base latency plus jitter. Loss follows a two-state Gilbert–Elliott
chain kept per link across messages, so losses come in bursts. The ego, at its own capture time,
fuses the newest message from each sender whose delivered packets have all arrived (by its capture time
plus a fusion deadline, the time its own encoder takes anyway): with delay it
fuses an older frame, which it warps with the pose the sender reported at that frame's capture
(plus the pose noise of the sender's localisation). All randomness comes from one seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np

from coperception.config import ChannelConfig


@dataclass(frozen=True)
class GilbertElliott:
    """Two-state Markov loss model: Good -> Bad with p, Bad -> Good with r; loss probability per state."""

    p_good_to_bad: float
    p_bad_to_good: float
    loss_good: float = 0.0
    loss_bad: float = 1.0

    @classmethod
    def from_rate(cls, loss_rate: float, mean_burst: float) -> "GilbertElliott":
        """The simple Gilbert model (no loss in Good, all lost in Bad) with a stationary loss of
        `loss_rate` and a mean Bad-state run of `mean_burst` packets."""
        if not 0.0 <= loss_rate <= 1.0 or mean_burst < 1.0:
            raise ValueError("loss_rate must lie in [0, 1] and mean_burst >= 1")
        r = 1.0 / mean_burst
        if loss_rate >= 1.0:
            return cls(1.0, 0.0)
        p = min(1.0, loss_rate * r / (1.0 - loss_rate))
        return cls(p, r)

    @property
    def stationary_loss(self) -> float:
        total = self.p_good_to_bad + self.p_bad_to_good
        if total == 0:
            return self.loss_good
        bad = self.p_good_to_bad / total
        return bad * self.loss_bad + (1 - bad) * self.loss_good


@dataclass
class Delivery:
    """One packet that arrived: its bytes and arrival time (s, the ego's clock)."""

    packet: bytes
    arrival_time: float


@dataclass
class Transmission:
    """One message sent over a link: what left, what arrived and when."""

    link: Hashable
    capture_time: float
    sent_packets: int
    sent_bytes: int
    deliveries: list[Delivery]

    @property
    def delivered_bytes(self) -> int:
        return sum(len(d.packet) for d in self.deliveries)

    @property
    def complete_time(self) -> float:
        """When the last delivered packet arrived (inf when none did)."""
        return max((d.arrival_time for d in self.deliveries), default=float("inf"))


@dataclass
class Link:
    """State of one sender -> ego link: Gilbert–Elliott state and when the radio is free again."""

    bad: bool = False
    busy_until: float = -np.inf


@dataclass
class Channel:
    """All links to one ego. `transmit` sends a message's packets; `newest_arrived` picks what the ego fuses."""

    cfg: ChannelConfig
    rng: np.random.Generator
    links: dict[Hashable, Link] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loss_model = GilbertElliott.from_rate(self.cfg.loss_rate, self.cfg.mean_burst_packets)

    def _lost(self, link: Link) -> bool:
        model = self.loss_model
        if link.bad:
            link.bad = self.rng.random() >= model.p_bad_to_good
        else:
            link.bad = self.rng.random() < model.p_good_to_bad
        return bool(self.rng.random() < (model.loss_bad if link.bad else model.loss_good))

    def transmit(self, link_id: Hashable, packets: Sequence[bytes], capture_time: float,
                 ready_time: float | None = None) -> Transmission:
        """Send `packets` (in order) captured at `capture_time` over the link `link_id` (e.g. the
        sender id, or (scenario, sender) when clocks restart per scenario); returns what arrives and when.
        The first packet leaves after the processing time, not before `ready_time` (e.g. a sender that
        waited for the ego's broadcast) and not before the link is free."""
        link = self.links.setdefault(link_id, Link())
        bytes_per_s = self.cfg.bandwidth_mbps * 1e6 / 8.0
        clock = max(capture_time + self.cfg.processing_ms / 1e3, link.busy_until,
                    -np.inf if ready_time is None else ready_time)
        deliveries = []
        for packet in packets:
            clock += len(packet) / bytes_per_s
            if self._lost(link):
                continue
            jitter = abs(self.rng.normal(0.0, self.cfg.jitter_ms / 1e3)) if self.cfg.jitter_ms > 0 else 0.0
            deliveries.append(Delivery(packet, clock + self.cfg.latency_ms / 1e3 + jitter))
        link.busy_until = clock
        return Transmission(link_id, capture_time, len(packets), sum(len(p) for p in packets), deliveries)

    def noisy_pose(self, T_world_from_sender: np.ndarray) -> np.ndarray:
        """The pose the sender reports: its true pose with Gaussian x/y (m) and yaw (deg) error."""
        sigma_m, sigma_deg = self.cfg.pose_noise_m, self.cfg.pose_noise_deg
        if sigma_m == 0 and sigma_deg == 0:
            return np.array(T_world_from_sender, dtype=np.float64)
        dx, dy = self.rng.normal(0.0, sigma_m, 2) if sigma_m > 0 else (0.0, 0.0)
        dyaw = np.radians(self.rng.normal(0.0, sigma_deg)) if sigma_deg > 0 else 0.0
        c, s = np.cos(dyaw), np.sin(dyaw)
        noise = np.eye(4)
        noise[:2, :2] = [[c, -s], [s, c]]
        T = np.array(T_world_from_sender, dtype=np.float64)
        out = T.copy()
        out[:3, :3] = noise[:3, :3] @ T[:3, :3]
        out[0, 3] += dx
        out[1, 3] += dy
        return out


def newest_arrived(transmissions: Sequence[Transmission], ego_time: float) -> Transmission | None:
    """The transmission of the latest capture whose delivered packets have all arrived by `ego_time`
    (a message with no delivered packet never counts)."""
    ready = [t for t in transmissions if t.deliveries and t.complete_time <= ego_time + 1e-9]
    return max(ready, key=lambda t: t.capture_time) if ready else None


def frames_back_needed(cfg: ChannelConfig, frame_interval: float) -> int:
    """How many earlier frames can be the newest arrived one: enough to cover latency + 3 sigma jitter
    + processing, plus one frame for transmission time."""
    worst = max(0.0, (cfg.latency_ms + 3 * cfg.jitter_ms + cfg.processing_ms - cfg.fusion_deadline_ms) / 1e3)
    return int(np.ceil(worst / frame_interval - 1e-9)) + 1

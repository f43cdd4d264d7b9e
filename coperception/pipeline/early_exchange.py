"""Early fusion's messages at evaluation: each sender's points through the point wire format
(`comm/point_wire.py`, packets that decode on their own) and the channel; the ego merges the points of
the newest message that has arrived from each sender (the packets of it that arrived) with its own and
detects from the one cloud.

A sender states its pose as its noisy localisation gives it; the ego moves the points with that pose
into its frame. Points carry no motion compensation (a sender runs no detector to track objects with).
Bytes are the lengths of the packets that arrived.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from coperception.comm.channel import Channel, Transmission
from coperception.comm.keys import load_keys
from coperception.comm.point_wire import PointMessage, decode_point_packets, encode_point_message
from coperception.config import ExperimentConfig
from coperception.datasets.collate import AgentInput, PreparedSample, Projector
from coperception.geometry import invert, transform_points
from coperception.pipeline.session import FrameComm, receive_newest


@dataclass
class EarlySession:
    """Early fusion over the channel: a split's frames in order, every sender's points as one message."""

    cfg: ExperimentConfig
    queues: dict[tuple[str, int], list[Transmission]] = field(default_factory=dict)
    held: dict[tuple[str, int], tuple[Transmission, PointMessage]] = field(default_factory=dict)
    last_sequence: dict[tuple[str, int], int] = field(default_factory=dict)
    sequence: int = 0

    def __post_init__(self) -> None:
        comm = self.cfg.comm
        self.channel = Channel(comm.channel, np.random.default_rng(comm.channel.seed))
        self.keys = load_keys(comm.key_file) if comm.key_file else None
        self.voxelizer = Projector(self.cfg.dataset, self.cfg.model)

    def _send(self, scenario: str, sender: int, capture_time: float, T_world_from_sender: np.ndarray,
              points: np.ndarray) -> int:
        """One sender's points (its own frame) over its link, with the pose its localisation gives it; the
        bytes of it that arrive."""
        self.sequence += 1
        msg = PointMessage(sender, self.sequence, capture_time, self.channel.noisy_pose(T_world_from_sender), points)
        packets = encode_point_message(msg, self.cfg.comm.channel.mtu,
                                       self.keys.get(sender) if self.keys is not None else None)
        tx = self.channel.transmit((scenario, sender), packets, capture_time)
        self.queues.setdefault((scenario, sender), []).append(tx)
        return tx.delivered_bytes

    def _decode(self, tx: Transmission) -> PointMessage:
        return decode_point_packets([d.packet for d in tx.deliveries], self.keys, self.keys is not None)

    def deliver_points(self, sample: PreparedSample) -> tuple[AgentInput, FrameComm]:
        """One frame of a `merged` sample: the ego's view of `merged_points`' cloud and what it cost."""
        cloud, stats = self.merged_points(sample)
        return replace(sample.agents[0], voxels=self.voxelizer.merged(cloud, sample.frame_key), points=None), stats

    def merged_points(self, sample: PreparedSample) -> tuple[np.ndarray, FrameComm]:
        """One frame of a `merged` sample: every sender sends its points; the ego's own points and those of
        the newest message it holds from each sender, in its frame, and what the messages cost."""
        ego = sample.agents[0]
        if ego.points is None:
            raise ValueError("early fusion over the channel needs the ego's own points (prepare in `merged` mode)")
        scenario = sample.frame_key.split("/")[0]
        T_world_from_ego = ego.T_world_from_agent
        delivered = {sender: self._send(scenario, sender, t, T_world_from_ego @ T_ego_from_sender, points)
                     for sender, t, T_ego_from_sender, points in sample.sent_points}
        clouds, ages = [ego.points[:, :4]], {}
        rejected: Counter[str] = Counter()
        T_ego_from_world = invert(T_world_from_ego)
        for sender in delivered:
            where = (scenario, sender)
            received = receive_newest(self.queues, self.held, self.last_sequence, where, ego.capture_time,
                                      self.cfg.comm, self.keys is not None, self._decode, rejected)
            if received is None:
                continue
            msg = received[1]
            ages[sender] = ego.capture_time - msg.capture_time
            clouds.append(transform_points(T_ego_from_world @ msg.pose, msg.points))
        return np.concatenate(clouds).astype(np.float32), FrameComm(delivered, 0, ages, dict(rejected))

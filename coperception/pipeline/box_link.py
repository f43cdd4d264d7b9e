"""Box messages over the channel: what the anchor-centric and the late-fusion sessions share.

Both send each sender's boxes in the anchor wire format (`comm/anchor_wire.py`; late fusion sends no
anchor-feature codes), in the sender's own frame with the pose its noisy localisation gives it. A
`BoxLink` runs over a split's frames in order: every message goes over its sender's link, and the ego
holds per sender the newest message that has arrived by its capture time plus the fusion deadline
(refused ones are counted by reason). With `fusion.motion.enabled` each sender tracks its own
detections over its frames (odometry, no ground truth) and sends every box's velocity (2 bytes); the ego
moves each received box forward by the message's age. Bytes are the lengths of the packets that arrived.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from coperception.comm.anchor_wire import AnchorMessage, encode_anchor_message
from coperception.comm.channel import Channel, Transmission
from coperception.comm.keys import load_keys
from coperception.config import ExperimentConfig, MotionSettings
from coperception.datasets.collate import AgentInput
from coperception.fusion.motion import MotionTracker
from coperception.geometry import invert, transform_boxes
from coperception.pipeline.session import receive_newest


@dataclass
class Arrival:
    """A message the ego holds from one sender: its boxes moved into the ego frame (and forward by its age
    when it carries velocities)."""

    view: AgentInput
    message: AnchorMessage
    boxes: np.ndarray  # (K, 7) ego frame
    age: float  # ego capture time - the message's capture time


@dataclass
class BoxLink:
    cfg: ExperimentConfig
    queues: dict[tuple[str, int], list[Transmission]] = field(default_factory=dict)
    held: dict[tuple[str, int], tuple[Transmission, AnchorMessage]] = field(default_factory=dict)
    last_sequence: dict[tuple[str, int], int] = field(default_factory=dict)
    sequence: int = 0
    trackers: dict[tuple[str, int], MotionTracker] = field(default_factory=dict)

    def __post_init__(self) -> None:
        comm = self.cfg.comm
        self.motion: MotionSettings | None = self.cfg.fusion.motion if self.cfg.fusion.motion.enabled else None
        self.channel = Channel(comm.channel, np.random.default_rng(comm.channel.seed))
        self.keys = load_keys(comm.key_file) if comm.key_file else None

    def velocities(self, scenario: str, view: AgentInput, boxes: np.ndarray) -> np.ndarray:
        """(K, 2) velocity of each of the sender's detections `boxes` (its own frame) from its track of them
        over its frames (world positions from its odometry); slower than `min_speed_mps` counts as parked."""
        assert self.motion is not None
        tracker = self.trackers.setdefault((scenario, view.sender), MotionTracker(self.motion))
        velocity = tracker.update_boxes(boxes, view.T_world_from_frame, view.capture_time) \
            @ view.T_world_from_frame[:2, :2]  # world -> sender frame
        velocity[np.linalg.norm(velocity, axis=1) < self.motion.min_speed_mps] = 0.0
        return velocity

    def message(self, view: AgentInput, boxes: np.ndarray, scores: np.ndarray, codes: np.ndarray, bits: int,
                digest: bytes, velocity: np.ndarray | None) -> AnchorMessage:
        """A sender's message of `boxes` (K, 7) in its own frame, with the pose its localisation gives it."""
        pose = self.channel.noisy_pose(view.T_world_from_agent) @ invert(view.T_world_from_agent) @ view.T_world_from_frame
        self.sequence += 1
        return AnchorMessage(view.sender, self.sequence, view.capture_time, pose, boxes, scores, codes, bits, digest,
                             velocity)

    def send(self, scenario: str, view: AgentInput, msg: AnchorMessage) -> int:
        """Push one sender's message over its link; the bytes of it that arrive."""
        packet = encode_anchor_message(msg, self.cfg.comm.channel.mtu,
                                       self.keys.get(view.sender) if self.keys is not None else None)
        tx = self.channel.transmit((scenario, view.sender), [packet], view.capture_time)
        self.queues.setdefault((scenario, view.sender), []).append(tx)
        return tx.delivered_bytes

    def arrivals(self, scenario: str, views: list[AgentInput], decode: Callable[[bytes], AnchorMessage],
                 rejected: Counter[str]) -> Iterator[Arrival]:
        """Per sender of `views[1:]`, the newest message the ego can fuse at `views[0]`'s capture time, decoded
        by `decode` (refusals are counted in `rejected` and that sender is skipped for this frame)."""
        ego_time = views[0].capture_time
        T_ego_from_world = invert(views[0].T_world_from_agent)
        for view in views[1:]:
            where = (scenario, view.sender)
            received = receive_newest(self.queues, self.held, self.last_sequence, where, ego_time, self.cfg.comm,
                                      self.keys is not None, lambda t: decode(t.deliveries[0].packet), rejected)
            if received is None:
                continue
            msg = received[1]
            age = ego_time - msg.capture_time
            T = T_ego_from_world @ msg.pose
            boxes = transform_boxes(T, msg.boxes) if len(msg.boxes) else np.zeros((0, 7))
            if msg.velocity is not None and len(boxes):  # moved forward by the message's age
                boxes[:, :2] += msg.velocity @ T[:2, :2].T * age
            yield Arrival(view, msg, boxes, age)

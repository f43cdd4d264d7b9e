"""Delivering intermediate-cooperation messages at evaluation: broadcast -> select -> code -> wire
packets -> channel -> decode, frame after frame.

A `CommSession` runs over the frames of a split in order. At every frame the ego first broadcasts
its pose (and, with information filling, its request) through the wire format and the channel to
every sender. A sender waits up to `channel.broadcast_wait_ms` after its capture for that broadcast
and otherwise goes on with the newest one it received: with `project_first` it projects its points
into the ego pose of that broadcast (its own pose as its noisy localisation gives it) and the message
says that frame; with filling it leaves out the cells of that broadcast's request. Nothing else of the
ego reaches it. Each sender then encodes its selected cells into packets and pushes them through its
link; the ego receives, per sender, the newest message whose delivered packets have all arrived by its
capture time plus the fusion deadline (an older frame under delay), rebuilt from the bytes that
arrived, and warps it from the frame the message states. The session only delivers: the ego side
that fuses is the one training uses. Byte counts are the lengths of the packets the ego received and,
once per frame, of the ego's broadcast. Dense maps are not pushed through the channel (they would
not fit it); they are delivered whole, counted at their serialized size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np
import torch

from coperception.comm.channel import Channel, Transmission, newest_arrived
from coperception.comm.codecs import CellCodec, CodebookCodec, DenseCodec
from coperception.comm.keys import load_keys
from coperception.comm.kinds import MalformedMessage, MessageKind
from coperception.comm.wire import Expected, Message, ReplayedMessage, StaleMessage, decode_packets, encode_message
from coperception.config import ChannelConfig, CommConfig, ExperimentConfig, MotionSettings
from coperception.errors import ConfigError
from coperception.datasets.collate import AgentInput, PreparedSample, Projector
from coperception.datasets.voxelize import pillar_points
from coperception.fusion.motion import MotionTracker, moving_objects
from coperception.geometry import invert
from coperception.models.uncertainty import (dequantize as dequantize_uncertainty, most_uncertain,
                                             quantize as quantize_uncertainty)
from coperception.pipeline.agent import AgentSide
from coperception.pipeline.attacks import GhostAttack
from coperception.pipeline.consistency import check_message, free_space
from coperception.pipeline.ego import Delivery


@dataclass
class EncodedViews:
    """What an agent-side encoder gives for some views: (n, C, H, W) features and, when it computes them
    too (an exported agent graph), their (n, H, W) confidence and the codes of the cells (n, H*W, m, r),
    negative for cells it did not code (the session codes those it sends from their features)."""

    features: torch.Tensor
    confidence: torch.Tensor | None = None
    codes: torch.Tensor | None = None


Encoder = Callable[[list[AgentInput]], "torch.Tensor | EncodedViews"]


def _encoded(out: "torch.Tensor | EncodedViews") -> EncodedViews:
    return out if isinstance(out, EncodedViews) else EncodedViews(out)


@dataclass
class HeldMessage:
    """A sender's message as the ego fused it: the cells that arrived and where they lie."""

    sender: int
    cells: np.ndarray  # flat indices of the feature grid, in the message's frame
    T_ego_from_frame: np.ndarray  # (4, 4) from the pose the message states
    bytes: int  # delivered bytes of that message
    age_s: float  # ego time - capture time


@dataclass
class FrameComm:
    """What one frame's communication cost and delivered."""

    delivered_bytes: dict[int, int]  # per sender, bytes of this frame's packets that arrived
    broadcast_bytes: int  # the ego's broadcast of its pose and filling request (0 when none is needed)
    fused_ages: dict[int, float]  # per sender whose message was delivered: ego time - capture time
    rejected: dict[str, int] = field(default_factory=dict)  # messages the ego refused, by reason
    held: list[HeldMessage] = field(default_factory=list)  # what the ego fused, per sender (cell messages)


def newest_to_fuse(queues: dict[tuple[str, int], list[Transmission]], where: tuple[str, int], ego_time: float,
                   channel: ChannelConfig) -> Transmission | None:
    """The transmission of link `where` the ego fuses at `ego_time`: the newest whose packets have all arrived
    by the fusion deadline (older ones leave the queue); None when none has, or when it is older than
    `channel.max_message_age_ms`."""
    queue = queues.get(where, [])
    tx = newest_arrived(queue, ego_time + channel.fusion_deadline_ms / 1e3)
    if tx is None:
        return None
    queues[where] = [t for t in queue if t.capture_time >= tx.capture_time]
    max_age = channel.max_message_age_ms
    if max_age is not None and ego_time - tx.capture_time > max_age / 1e3 + 1e-9:
        return None
    return tx


class Stamped(Protocol):
    """What the freshness check reads of a message (cell or box messages alike)."""

    sender: int
    sequence: int
    capture_time: float


T_msg = TypeVar("T_msg", bound=Stamped)


def held_message(held: dict[tuple[str, int], tuple[Transmission, T_msg]], last_sequence: dict[tuple[str, int], int],
                 tx: Transmission, where: tuple[str, int], ego_time: float, comm: CommConfig, authenticated: bool,
                 decode: Callable[[Transmission], T_msg]) -> T_msg:
    """The message of `tx` on link `where`: what the ego already holds when `tx` is still the newest that
    arrived, else `decode(tx)` (which raises `MalformedMessage` on anything wrong) and, when `authenticated`,
    `check_fresh`; the accepted message is held."""
    kept = held.get(where)
    if kept is not None and kept[0] is tx:
        return kept[1]
    msg = decode(tx)
    if authenticated:
        check_fresh(last_sequence, where, msg.sender, msg.sequence, msg.capture_time, ego_time, comm)
    held[where] = (tx, msg)
    return msg


def receive_newest(queues: dict[tuple[str, int], list[Transmission]],
                   held: dict[tuple[str, int], tuple[Transmission, T_msg]], last_sequence: dict[tuple[str, int], int],
                   where: tuple[str, int], ego_time: float, comm: CommConfig, authenticated: bool,
                   decode: Callable[[Transmission], T_msg], rejected: Counter[str]) -> tuple[Transmission, T_msg] | None:
    """What the ego fuses from link `where` at `ego_time`: the newest transmission that arrived in time
    (`newest_to_fuse`) and its message (`held_message`). None when nothing arrived, or when that message is
    refused: it leaves the queue and is counted in `rejected` by reason, and the ego goes on without it."""
    tx = newest_to_fuse(queues, where, ego_time, comm.channel)
    if tx is None:
        return None
    try:
        return tx, held_message(held, last_sequence, tx, where, ego_time, comm, authenticated, decode)
    except MalformedMessage as exc:
        rejected[type(exc).__name__] += 1
        queues[where].remove(tx)
        return None


def check_fresh(last_sequence: dict[tuple[str, int], int], where: tuple[str, int], sender: int, sequence: int,
                capture_time: float, ego_time: float, comm: CommConfig) -> None:
    """An authenticated message must be newer than the last one accepted from its sender (`ReplayedMessage`)
    and captured within the freshness window (`StaleMessage`); an accepted one's sequence is recorded."""
    last = last_sequence.get(where)
    if last is not None and sequence <= last:
        raise ReplayedMessage(f"sender {sender}: sequence {sequence} after {last}")
    slack = comm.channel.fusion_deadline_ms / 1e3
    if not ego_time - comm.freshness_ms / 1e3 <= capture_time <= ego_time + slack:
        raise StaleMessage(f"sender {sender}: captured at {capture_time:.3f} s, the ego is at {ego_time:.3f} s")
    last_sequence[where] = sequence


@dataclass(frozen=True)
class HeardBroadcast:
    """A broadcast a sender received: the ego's capture time and pose it states, and when it arrived."""

    capture_time: float
    pose: np.ndarray  # (4, 4) T_world_from_ego
    arrival_time: float


def pose_ahead(heard: Sequence[HeardBroadcast], send_time: float, period: float | None, deadline_s: float
               ) -> np.ndarray:
    """The ego pose a sender projects a message it sends at `send_time` into: the ego's pose at the ego
    frame that will fuse it, predicted from the broadcasts it heard (oldest first). The newest broadcast's
    link delay says when the message arrives, and so (with the fusion deadline and the ego's frame `period`)
    how many frames after that broadcast it is fused; the ego moves on by its last move (the last two
    broadcasts), scaled to one period, per frame. With one broadcast, no period, or a message fused at the
    newest broadcast's frame: that broadcast's pose."""
    newest = heard[-1]
    if len(heard) < 2 or not period or period <= 0:
        return newest.pose
    arrival = send_time + (newest.arrival_time - newest.capture_time)
    frames = int(np.ceil((arrival - deadline_s - newest.capture_time) / period - 1e-6))
    if frames <= 0:
        return newest.pose
    before = heard[-2]
    move = invert(before.pose) @ newest.pose  # in the ego's frame, over the gap between the two broadcasts
    share = period / (newest.capture_time - before.capture_time)
    yaw = np.arctan2(move[1, 0], move[0, 0]) * share
    step = np.eye(4)
    step[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
    step[:3, 3] = move[:3, 3] * share
    return newest.pose @ np.linalg.matrix_power(step, frames)


@dataclass
class CommSession:
    agent: AgentSide  # the model's selection and codec
    confidence: Callable[[torch.Tensor], torch.Tensor]  # (n, C, H, W) features -> (n, H, W) confidence maps
    cfg: CommConfig  # channel, keys and freshness
    queues: dict[tuple[str, int], list[Transmission]] = field(default_factory=dict)
    sequence: int = 0
    # per (scenario, sender): the transmission whose message the ego holds, decoded once
    held: dict[tuple[str, int], tuple[Transmission, Message]] = field(default_factory=dict)
    last_sequence: dict[tuple[str, int], int] = field(default_factory=dict)  # newest accepted, per sender
    attack: GhostAttack | None = None  # a malicious sender, for `bench attack`
    projector: Projector | None = None  # project_first: senders project their points into the ego pose they heard
    # per (scenario, receiving sender): the ego's broadcasts sent to it
    broadcasts: dict[tuple[str, int], list[Transmission]] = field(default_factory=dict)
    # (n, C, H, W) -> (n, 2, H, W) per-cell uncertainty as sent: senders send it with their cells (a fusion
    # that weighs by it); None: nothing of it is computed or sent
    uncertainty: Callable[[torch.Tensor], torch.Tensor | None] | None = None
    # motion compensation: (n, C, H, W) -> each view's own detected boxes, and the settings; senders track
    # their detections and send their moving objects with every message
    boxes: Callable[[torch.Tensor], list[np.ndarray]] | None = None
    motion: MotionSettings | None = None
    trackers: dict[tuple[str, int], MotionTracker] = field(default_factory=dict)
    # `cooperation.project_ahead`: per (scenario, receiving sender) the broadcasts it accepted (the last two) and
    # the shortest gap between two of them (the ego's frame period, as far as the sender can tell)
    project_ahead: bool = False
    heard_log: dict[tuple[str, int], list[HeardBroadcast]] = field(default_factory=dict)
    heard_period: dict[tuple[str, int], float] = field(default_factory=dict)

    @classmethod
    def for_config(cls, agent: AgentSide, confidence: Callable[[torch.Tensor], torch.Tensor], cfg: ExperimentConfig,
                   attack: GhostAttack | None = None,
                   uncertainty: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                   boxes: Callable[[torch.Tensor], list[np.ndarray]] | None = None) -> "CommSession":
        """The session `cfg` describes: its comm section and, with `cooperation.project_first`, senders
        that project their points into the ego pose they received; with `fusion.motion.enabled` (and
        `boxes`, each view's own detections) senders send their moving objects."""
        projector = Projector(cfg.dataset, cfg.model) if cfg.cooperation.project_first else None
        motion = cfg.fusion.motion if cfg.fusion.motion.enabled else None
        if motion is not None and boxes is None:
            raise ConfigError("fusion.motion.enabled: motion compensation needs the senders' own detections")
        return cls(agent, confidence, cfg.comm, attack=attack, projector=projector, uncertainty=uncertainty,
                   boxes=boxes if motion is not None else None, motion=motion,
                   project_ahead=cfg.cooperation.project_ahead)

    def __post_init__(self) -> None:
        self.codec = self.agent.codec
        self.channel = Channel(self.cfg.channel, np.random.default_rng(self.cfg.channel.seed))
        self.grid = self.agent.grid
        self.codebook_hash = self.codec.digest()
        self.keys = load_keys(self.cfg.key_file) if self.cfg.key_file else None
        self.expected = None
        if isinstance(self.codec, CellCodec):
            self.expected = self.codec.expected(self.grid)
            self._check_mtu(self.codec)

    def _check_mtu(self, codec: CellCodec) -> None:
        """One cell of this codec must fit a packet (else the first message would fail mid-evaluation)."""
        one = codec.payload(torch.zeros(1, codec.channels))
        probe = Message(sender=0, sequence=0, capture_time=0.0, pose=np.eye(4), grid=self.grid, cells=np.zeros(1, np.int64),
                        **one)
        try:
            encode_message(probe, self.cfg.channel.mtu, b"\0" * 32 if self.keys is not None else None)
        except ValueError as exc:
            raise ConfigError(f"comm.channel.mtu {self.cfg.channel.mtu}: {exc}") from None

    def _key(self, sender: int) -> bytes | None:
        """The sender's signing key (None: it has none and sends unsigned, which a keyed ego refuses)."""
        return self.keys.get(sender) if self.keys is not None else None

    def _decode(self, tx: Transmission) -> Message:
        """The message of `tx`, verified and validated (with keys also signed). Raises `MalformedMessage` (or a
        subclass) otherwise."""
        return decode_packets([d.packet for d in tx.deliveries], keys=self.keys, require_auth=self.keys is not None,
                              expected=self.expected)

    @property
    def broadcasting(self) -> bool:
        """Whether the ego broadcasts its pose: senders project into it, or select against it (sparse)."""
        return self.projector is not None or isinstance(self.codec, CellCodec)

    def _broadcast(self, scenario: str, views: Sequence[AgentInput], ego_conf: torch.Tensor) -> int:
        """The ego's broadcast of this frame: its pose and, with filling, the cells of its request. Sent
        once over the air, after the ego's own encoder, and received by each sender over its own link
        (its own loss and jitter); returns its bytes."""
        ego = views[0]
        request = self.agent.request(ego_conf)  # None without filling (or when it is empty)
        cells = np.zeros(0, np.int64) if request is None else \
            torch.nonzero(request.flatten(), as_tuple=True)[0].cpu().numpy()
        self.sequence += 1
        msg = Message(MessageKind.REQUEST, ego.sender, self.sequence, ego.capture_time, ego.T_world_from_agent,
                      self.grid, cells)
        packets = encode_message(msg, self.cfg.channel.mtu, self._key(ego.sender))
        for view in views[1:]:
            tx = self.channel.transmit((scenario, "broadcast", view.sender), packets, ego.capture_time)
            self.broadcasts.setdefault((scenario, view.sender), []).append(tx)
        return sum(len(p) for p in packets)

    def _heard(self, scenario: str, view: AgentInput) -> tuple[Message | None, float]:
        """The newest ego broadcast the sender of `view` has received when it goes on, decoded from the
        packets that arrived, and when it goes on: when the broadcast of its own frame arrived or, when
        that one is not there `broadcast_wait_ms` after its capture, at that deadline."""
        where = (scenario, view.sender)
        queue = self.broadcasts.get(where, [])
        if not queue:
            return None, view.capture_time
        deadline = view.capture_time + self.cfg.channel.broadcast_wait_ms / 1e3
        current = queue[-1]  # this frame's
        tx = newest_arrived(queue, deadline)
        ready = max(view.capture_time, current.complete_time) if tx is current else deadline
        while tx is not None:
            try:
                msg = decode_packets([d.packet for d in tx.deliveries], keys=self.keys, require_auth=self.keys is not None,
                                     expected=Expected(self.grid, (MessageKind.REQUEST,)))
            except MalformedMessage:  # refused: the sender goes on with an older one, if any
                queue.remove(tx)
                tx = newest_arrived(queue, deadline)
                continue
            self.broadcasts[where] = [t for t in queue if t.capture_time >= tx.capture_time]
            self._log_heard(where, HeardBroadcast(msg.capture_time, msg.pose, tx.complete_time))
            return msg, ready
        return None, ready

    def _log_heard(self, where: tuple[str, int], broadcast: HeardBroadcast) -> None:
        log = self.heard_log.setdefault(where, [])
        if log and broadcast.capture_time <= log[-1].capture_time:
            return
        if log:
            gap = broadcast.capture_time - log[-1].capture_time
            self.heard_period[where] = min(gap, self.heard_period.get(where, gap))
        log.append(broadcast)
        del log[:-2]

    def _projection_pose(self, where: tuple[str, int], heard: Message, send_time: float) -> np.ndarray:
        """The ego pose a projecting sender projects into: the heard broadcast's, or with `project_ahead` the
        one predicted for the ego frame that will fuse its message (`pose_ahead`)."""
        log = self.heard_log.get(where)
        if not self.project_ahead or not log or log[-1].capture_time != heard.capture_time:
            return heard.pose
        return pose_ahead(log, send_time, self.heard_period.get(where), self.cfg.channel.fusion_deadline_ms / 1e3)

    def _prepare_sender(self, view: AgentInput, heard: Message | None, T_world_from_ego: np.ndarray,
                        frame_key: str, ready: float) -> tuple[AgentInput, np.ndarray, bool, np.ndarray]:
        """The view the sender encodes, the pose of its frame as its message states it, whether it
        projected, and its own pose as its localisation gives it (noisy). With `project_first` and a
        broadcast heard it moves its points into the ego pose of that broadcast (with `project_ahead`: the
        ego pose predicted for the frame that will fuse its message, sent when it goes on at `ready`), else it
        stays in its own frame."""
        own = self.channel.noisy_pose(view.T_world_from_agent)
        if self.projector is None or heard is None or view.points is None:
            return view, own @ invert(view.T_world_from_agent) @ view.T_world_from_frame, False, own
        frame = self._projection_pose((frame_key.split("/")[0], view.sender), heard, ready)
        T_frame_from_own = invert(frame) @ own
        voxels = self.projector(view.points, T_frame_from_own, frame_key, view.sender)
        cameras = view.own_cameras.moved(T_frame_from_own) if view.own_cameras is not None else None
        moved = replace(view, voxels=voxels, T_ego_from_frame=invert(T_world_from_ego) @ frame, T_world_from_frame=frame,
                        points=None, cameras=cameras, own_cameras=None)
        return moved, frame, True, own

    def _moving(self, scenario: str, view: AgentInput, boxes: np.ndarray, pose: np.ndarray, own: np.ndarray
                ) -> np.ndarray:
        """The sender's moving objects for its message (K, 7) in the frame the message states (`pose`):
        its detections placed in the world by its odometry (its true motion between its own frames;
        the frame's noisy localisation cancels), tracked over its frames."""
        assert self.motion is not None
        T_world_from_frame = view.T_world_from_agent @ invert(own) @ pose
        tracker = self.trackers.setdefault((scenario, view.sender), MotionTracker(self.motion))
        velocities = tracker.update_boxes(boxes, T_world_from_frame, view.capture_time)
        return moving_objects(boxes, velocities, T_world_from_frame, self.motion.min_speed_mps, self.motion.max_objects)

    def _select(self, conf: torch.Tensor, heard: Message | None, pose: np.ndarray) -> torch.Tensor:
        """(H, W) cells one sender transmits, from its confidence `conf` (H, W) and the broadcast it heard
        (the ego's pose bounds what is useful to the ego, the request says what the ego has); without a
        broadcast it knows nothing of the ego and selects by its confidence alone."""
        if heard is None:
            return self.agent.select(None, conf[None], None)[0]
        T = torch.from_numpy((invert(heard.pose) @ pose).astype(np.float32))[None].to(conf.device)
        bits = torch.zeros(self.grid.cells, dtype=torch.bool, device=conf.device)
        bits[torch.from_numpy(heard.cells).to(conf.device)] = True
        return self.agent.select(bits.view(self.grid.height, self.grid.width), conf[None], T)[0]

    def _message(self, codec: CellCodec, feats: torch.Tensor, mask: torch.Tensor, sender: int, capture_time: float,
                 pose: np.ndarray, codes: torch.Tensor | None = None, uncertainty: torch.Tensor | None = None,
                 motion: np.ndarray | None = None) -> Message:
        """The wire message of the cells `mask` of `feats` (C, H, W); `codes` (H*W, m, r): every cell's
        codes as the sender's encoder computed them (else the codec codes the selected features);
        `uncertainty` (2, H, W) of every cell, sent for the selected ones; `motion` (K, 7) moving objects."""
        cells = torch.nonzero(mask.flatten(), as_tuple=True)[0]
        extra: dict = {"motion": motion}
        if uncertainty is not None:
            picked = uncertainty.flatten(1)[:, cells.to(uncertainty.device)].T  # (N, 2)
            extra["uncertainty"] = quantize_uncertainty(picked).cpu().numpy()
        if codes is not None and isinstance(codec, CodebookCodec):  # cells the encoder left uncoded are coded here
            payload = codec.payload_codes(codes[cells.to(codes.device)], feats.flatten(1)[:, cells].T.contiguous())
        else:
            payload = codec.payload(feats.flatten(1)[:, cells].T.contiguous())  # (N, C) vectors
        self.sequence += 1
        if self.codebook_hash is not None:
            extra["codebook_hash"] = self.codebook_hash
        return Message(sender=sender, sequence=self.sequence, capture_time=capture_time, pose=pose, grid=self.grid,
                       cells=cells.cpu().numpy(), **payload, **extra)

    def _rebuild(self, codec: CellCodec, msg: Message, like: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Decoded message -> (C, H, W) features (zeros where nothing arrived), (H, W) arrived mask and,
        when the message carried it, (2, H, W) uncertainty."""
        C, H, W = like.shape
        flat = like.new_zeros(C, H * W)
        arrived = torch.zeros(H * W, dtype=torch.bool, device=like.device)
        cells = torch.from_numpy(msg.cells).to(like.device)
        unc = None if msg.uncertainty is None else like.new_zeros(2, H * W)
        if len(cells):
            flat[:, cells] = codec.vectors(msg).to(like.device, like.dtype).T
            arrived[cells] = True
            if unc is not None:
                unc[:, cells] = dequantize_uncertainty(torch.from_numpy(msg.uncertainty)).to(like.device, like.dtype).T
        return flat.view(C, H, W), arrived.view(H, W), None if unc is None else unc.view(2, H, W)

    def _whole(self, codec: DenseCodec, feats: torch.Tensor, views: Sequence[AgentInput], poses: Sequence[np.ndarray],
               broadcast_bytes: int) -> tuple[Delivery, "FrameComm"]:
        """Dense maps: every sender's map delivered at once, in the frame its pose states, counted at its
        serialized size."""
        unc = self.uncertainty(feats) if self.uncertainty is not None else None
        per_cell = 2 * feats.shape[-2] * feats.shape[-1] if unc is not None else 0  # one byte each, as in the wire
        sent = {v.sender: codec.dense_bytes(feats[k + 1], v.sender, v.capture_time, pose) + per_cell
                for k, (v, pose) in enumerate(zip(views[1:], poses))}
        inv_ego = invert(views[0].T_world_from_agent)
        T = torch.from_numpy(np.stack([np.eye(4)] + [inv_ego @ p for p in poses]).astype(np.float32)).to(feats.device)
        T[:, 2, 3] = 0.0  # BEV warp: heights do not matter
        age = torch.tensor([v.age for v in views], dtype=torch.float32, device=feats.device)
        kind = torch.tensor([v.kind for v in views], dtype=torch.int64, device=feats.device)
        return Delivery(feats, None, [len(views)], T, age, kind, unc), \
            FrameComm(sent, broadcast_bytes, {v.sender: v.age for v in views[1:]})

    @torch.no_grad()
    def deliver(self, sample: PreparedSample, encode: Encoder) -> tuple[Delivery, FrameComm]:
        """What the ego holds at `sample`'s frame: its own features and, per sender, the newest message
        that has arrived. `encode`: views -> (n, C, H, W) BEV features, each in its view's frame (or
        `EncodedViews` with their confidence and codes)."""
        codec = self.codec
        scenario = sample.frame_key.split("/")[0]
        views = sample.agents
        ego_time = views[0].capture_time
        T_world_from_ego = views[0].T_world_from_agent
        ego = _encoded(encode([views[0]]))
        ego_conf = ego.confidence if ego.confidence is not None else self.confidence(ego.features)
        broadcast_bytes = 0
        if self.broadcasting and len(views) > 1:
            broadcast_bytes = self._broadcast(scenario, views, ego_conf[0])
        encoded, heard, ready, poses, owns = [views[0]], [], [], [], []
        processing = self.cfg.channel.processing_ms / 1e3
        for view in views[1:]:
            msg, t_ready = self._heard(scenario, view) if self.broadcasting else (None, view.capture_time)
            moved, pose, projected, own = self._prepare_sender(view, msg, T_world_from_ego, sample.frame_key, t_ready)
            encoded.append(moved)
            owns.append(own)
            heard.append(msg)
            ready.append(t_ready + (processing if projected else 0.0))  # a projecting sender encodes after it heard
            poses.append(pose)
        others = _encoded(encode(encoded[1:])) if len(encoded) > 1 else None
        feats = torch.cat([ego.features, others.features]) if others is not None else ego.features
        if isinstance(codec, DenseCodec):
            return self._whole(codec, feats, encoded, poses, broadcast_bytes)
        assert isinstance(codec, CellCodec)
        if others is None:
            conf = ego_conf
        else:
            conf = torch.cat([ego_conf, others.confidence if others.confidence is not None
                              else self.confidence(others.features)])
        delivered = {}
        uncertainty = self.uncertainty(feats) if self.uncertainty is not None else None  # the ego's own stays here
        sender_boxes = self.boxes(feats[1:]) if self.boxes is not None and len(feats) > 1 else []
        for k, view in enumerate(encoded[1:]):
            sent, mask = feats[k + 1], self._select(conf[k + 1], heard[k], poses[k])
            codes = others.codes[k] if others is not None and others.codes is not None else None
            unc = uncertainty[k + 1] if uncertainty is not None else None
            if self.attack is not None and self.attack.attacks(k + 1):
                ego_x, ego_y = (float(v) for v in invert(view.T_ego_from_frame)[:2, 3])
                sent, mask = self.attack(sent, conf[k + 1], mask, self.grid, (ego_x, ego_y))
                codes = None  # the lies are coded from the forged features
                unc = self.uncertainty(sent[None])[0] if self.uncertainty is not None else None  # type: ignore[index]
            motion = self._moving(scenario, view, sender_boxes[k], poses[k], owns[k]) if self.motion is not None else None
            msg = self._message(codec, sent, mask, view.sender, view.capture_time, poses[k], codes, unc, motion)
            packets = encode_message(msg, self.cfg.channel.mtu, self._key(view.sender))
            tx = self.channel.transmit((scenario, view.sender), packets, view.capture_time, ready[k])  # clocks restart per scenario
            self.queues.setdefault((scenario, view.sender), []).append(tx)
            delivered[view.sender] = tx.delivered_bytes
        # the ego's own features plus the newest arrived message of each current sender
        chosen_feats, chosen_arrived = [feats[0]], [torch.ones(feats.shape[-2:], dtype=torch.bool, device=feats.device)]
        chosen_unc = [uncertainty[0]] if uncertainty is not None else []
        chosen_motion: list[torch.Tensor | None] = [None]
        transforms, ages, kinds = [np.eye(4)], [0.0], [views[0].kind]
        fused_ages: dict[int, float] = {}
        held: list[HeldMessage] = []
        rejected: Counter[str] = Counter()
        checks = self.cfg.consistency
        ego_free = free_space(pillar_points(views[0].voxels), self.grid, checks.ground_z) if checks.enabled else None
        for view in views[1:]:
            received = receive_newest(self.queues, self.held, self.last_sequence, (scenario, view.sender), ego_time,
                                      self.cfg, self.keys is not None, self._decode, rejected)
            if received is None:  # nothing arrived, too old to help, or refused: the ego detects without it
                continue
            tx, msg = received
            f, arrived, unc = self._rebuild(codec, msg, feats[0])
            T_ego_from_sender = invert(T_world_from_ego) @ msg.pose
            if ego_free is not None:
                T_bev = torch.from_numpy(T_ego_from_sender.astype(np.float32))
                T_bev[2, 3] = 0.0
                verdict = check_message(checks, f, arrived, T_bev, feats[0], conf[0], ego_free, self.confidence, self.grid)
                if not verdict.consistent:  # contradicts what the ego itself observed: dropped for this frame
                    rejected["InconsistentMessage"] += 1
                    continue
            chosen_feats.append(f)
            chosen_arrived.append(arrived)
            if uncertainty is not None:  # a message without it counts as uncertain as the wire can say
                chosen_unc.append(unc if unc is not None else most_uncertain(uncertainty[:1])[0])
            chosen_motion.append(None if msg.motion is None else torch.from_numpy(msg.motion).to(feats.device, feats.dtype))
            transforms.append(T_ego_from_sender)
            ages.append(ego_time - msg.capture_time)
            kinds.append(view.kind)
            fused_ages[view.sender] = ego_time - msg.capture_time
            held.append(HeldMessage(view.sender, msg.cells, T_ego_from_sender, tx.delivered_bytes, ego_time - msg.capture_time))
        T = torch.from_numpy(np.stack(transforms).astype(np.float32)).to(feats.device)
        T[:, 2, 3] = 0.0  # BEV warp: heights do not matter
        delivery = Delivery(torch.stack(chosen_feats), torch.stack(chosen_arrived), [len(chosen_feats)], T,
                            torch.tensor(ages, dtype=torch.float32, device=feats.device),
                            torch.tensor(kinds, dtype=torch.int64, device=feats.device),
                            torch.stack(chosen_unc) if uncertainty is not None else None,
                            chosen_motion if self.motion is not None else None)
        return delivery, FrameComm(delivered, broadcast_bytes, fused_ages, rejected, held)

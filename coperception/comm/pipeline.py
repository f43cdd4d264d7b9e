"""Sparse messages end to end at inference: select -> (quantize) -> wire packets -> channel -> decode -> fuse.

A `CommSession` runs over the frames of a split in order. At every frame each sender encodes its
selected cells into packets and pushes them through its link; the ego then fuses, per sender, the
newest message whose delivered packets have all arrived by the ego's capture time (an older frame
under delay), rebuilt from the bytes that arrived and warped with the pose the message carries.
Byte counts are the lengths of the packets the ego received.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from coperception.comm.channel import Channel, Transmission, newest_arrived
from coperception.comm.select import select_for_senders
from coperception.comm.wire import GridSpec, Message, MessageKind, decode_packets, encode_message
from coperception.config import CommConfig
from coperception.datasets.collate import PreparedSample
from coperception.fusion.base import FusionMeta, warp_to_ego
from coperception.geometry import invert
from coperception.models.detector import PointPillars
from coperception.models.heads import HeadOutput


def agent_key(seed: int, sender: int) -> bytes:
    """The per-agent HMAC key of a run (derived; a deployment would provision real keys)."""
    return hashlib.sha256(f"coperception-key/{seed}/{sender}".encode()).digest()


@dataclass
class FrameComm:
    """What one frame's communication cost and delivered."""

    delivered_bytes: dict[int, int]  # per sender, bytes of this frame's packets that arrived
    request_bytes: int  # the ego's information-filling request (0 without filling)
    fused_ages: dict[int, float]  # per sender whose message was fused: ego time - capture time


@dataclass
class CommSession:
    model: PointPillars
    cfg: CommConfig
    codes: bool  # codebook codes (else fp32 values)
    queues: dict[tuple[str, int], list[Transmission]] = field(default_factory=dict)
    sequence: int = 0

    def __post_init__(self) -> None:
        self.channel = Channel(self.cfg.channel, np.random.default_rng(self.cfg.channel.seed))
        g = self.model.feature_grid
        r = g.point_range
        self.grid = GridSpec(float(r[0]), float(r[1]), float(g.cell), g.height, g.width)
        self.codebook_hash = self.model.quantizer.digest() if self.codes and self.model.quantizer is not None else None
        self.keys: dict[int, bytes] = {}

    def _key(self, sender: int) -> bytes | None:
        if not self.cfg.sign:
            return None
        return self.keys.setdefault(sender, agent_key(self.cfg.channel.seed, sender))

    def _message(self, feats: torch.Tensor, mask: torch.Tensor, sender: int, capture_time: float, pose: np.ndarray) -> Message:
        cells = torch.nonzero(mask.flatten(), as_tuple=True)[0]
        vectors = feats.flatten(1)[:, cells].T.contiguous()  # (N, C)
        self.sequence += 1
        if self.codes:
            assert self.model.quantizer is not None and self.codebook_hash is not None
            codes = self.model.quantizer.encode(vectors).cpu().numpy()
            return Message(MessageKind.CODES, sender, self.sequence, capture_time, pose, self.grid, cells.cpu().numpy(),
                           codes=codes, bits=self.model.quantizer.bits, codebook_hash=self.codebook_hash)
        return Message(MessageKind.SPARSE_FP32, sender, self.sequence, capture_time, pose, self.grid, cells.cpu().numpy(),
                       values=vectors.cpu().numpy().astype(np.float32))

    def _rebuild(self, msg: Message, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded message -> (C, H, W) features (zeros where nothing arrived) and (H, W) arrived mask."""
        H, W = self.grid.height, self.grid.width
        flat = torch.zeros(channels, H * W)
        arrived = torch.zeros(H * W, dtype=torch.bool)
        cells = torch.from_numpy(msg.cells)
        if len(cells):
            if msg.kind == MessageKind.CODES:
                assert self.model.quantizer is not None
                vectors = self.model.quantizer.decode(torch.from_numpy(msg.codes))
            else:
                vectors = torch.from_numpy(msg.values)
            flat[:, cells] = vectors.T
            arrived[cells] = True
        return flat.view(channels, H, W), arrived.view(H, W)

    @torch.no_grad()
    def run(self, feats: torch.Tensor, sample: PreparedSample) -> tuple[HeadOutput, FrameComm]:
        """feats (n, C, H, W): this sample's views (ego first), each in its own frame."""
        scenario = sample.frame_key.split("/")[0]
        views = sample.agents
        ego_time = views[0].capture_time
        model = self.model
        conf = model.head.confidence_map(feats)
        T_now = torch.from_numpy(np.stack([v.T_ego_from_frame for v in views[1:]]).astype(np.float32)) if len(views) > 1 \
            else torch.zeros(0, 4, 4)
        masks, request = select_for_senders(conf[0], conf[1:], T_now, model.feature_grid, self.cfg.selection)
        request_bytes = 0
        if request is not None and bool(request.any()):  # an empty request is not sent: no news covers nothing
            req = Message(MessageKind.REQUEST, views[0].sender, self.sequence, ego_time, views[0].T_world_from_agent,
                          self.grid, torch.nonzero(request.flatten(), as_tuple=True)[0].numpy())
            request_bytes = sum(len(p) for p in encode_message(req, self.cfg.channel.mtu, self._key(views[0].sender)))
        delivered = {}
        for k, view in enumerate(views[1:]):
            # the pose of the frame the features are in, as the sender's (noisy) localisation places it
            true_pose = view.T_world_from_agent
            reported_pose = self.channel.noisy_pose(true_pose) @ invert(true_pose) @ view.T_world_from_frame
            msg = self._message(feats[k + 1], masks[k], view.sender, view.capture_time, reported_pose)
            packets = encode_message(msg, self.cfg.channel.mtu, self._key(view.sender))
            tx = self.channel.transmit((scenario, view.sender), packets, view.capture_time)  # clocks restart per scenario
            self.queues.setdefault((scenario, view.sender), []).append(tx)
            delivered[view.sender] = tx.delivered_bytes
        # fuse: the ego's own features plus the newest arrived message of each current sender
        T_world_from_ego = views[0].T_world_from_agent
        chosen_feats, chosen_arrived = [feats[0]], [torch.ones(feats.shape[-2:], dtype=torch.bool)]
        transforms, ages, kinds = [np.eye(4)], [0.0], [views[0].kind]
        fused_ages = {}
        for view in views[1:]:
            queue = self.queues.get((scenario, view.sender), [])
            tx = newest_arrived(queue, ego_time + self.cfg.channel.fusion_deadline_ms / 1e3)
            if tx is None:
                continue
            self.queues[(scenario, view.sender)] = [t for t in queue if t.capture_time >= tx.capture_time]
            max_age = self.cfg.channel.max_message_age_ms
            if max_age is not None and ego_time - tx.capture_time > max_age / 1e3 + 1e-9:
                continue  # too old to help: the ego detects without this sender
            msg = decode_packets([d.packet for d in tx.deliveries], keys=self.keys if self.cfg.sign else None,
                                 codebook_hash=self.codebook_hash, require_auth=self.cfg.sign)
            f, arrived = self._rebuild(msg, feats.shape[1])
            chosen_feats.append(f)
            chosen_arrived.append(arrived)
            transforms.append(invert(T_world_from_ego) @ msg.pose)
            ages.append(ego_time - msg.capture_time)
            kinds.append(view.kind)
            fused_ages[view.sender] = ego_time - msg.capture_time
        stacked = torch.stack(chosen_feats)
        T = torch.from_numpy(np.stack(transforms).astype(np.float32))
        T[:, 2, 3] = 0.0  # BEV warp: heights do not matter
        warped, valid = warp_to_ego(stacked, [len(chosen_feats)], T, model.feature_grid, torch.stack(chosen_arrived))
        meta = FusionMeta(torch.tensor([ages], dtype=torch.float32), torch.tensor([kinds], dtype=torch.int64), T[None])
        assert model.fusion is not None
        out = model.head(model.fusion(warped, valid, meta))
        return out, FrameComm(delivered, request_bytes, fused_ages)

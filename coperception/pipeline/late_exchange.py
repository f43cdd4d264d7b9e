"""Late fusion's messages at evaluation: each sender's detections through the anchor wire format (boxes and
scores, no anchor-feature codes) and the channel (`box_link.py`); the ego merges what arrived with its own
detections by rotated NMS."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from coperception.comm.anchor_wire import MAX_ANCHORS, AnchorMessage, anchor_message_size, decode_anchor_message
from coperception.datasets.collate import PreparedSample
from coperception.models.postprocess import Detections, rotated_nms
from coperception.pipeline.box_link import BoxLink
from coperception.pipeline.session import FrameComm

NO_CODEBOOK = b"\0" * 4  # the codebook hash of a message that carries no codes
_BITS = 1  # the code width a codes-free message states (no code is packed)


def boxes_that_fit(mtu: int, signed: bool, velocity: bool) -> int:
    """The most boxes one packet of at most `mtu` bytes carries."""
    n = MAX_ANCHORS
    while n > 0 and anchor_message_size(n, 0, _BITS, signed, velocity) > mtu:
        n -= 1
    return n


@dataclass(kw_only=True)
class LateSession(BoxLink):
    """Late fusion over the channel: a split's frames in order, every sender's boxes as one packet."""

    def _decode(self, packet: bytes) -> AnchorMessage:
        return decode_anchor_message(packet, self.keys, self.keys is not None, NO_CODEBOOK, 0, _BITS)

    def deliver_boxes(self, sample: PreparedSample, detections: list[Detections], nms_threshold: float
                ) -> tuple[Detections, FrameComm]:
        """One frame: every view's own detections (ego first, each in its own frame) -> the ego's merged
        detections and what the messages cost. A sender sends its most confident boxes that fit a packet."""
        scenario = sample.frame_key.split("/")[0]
        views = sample.agents
        delivered: dict[int, int] = {}
        for view, dets in zip(views[1:], detections[1:]):
            order = np.argsort(-dets.scores, kind="stable")
            boxes, scores = dets.boxes[order].reshape(-1, 7), dets.scores[order]
            velocity = self.velocities(scenario, view, boxes) if self.motion is not None else None
            cap = boxes_that_fit(self.cfg.comm.channel.mtu, self.keys is not None, velocity is not None)
            msg = self.message(view, boxes[:cap], scores[:cap], np.zeros((min(cap, len(boxes)), 0), dtype=np.int64),
                               _BITS, NO_CODEBOOK, velocity[:cap] if velocity is not None else None)
            delivered[view.sender] = self.send(scenario, view, msg)
        all_boxes, all_scores = [detections[0].boxes.reshape(-1, 7)], [detections[0].scores]
        ages: dict[int, float] = {}
        rejected: Counter[str] = Counter()
        for arrival in self.arrivals(scenario, views, self._decode, rejected):
            ages[arrival.view.sender] = arrival.age
            all_boxes.append(arrival.boxes)
            all_scores.append(arrival.message.scores)
        boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
        keep = rotated_nms(boxes, scores, nms_threshold) if len(boxes) else np.zeros(0, dtype=np.int64)
        merged = Detections(boxes[keep], scores[keep], np.zeros(len(keep), dtype=np.int64))
        return merged, FrameComm(delivered, 0, ages, dict(rejected))

"""Sender side of intermediate cooperation: which cells each agent sends and what the codec makes of them.

The same `AgentSide` (its selection settings and its codec, built once from the config) serves
training, where the selected and coded features reach the ego directly, and evaluation, where the
comm session turns them into packets.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from coperception.comm.codecs import MessageCodec
from coperception.comm.select import ego_request, select_for_senders
from coperception.config import SelectionSettings
from coperception.grid import BEVGrid
from coperception.pipeline.ego import Delivery
from coperception.types import AgentBatch


class AgentSide(nn.Module):
    def __init__(self, codec: MessageCodec, selection: SelectionSettings, grid: BEVGrid):
        super().__init__()
        self.codec = codec
        self.selection = selection
        self.grid = grid

    def request(self, ego_conf: torch.Tensor) -> torch.Tensor | None:
        """The ego's information-filling request, (H, W) bool (None without filling or when it is empty:
        an empty request is not sent)."""
        if not (self.codec.sparse and self.selection.filling):
            return None
        request = ego_request(ego_conf, self.selection.request_threshold)
        return request if bool(request.any()) else None

    def select(self, request: torch.Tensor | None, sender_conf: torch.Tensor, T_ego_from_sender: torch.Tensor | None
               ) -> torch.Tensor:
        """(S, H, W) cells each of S senders transmits (all of them for a dense codec), from their own
        confidence and the request and ego pose they received (None: none received)."""
        if not self.codec.sparse:
            return torch.ones_like(sender_conf, dtype=torch.bool)
        T = None if T_ego_from_sender is None else T_ego_from_sender.to(sender_conf.device)
        return select_for_senders(request, sender_conf, T, self.grid, self.selection)

    def selected(self, conf: torch.Tensor, batch: AgentBatch) -> torch.Tensor:
        """(N_total, H, W) bool: every cell of an ego view, the cells each sender selects for its ego
        (training: the request reaches the senders as the ego computed it)."""
        arrived = []
        for c, T in zip(conf.split(batch.record_len), batch.T_ego_from_agent.split(batch.record_len)):
            masks = self.select(self.request(c[0]), c[1:], T[1:]) if len(c) > 1 else c[1:].bool()
            arrived.append(torch.cat([torch.ones_like(c[:1], dtype=torch.bool), masks]))
        return torch.cat(arrived)

    def sent_cells(self, conf: torch.Tensor, batch: AgentBatch) -> tuple[torch.Tensor, ...]:
        """(view, row, col) of every cell the senders of `batch` transmit."""
        return _sender_cells(self.selected(conf, batch), batch)

    def training_delivery(self, feats: torch.Tensor, batch: AgentBatch, kept: torch.Tensor | None,
                          confidence: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Delivery, torch.Tensor | None]:
        """Training: what the ego receives when every message arrives at once (`kept`: (N_total, H, W)
        cells not lost), and the codec's auxiliary loss. Senders keep their selected cells (ranked by
        `confidence` of their features), as the codec's receiver would decode them; the ego's own view
        stays whole."""
        aux = None
        if not self.codec.sparse:
            arrived, out = kept, feats
        else:
            arrived = self.selected(confidence(feats), batch)
            out = feats * arrived[:, None].to(feats.dtype)
            n_idx, y_idx, x_idx = _sender_cells(arrived, batch)
            values, aux = self.codec.train_values(feats[n_idx, :, y_idx, x_idx])
            out = _put_cells(out, n_idx, y_idx, x_idx, values)
            if kept is not None:
                arrived = arrived & kept
        device = feats.device
        return Delivery(out, arrived, list(batch.record_len), batch.T_ego_from_agent.to(device), batch.age.to(device),
                        batch.kind.to(device), motion=batch.motion), aux


def drop_messages(batch: AgentBatch, rate: float, like: torch.Tensor) -> torch.Tensor:
    """Training stand-in for a lossy channel: (N_total, H, W) arrived mask. With probability `rate` a
    sample loses every sender's message (the ego detects alone, as under total loss); otherwise each
    sender's message is lost with probability `rate / 2` (partial loss)."""
    N, H, W = like.shape[0], like.shape[-2], like.shape[-1]
    alone = torch.rand(len(batch.record_len)) < rate
    keep = (torch.rand(N) >= rate / 2) & ~alone[batch.sample_of_view()]
    keep |= batch.is_ego
    return keep.to(like.device)[:, None, None].expand(N, H, W)


def _sender_cells(arrived: torch.Tensor, batch: AgentBatch) -> tuple[torch.Tensor, ...]:
    """(view, row, col) of the arrived cells of every non-ego view."""
    return torch.nonzero(arrived & ~batch.is_ego.to(arrived.device)[:, None, None], as_tuple=True)


def _put_cells(feats: torch.Tensor, n: torch.Tensor, y: torch.Tensor, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `feats` (N, C, H, W) with the cells (n, :, y, x) replaced by `values` (K, C), differentiably."""
    N, C, H, W = feats.shape
    flat = feats.permute(0, 2, 3, 1).reshape(-1, C)
    index = (n * H + y) * W + x
    flat = flat.index_copy(0, index, values)
    return flat.reshape(N, H, W, C).permute(0, 3, 1, 2)

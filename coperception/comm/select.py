"""Which BEV cells a sender transmits.

Each sender scores its own cells with the confidence map of its own detection head (max over
anchors of the sigmoid class score, optionally Gaussian-smoothed) and keeps the cells above a
threshold and/or its top-k. With information filling the ego first broadcasts a request: the cells
it already sees with confidence. Senders then fill only cells the ego lacks. A sender decides from
its own confidence and the request bits it received, nothing else: the ego's real-valued
confidence and the other senders' choices never travel to it.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

from coperception.config import SelectionSettings
from coperception.grid import BEVGrid, warp


def smooth_confidence(conf: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) -> Gaussian-smoothed (N, H, W); sigma in cells (0: unchanged)."""
    if sigma <= 0:
        return conf
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=conf.dtype, device=conf.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = F.conv2d(conf[:, None], kernel.view(1, 1, 1, -1), padding=(0, radius))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    return out[:, 0]


def select_cells(conf: torch.Tensor, threshold: float | None, top_k: int | None,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """(H, W) confidence -> (H, W) bool: cells >= threshold (if given), at most top_k (if given),
    only where `allowed`."""
    score = conf.clone()
    if allowed is not None:
        score = score.masked_fill(~allowed, float("-inf"))
    mask = torch.isfinite(score)
    if threshold is not None:
        mask &= score >= threshold
    if top_k is not None:
        k = min(int(top_k), int(mask.sum()))
        keep = torch.zeros_like(mask)
        if k > 0:
            flat = score.masked_fill(~mask, float("-inf")).flatten()
            keep.view(-1)[flat.topk(k).indices] = True
        mask = keep
    return mask


def random_top_k(conf: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time selection: k cells drawn without replacement with probability proportional to confidence."""
    flat = conf.flatten().clamp(min=1e-6)
    k = min(k, flat.numel())
    pick = torch.multinomial(flat, k, replacement=False, generator=generator)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=conf.device)
    mask[pick] = True
    return mask.view_as(conf)


def _warp_maps(values: torch.Tensor, T_dst_from_src: torch.Tensor, grid: BEVGrid, mode: str = "bilinear") -> torch.Tensor:
    """(N, H, W) maps in the source frames -> the destination frames (zeros outside the source grid)."""
    return warp(values[:, None].float(), T_dst_from_src, grid, mode)[:, 0]


def ego_request(ego_conf: torch.Tensor, request_threshold: float) -> torch.Tensor:
    """(H, W) ego confidence -> (H, W) bool: the cells the ego already sees (sent as a REQUEST message)."""
    return ego_conf >= request_threshold


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(H, W) bool -> (H, W) bool: every cell within `radius` cells (Chebyshev) of a set cell."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return F.max_pool2d(mask[None, None].float(), k, stride=1, padding=radius)[0, 0] > 0


def select_for_senders(request: torch.Tensor | None, sender_conf: torch.Tensor, T_ego_from_sender: torch.Tensor | None,
                       grid: BEVGrid, cfg: SelectionSettings) -> torch.Tensor:
    """(S, H, W) bool: the cells each of S senders transmits, in its own grid.

    `request` (H, W) bool in the ego frame: the ego's information-filling request as the senders
    received it (None: no request, every sender selects by its own confidence alone);
    sender_conf (S, H, W) and T_ego_from_sender (S, 4, 4) for the S senders: where each sender
    believes the ego frame is (None: it does not know, and neither the ego's grid nor a request
    limits its choice)."""
    S = sender_conf.shape[0]
    if S == 0:
        return torch.zeros_like(sender_conf, dtype=torch.bool)
    conf = smooth_confidence(sender_conf, cfg.smooth_sigma)
    if T_ego_from_sender is None:
        return torch.stack([select_cells(conf[s], cfg.threshold, cfg.top_k) for s in range(S)])
    T_sender_from_ego = torch.linalg.inv(T_ego_from_sender.double()).float()
    # cells that land outside the ego's grid are of no use to it, whatever the selection rule
    allowed = _warp_maps(torch.ones_like(conf), T_sender_from_ego, grid, "nearest") > 0.5
    if cfg.filling and request is not None:
        # the ego's confident cells mark object centres; its features cover the whole object, so each
        # sender widens the requested cells before leaving them out
        seen = dilate(request, cfg.request_dilation).float()[None].expand(S, -1, -1)
        allowed &= _warp_maps(seen, T_sender_from_ego, grid, "nearest") < 0.5
    return torch.stack([select_cells(conf[s], cfg.threshold, cfg.top_k, allowed[s]) for s in range(S)])

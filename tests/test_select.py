"""Cell selection: thresholds, top-k, smoothing and information filling."""

from __future__ import annotations

import torch

from coperception.comm.select import dilate, random_top_k, select_cells, select_for_senders, smooth_confidence
from coperception.config import SelectionSettings
from coperception.grid import BEVGrid

GRID = BEVGrid.from_range((-32.0, -16.0, -3.0, 32.0, 16.0, 1.0), 1.0)  # 64 x 32 cells


def shifted(dx):
    T = torch.eye(4)
    T[0, 3] = dx
    return T


def test_threshold_and_top_k():
    conf = torch.zeros(32, 64)
    conf[5, 5], conf[6, 6], conf[7, 7] = 0.9, 0.5, 0.2
    assert select_cells(conf, 0.3, None).sum() == 2
    top = select_cells(conf, 0.1, 1)
    assert top.sum() == 1 and top[5, 5]
    assert select_cells(conf, None, 3).sum() == 3
    allowed = torch.ones_like(conf, dtype=torch.bool)
    allowed[5, 5] = False
    assert not select_cells(conf, 0.3, None, allowed)[5, 5]
    g = torch.Generator().manual_seed(0)
    assert random_top_k(conf + 0.01, 10, g).sum() == 10


def test_smoothing_spreads_but_keeps_the_mass():
    conf = torch.zeros(1, 32, 64)
    conf[0, 16, 32] = 1.0
    smooth = smooth_confidence(conf, 1.5)
    assert abs(smooth.sum().item() - 1.0) < 1e-5
    assert smooth[0, 16, 32] < 1.0 and smooth[0, 16, 34] > 0


def test_information_filling_sends_only_what_the_ego_lacks_and_no_duplicates():
    ego = torch.zeros(32, 64)
    ego[10:20, 10:20] = 0.9  # the ego already sees this block
    sender = torch.zeros(32, 64)
    sender[10:20, 10:30] = 0.7  # the senders see the ego's block and the block beside it
    senders = torch.stack([sender, sender])
    T = torch.stack([torch.eye(4), torch.eye(4)])  # both at the ego's pose, for easy counting
    plain, request = select_for_senders(ego, senders, T, GRID, SelectionSettings(threshold=0.3))
    assert request is None and plain[0].sum() == plain[1].sum() == 200
    filled, request = select_for_senders(ego, senders, T, GRID, SelectionSettings(threshold=0.3, filling=True,
                                                                                request_threshold=0.5, cap=0.6,
                                                                                request_dilation=0))
    assert request is not None and request.sum() == 100
    assert filled[0].sum() == 100 and not filled[0][10:20, 10:20].any()  # only the missing block
    assert filled[1].sum() == 0  # the first sender already covered it (0.7 >= cap)
    # a low cap lets the second sender add what the first one sent with little confidence
    weak = torch.stack([sender * 0.5, sender])
    filled, _ = select_for_senders(ego, weak, T, GRID, SelectionSettings(threshold=0.3, filling=True, cap=0.6,
                                                                         request_dilation=0))
    assert filled[0].sum() == 100 and filled[1].sum() == 100


def test_requested_cells_are_widened_by_the_senders_not_on_the_wire():
    ego = torch.zeros(32, 64)
    ego[15, 15] = 0.9  # the ego is confident at one object centre
    sender = torch.zeros(1, 32, 64)
    sender[0, 12:19, 12:19] = 0.7  # the sender sees that object's whole 7 x 7 footprint
    settings = SelectionSettings(threshold=0.3, filling=True, request_threshold=0.5, request_dilation=2)
    masks, request = select_for_senders(ego, sender, torch.eye(4)[None], GRID, settings)
    assert request.sum() == 1  # the request carries the centre only
    assert not masks[0][13:18, 13:18].any()  # the 5 x 5 neighbourhood counts as seen
    assert masks[0].sum() == 49 - 25
    assert dilate(request, 0).equal(request) and dilate(request, 1).sum() == 9


def test_senders_skip_cells_outside_the_ego_grid():
    sender = torch.full((1, 32, 64), 0.9)
    masks, _ = select_for_senders(torch.zeros(32, 64), sender, shifted(40.0)[None], GRID, SelectionSettings(threshold=0.3))
    # a sender 40 m ahead: only its cells with x < -8 (its frame) fall inside the ego's 64 m grid
    assert 0 < masks.sum() < 32 * 64
    assert not masks[0][:, 30:].any()

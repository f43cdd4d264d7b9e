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


def test_information_filling_sends_only_what_the_ego_lacks():
    request = torch.zeros(32, 64, dtype=torch.bool)
    request[10:20, 10:20] = True  # the ego already sees this block
    sender = torch.zeros(32, 64)
    sender[10:20, 10:30] = 0.7  # the senders see the ego's block and the block beside it
    senders = torch.stack([sender, sender])
    T = torch.stack([torch.eye(4), torch.eye(4)])  # both at the ego's pose, for easy counting
    plain = select_for_senders(request, senders, T, GRID, SelectionSettings(threshold=0.3))
    assert plain[0].sum() == plain[1].sum() == 200  # without filling the request is ignored
    settings = SelectionSettings(threshold=0.3, filling=True, request_dilation=0)
    filled = select_for_senders(request, senders, T, GRID, settings)
    # only the missing block; both senders send it, since neither hears what the other sends
    assert filled[0].sum() == filled[1].sum() == 100 and not filled[:, 10:20, 10:20].any()
    assert select_for_senders(None, senders, T, GRID, settings).sum() == 400  # no request: nothing is known


def test_senders_decide_from_the_request_bits_alone():
    """Issue 19's reproducer: two ego confidence maps below the request threshold everywhere give the
    same (empty) request on the wire, so they must give the same sender masks."""
    from coperception.comm.codecs import SparseFp32Codec
    from coperception.pipeline.agent import AgentSide

    grid = BEVGrid.from_range((-102.4, -51.2, -3.0, 102.4, 51.2, 1.0), 1.6)  # 128 x 64 cells
    settings = SelectionSettings(threshold=0.1, filling=True, request_threshold=0.5)
    agent = AgentSide(SparseFp32Codec(8, None), settings, grid)
    generator = torch.Generator().manual_seed(0)
    senders = torch.rand(2, grid.height, grid.width, generator=generator)
    T = torch.eye(4).repeat(2, 1, 1)
    quiet = torch.rand(grid.height, grid.width, generator=generator) * 0.49
    other = torch.rand(grid.height, grid.width, generator=generator) * 0.49
    assert agent.request(quiet) is None and agent.request(other) is None  # empty: not sent
    assert torch.equal(agent.select(agent.request(quiet), senders, T), agent.select(agent.request(other), senders, T))
    loud = quiet.clone()
    loud[20:30, 40:60] = 0.9
    same_bits = loud.clone()
    same_bits[20:30, 40:60] = 0.6  # another confidence, the same request bits
    assert torch.equal(agent.request(loud), agent.request(same_bits))
    assert torch.equal(agent.select(agent.request(loud), senders, T), agent.select(agent.request(same_bits), senders, T))


def test_requested_cells_are_widened_by_the_senders_not_on_the_wire():
    request = torch.zeros(32, 64, dtype=torch.bool)
    request[15, 15] = True  # the ego is confident at one object centre
    sender = torch.zeros(1, 32, 64)
    sender[0, 12:19, 12:19] = 0.7  # the sender sees that object's whole 7 x 7 footprint
    settings = SelectionSettings(threshold=0.3, filling=True, request_threshold=0.5, request_dilation=2)
    masks = select_for_senders(request, sender, torch.eye(4)[None], GRID, settings)
    assert not masks[0][13:18, 13:18].any()  # the 5 x 5 neighbourhood counts as seen
    assert masks[0].sum() == 49 - 25
    assert dilate(request, 0).equal(request) and dilate(request, 1).sum() == 9


def test_senders_skip_cells_outside_the_ego_grid():
    sender = torch.full((1, 32, 64), 0.9)
    masks = select_for_senders(None, sender, shifted(40.0)[None], GRID, SelectionSettings(threshold=0.3))
    # a sender 40 m ahead: only its cells with x < -8 (its frame) fall inside the ego's 64 m grid
    assert 0 < masks.sum() < 32 * 64
    assert not masks[0][:, 30:].any()

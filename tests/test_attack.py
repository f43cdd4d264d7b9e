"""Well-formed lies: the ghost attack and the ego's consistency check against its own evidence."""

from __future__ import annotations

import numpy as np
import torch

from coperception.config import ConsistencySettings
from coperception.grid import BEVGrid
from coperception.pipeline.attacks import GhostAttack
from coperception.pipeline.consistency import check_message, free_space

GRID = BEVGrid(-16.0, -8.0, 1.0, 16, 32)


def confidence(features: torch.Tensor) -> torch.Tensor:
    return features[:, 0]  # channel 0 plays the head's confidence


def test_ghost_attack_copies_the_car_feature_into_empty_cells():
    feats = torch.zeros(3, 16, 32)
    feats[:, 4, 5] = torch.tensor([0.9, 2.0, -1.0])  # the sender's one real, confident car
    conf = confidence(feats[None])[0]
    mask = conf > 0.5
    lie, sent = GhostAttack(ghosts=7, seed=1, radius_m=6.0)(feats, conf, mask, GRID, (2.0, 1.0))
    ghosts = sent & ~mask
    assert int(ghosts.sum()) == 7 and bool(sent[4, 5])
    assert torch.equal(lie[:, ghosts].T, feats[:, 4, 5].expand(7, 3))
    x, y = (torch.from_numpy(a) for a in GRID.centres())
    assert (torch.hypot(x[ghosts] - 2.0, y[ghosts] - 1.0) < 6.0).all()  # near the ego
    again, _ = GhostAttack(ghosts=7, seed=1, radius_m=6.0)(feats, conf, mask, GRID, (2.0, 1.0))
    assert torch.equal(lie, again)  # seeded
    assert GhostAttack(sender_slot=1).attacks(1) and not GhostAttack(sender_slot=1).attacks(2)


def test_contradicted_claims_drop_the_message_and_blind_spots_do_not():
    settings = ConsistencySettings(enabled=True, claim_threshold=0.5, min_conflicts=4)
    feats = torch.zeros(3, 16, 32)
    feats[0, 2, 3:13] = 0.9  # ten claimed cells
    arrived = feats[0] > 0
    identity = torch.eye(4)
    ego_feats = torch.zeros(3, 16, 32)
    ego_empty = torch.zeros(16, 32)
    free_everywhere = torch.ones(16, 32, dtype=torch.bool)
    verdict = check_message(settings, feats, arrived, identity, ego_feats, ego_empty, free_everywhere, confidence, GRID)
    assert (verdict.claims, verdict.conflicts, verdict.consistent) == (10, 10, False)
    blind = torch.zeros(16, 32, dtype=torch.bool)  # the ego saw none of those cells: nothing to contradict
    assert check_message(settings, feats, arrived, identity, ego_feats, ego_empty, blind, confidence, GRID).consistent
    ego_agrees = torch.full((16, 32), 0.8)  # the ego is confident there itself: nothing new is claimed
    agreed = check_message(settings, feats, arrived, identity, ego_feats, ego_agrees, free_everywhere, confidence, GRID)
    assert agreed.consistent and agreed.claims == 0
    few = free_everywhere.clone()
    few[2, 3:10] = False  # only 3 contradicted: below min_conflicts
    assert check_message(settings, feats, arrived, identity, ego_feats, ego_empty, few, confidence, GRID).consistent
    # the claims are judged where they land in the ego frame: 8 m to the left (row 2 -> 10), out of the free rows
    shift = torch.eye(4)
    shift[1, 3] = 8.0
    half = torch.zeros(16, 32, dtype=torch.bool)
    half[:8] = True
    moved = check_message(settings, feats, arrived, shift, ego_feats, ego_empty, half, confidence, GRID)
    assert moved.claims == 10 and moved.conflicts == 0


def test_free_space_follows_the_rays_to_ground_returns():
    grid = BEVGrid(-8.0, -8.0, 1.0, 16, 16)  # the sensor at the centre
    ground = np.array([[6.5, 0.5, -1.8], [-3.5, -3.5, -1.8]])
    wall = np.array([[3.5, 0.5, 0.5]])  # something standing on the first ray
    free = free_space(np.vstack([ground, wall]), grid, ground_z=-1.4)
    assert free[8, 8 + 6] and free[8, 8 + 1] and free[8 - 4, 8 - 4]  # along both rays, ends included
    assert not free[8, 8 + 3]  # a cell holding a return above the ground is no evidence of emptiness
    assert not free[0, 0] and not free[8, 8 - 5]  # off the rays: unknown
    assert free_space(wall, grid, ground_z=-1.4).sum() == 0

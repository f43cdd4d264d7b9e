"""Assembling a cooperative sample: ego choice, comm range, max agents, point crops, GT merge.

These rules are shared by every dataset reader (DESIGN §3) so OPV2V and DAIR-V2X behave
identically; the readers only parse files.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from coperception.config import DatasetConfig
from coperception.datasets.types import CooperativeSample
from coperception.geometry import in_range_mask

# the ego car's own body in its LiDAR frame (OPV2V vehicles), metres
EGO_BODY_X = (-1.95, 2.95)
EGO_BODY_Y = (-1.1, 1.1)


def opv2v_agent_order(agent_ids: Sequence[str]) -> list[str]:
    """CAV folders in string order, roadside units (negative ids) last; the first is the ego."""
    ids = sorted(agent_ids)
    return [a for a in ids if not a.startswith("-")] + [a for a in ids if a.startswith("-")]


def select_agents(order: Sequence[str], positions: dict[str, np.ndarray], comm_range: float, max_agents: int) -> list[str]:
    """The first `max_agents` of `order` (the first is the ego), then without those beyond
    `comm_range` metres (xy) of the ego — OpenCOOD's order: the cap comes before the range test,
    so an out-of-range agent inside the cap is not replaced by a later one."""
    if not order:
        return []
    ego_xy = np.asarray(positions[order[0]])[:2]
    return [a for a in list(order)[:max_agents] if np.hypot(*(np.asarray(positions[a])[:2] - ego_xy)) <= comm_range]


def remove_body_points(points: np.ndarray) -> np.ndarray:
    """Drop returns from the sensing car's own body."""
    x, y = points[:, 0], points[:, 1]
    body = (x >= EGO_BODY_X[0]) & (x <= EGO_BODY_X[1]) & (y >= EGO_BODY_Y[0]) & (y <= EGO_BODY_Y[1])
    return points[~body]


def crop_in_ego_frame(points: np.ndarray, T_ego_from_agent: np.ndarray, point_range: Sequence[float]) -> np.ndarray:
    """Keep an agent's points (its own frame) that fall inside the range once moved into the ego
    frame; a roadside LiDAR on a 6 m pole keeps its ground returns this way."""
    r = np.asarray(point_range, dtype=np.float64)
    xyz = points[:, :3].astype(np.float64) @ T_ego_from_agent[:3, :3].T + T_ego_from_agent[:3, 3]
    return points[((xyz >= r[:3]) & (xyz < r[3:])).all(axis=1)]


def merge_ground_truth(per_agent: Sequence[tuple[np.ndarray, np.ndarray, list[str]]], exclude_ids: set[int],
                       gt_range: Sequence[float]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Union of the agents' GT (boxes already in the ego frame) without `exclude_ids`, keeping
    boxes whose 8 corners lie inside `gt_range`, deduplicated by id: the first listing **that
    lies in range** wins (OpenCOOD), so an out-of-range listing never hides an in-range one."""
    boxes, ids, classes = [], [], []
    seen: set[int] = set(exclude_ids)
    for agent_boxes, agent_ids, agent_classes in per_agent:
        agent_boxes = np.asarray(agent_boxes, dtype=np.float64).reshape(-1, 7)
        inside = in_range_mask(agent_boxes, gt_range) if len(agent_boxes) else np.zeros(0, dtype=bool)
        for box, oid, cls, ok in zip(agent_boxes, agent_ids, agent_classes, inside):
            if not ok or int(oid) in seen:
                continue
            seen.add(int(oid))
            boxes.append(box)
            ids.append(int(oid))
            classes.append(cls)
    return np.array(boxes, dtype=np.float64).reshape(-1, 7), np.array(ids, dtype=np.int64), classes


class CooperativeDataset(Protocol):
    """What every dataset reader offers."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> CooperativeSample: ...

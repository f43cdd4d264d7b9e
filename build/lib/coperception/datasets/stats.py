"""Dataset statistics read through the loaders: how much cooperation adds to visibility."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm import tqdm

from coperception.datasets.cooperative import CooperativeDataset
from coperception.geometry import in_range_mask, points_in_boxes, transform_points


def points_per_box(sample_points_ego: list[np.ndarray], boxes: np.ndarray) -> np.ndarray:
    """(L agents) x (M boxes) counts of each agent's points (ego frame) inside each box."""
    return np.stack([points_in_boxes(p, boxes).sum(axis=1) for p in sample_points_ego]) if len(boxes) else np.zeros((len(sample_points_ego), 0))


def visibility_stats(dataset: CooperativeDataset, eval_range: Sequence[float], min_points: int = 5,
                     progress: bool = True) -> dict:
    """Fraction of eval-range GT vehicles with >= `min_points` LiDAR returns from the ego, and
    from any agent; also mean agents per sample and mean points per agent."""
    total = ego_visible = any_visible = 0
    agents = points = 0
    for i in tqdm(range(len(dataset)), desc="visibility", disable=not progress):
        sample = dataset[i]
        boxes = sample.gt_boxes[in_range_mask(sample.gt_boxes, eval_range)] if len(sample.gt_boxes) else sample.gt_boxes
        ego_pts = [transform_points(sample.T_ego_from_agent(k), a.points) for k, a in enumerate(sample.agents)]
        counts = points_per_box(ego_pts, boxes)
        total += counts.shape[1]
        ego_visible += int((counts[0] >= min_points).sum())
        any_visible += int((counts.sum(axis=0) >= min_points).sum()) if counts.shape[1] else 0
        agents += len(sample.agents)
        points += sum(len(a.points) for a in sample.agents)
    n = max(len(dataset), 1)
    return {
        "samples": len(dataset),
        "gt_vehicles": total,
        "min_points": min_points,
        "ego_visible_fraction": ego_visible / total if total else 0.0,
        "union_visible_fraction": any_visible / total if total else 0.0,
        "mean_agents": agents / n,
        "mean_points_per_agent": points / max(agents, 1),
    }

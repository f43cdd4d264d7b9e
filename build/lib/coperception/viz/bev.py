"""Bird's-eye-view pictures with matplotlib (no display needed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from coperception.datasets.types import CooperativeSample  # noqa: E402
from coperception.geometry import bev_corners, transform_points  # noqa: E402
from coperception.io import atomic_write_bytes  # noqa: E402

AGENT_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def draw_boxes(ax: plt.Axes, boxes: np.ndarray, colour: str, label: str | None = None, width: float = 1.2) -> None:
    for i, quad in enumerate(bev_corners(boxes)):
        closed = np.vstack([quad, quad[:1]])
        ax.plot(closed[:, 0], closed[:, 1], color=colour, linewidth=width, label=label if i == 0 else None)
        front = (quad[1] + quad[2]) / 2  # heading tick on the front edge
        ax.plot([quad.mean(axis=0)[0], front[0]], [quad.mean(axis=0)[1], front[1]], color=colour, linewidth=width)


DETECTION_COLOURS = ["#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]


def plot_sample_bev(sample: CooperativeSample, path: str | Path, view_range: Sequence[float] | None = None,
                    title: str | None = None, detections: dict[str, np.ndarray] | None = None) -> None:
    """Every agent's LiDAR points in the ego frame (one colour per agent), agent positions, GT boxes
    and, optionally, predicted boxes per method (`{name: (K, 7) boxes in the ego frame}`)."""
    fig, ax = plt.subplots(figsize=(14, 5), dpi=110)
    for k, agent in enumerate(sample.agents):
        pts = transform_points(sample.T_ego_from_agent(k), agent.points)
        above_ground = pts[:, 2] > pts[:, 2].min() + 0.3 if len(pts) else np.zeros(0, dtype=bool)
        colour = AGENT_COLOURS[k % len(AGENT_COLOURS)]
        ax.scatter(pts[above_ground, 0], pts[above_ground, 1], s=0.15, c=colour, alpha=0.5, linewidths=0)
        T = sample.T_ego_from_agent(k)
        ax.plot(T[0, 3], T[1, 3], marker="^" if agent.kind == "vehicle" else "s", color=colour, markersize=9,
                markeredgecolor="black", label=f"{'ego ' if k == 0 else ''}{agent.kind} {agent.agent_id}")
    draw_boxes(ax, sample.gt_boxes, "black", "ground truth", 0.9)
    for i, (name, boxes) in enumerate((detections or {}).items()):
        draw_boxes(ax, boxes, DETECTION_COLOURS[i % len(DETECTION_COLOURS)], f"detections: {name}", 0.8)
    if view_range is not None:
        ax.set_xlim(view_range[0], view_range[3])
        ax.set_ylim(view_range[1], view_range[4])
    ax.set_aspect("equal")
    ax.set_xlabel("x (m, ego frame)")
    ax.set_ylabel("y (m)")
    ax.set_title(title or f"{sample.dataset} {sample.scenario} frame {sample.frame}")
    ax.legend(loc="upper right", fontsize=7, markerscale=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

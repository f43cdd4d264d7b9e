"""Bird's-eye-view pictures of one cooperative frame with matplotlib (no display needed).

A picture shows, in the ego frame: each agent's LiDAR points in the agent's colour, the agents'
poses and headings with a link from every sender to the ego (its message's bytes and age in the
legend), the cells each sender transmitted, ground truth and predictions coloured by their match at
an IoU threshold (true positive, false positive, missed), and prediction scores.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from coperception.datasets.collate import sender_id  # noqa: E402
from coperception.datasets.types import CooperativeSample  # noqa: E402
from coperception.eval.ap import BoxMatches, match_boxes  # noqa: E402
from coperception.geometry import bev_corners, transform_points  # noqa: E402
from coperception.grid import BEVGrid  # noqa: E402
from coperception.io import atomic_write_bytes  # noqa: E402
from coperception.pipeline.session import HeldMessage  # noqa: E402

# agents get cool colours, matches warm/green ones, so the two never share a hue
AGENT_COLOURS = ["#1f4e9c", "#8e44ad", "#17a2b8", "#8c564b", "#e377c2", "#7f7f7f"]
MATCH_COLOURS = {"tp": "#1a9850", "fp": "#d62728", "missed": "#ff8c00", "ignored": "#b0b0b0"}


def agent_colour(k: int) -> str:
    return AGENT_COLOURS[k % len(AGENT_COLOURS)]


@dataclass
class FrameView:
    """What one BEV picture shows."""

    sample: CooperativeSample
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))  # predictions, ego frame
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    messages: list[HeldMessage] = field(default_factory=list)
    grid: BEVGrid | None = None  # the feature grid the message cells index
    method: str = ""


def cell_quads(grid: BEVGrid, cells: np.ndarray, T: np.ndarray) -> np.ndarray:
    """(N, 4, 2) corners of the flat `cells` of `grid` moved by the 4x4 `T` (x/y only)."""
    rows, cols = np.divmod(np.asarray(cells, dtype=np.int64), grid.width)
    x0 = grid.x_min + cols * grid.cell
    y0 = grid.y_min + rows * grid.cell
    c = grid.cell
    quads = np.stack([np.stack([x0, y0], -1), np.stack([x0 + c, y0], -1), np.stack([x0 + c, y0 + c], -1),
                      np.stack([x0, y0 + c], -1)], axis=1)
    flat = quads.reshape(-1, 2)
    moved = flat @ T[:2, :2].T + T[:2, 3]
    return moved.reshape(-1, 4, 2)


def _draw_boxes(ax: plt.Axes, boxes: np.ndarray, colour: str, width: float, style: str = "-") -> None:
    for quad in bev_corners(boxes):
        closed = np.vstack([quad, quad[:1]])
        ax.plot(closed[:, 0], closed[:, 1], color=colour, linewidth=width, linestyle=style, solid_capstyle="butt")
        front = (quad[1] + quad[2]) / 2  # heading tick on the front edge
        centre = quad.mean(axis=0)
        ax.plot([centre[0], front[0]], [centre[1], front[1]], color=colour, linewidth=width)


def draw_boxes(ax: plt.Axes, boxes: np.ndarray, colour: str, label: str | None = None, width: float = 1.2) -> None:
    """Boxes (K, 7) as BEV outlines with a heading tick (`label`, when given, goes to the legend)."""
    _draw_boxes(ax, np.asarray(boxes).reshape(-1, 7), colour, width)
    if label is not None:
        ax.plot([], [], color=colour, linewidth=width, label=label)


def render_frame(view: FrameView, view_range: Sequence[float] | None, iou: float = 0.5,
                 eval_range: Sequence[float] | None = None, gt_range: Sequence[float] | None = None,
                 title: str | None = None, dpi: int = 110, show_scores: bool | None = None) -> plt.Figure:
    """The picture of `view` as a matplotlib figure. `view_range` [x0, y0, x1, y1] (or a 6-value point
    range) zooms; None shows everything. Matching follows the AP protocol (`eval_range`, `gt_range`)."""
    sample = view.sample
    zoom = _xy_range(view_range)
    width_m = (zoom[2] - zoom[0]) if zoom else 280.0
    zoomed = width_m <= 120
    fig, ax = plt.subplots(figsize=(12, 12 * ((zoom[3] - zoom[1]) / (zoom[2] - zoom[0])) + 0.8) if zoom else (14, 6),
                           dpi=dpi)
    legend: list = []
    # cells each sender transmitted (under everything else)
    for msg in view.messages:
        k = _agent_index(sample, msg.sender)
        if view.grid is None or len(msg.cells) == 0:
            continue
        colour = agent_colour(k if k is not None else 5)
        ax.add_collection(PolyCollection(cell_quads(view.grid, msg.cells, msg.T_ego_from_frame), facecolors=colour,
                                         edgecolors="none", alpha=0.22, zorder=1))
        legend.append(Patch(facecolor=colour, alpha=0.4,
                            label=f"cells sent by {msg.sender}: {len(msg.cells)} cells, {msg.bytes:,} B, "
                                  f"age {msg.age_s * 1e3:.0f} ms"))
    # points, agents, links
    point_size = 1.2 if zoomed else 0.25
    for k, agent in enumerate(sample.agents):
        T = sample.T_ego_from_agent(k)
        colour = agent_colour(k)
        pts = transform_points(T, agent.points) if len(agent.points) else agent.points
        if len(pts):
            above = pts[:, 2] > np.percentile(pts[:, 2], 2) + 0.3  # drop the ground returns
            ax.scatter(pts[above, 0], pts[above, 1], s=point_size, c=colour, alpha=0.7, linewidths=0, zorder=2)
        x, y = T[0, 3], T[1, 3]
        heading = np.arctan2(T[1, 0], T[0, 0])
        if k > 0:
            ax.plot([0, x], [0, y], color=colour, linestyle=":", linewidth=1.0, zorder=3)
        ax.plot(x, y, marker="^" if agent.kind == "vehicle" else "s", color=colour, markersize=10,
                markeredgecolor="black", zorder=6)
        ax.arrow(x, y, 4 * np.cos(heading), 4 * np.sin(heading), color=colour, width=0.3, zorder=6)
        legend.append(Line2D([], [], marker="^" if agent.kind == "vehicle" else "s", color=colour, linestyle="none",
                             markeredgecolor="black", label=f"{'ego ' if k == 0 else ''}{agent.kind} {agent.agent_id}"))
    # ground truth and predictions by match
    m = frame_matches(view, iou, eval_range, gt_range)
    gt = np.asarray(sample.gt_boxes).reshape(-1, 7)
    _draw_boxes(ax, gt[~m.gt_kept], MATCH_COLOURS["ignored"], 0.8)
    _draw_boxes(ax, gt[m.gt_kept & m.gt_matched], MATCH_COLOURS["tp"], 1.6)
    _draw_boxes(ax, gt[m.gt_kept & ~m.gt_matched], MATCH_COLOURS["missed"], 1.6)
    boxes = np.asarray(view.boxes).reshape(-1, 7)
    _draw_boxes(ax, boxes[m.true_positive], MATCH_COLOURS["tp"], 1.3, "--")
    _draw_boxes(ax, boxes[m.evaluated & ~m.true_positive], MATCH_COLOURS["fp"], 1.3, "--")
    _draw_boxes(ax, boxes[~m.evaluated], MATCH_COLOURS["ignored"], 0.8, "--")
    if show_scores if show_scores is not None else zoomed:
        for box, score in zip(boxes, view.scores):
            if zoom is None or (zoom[0] <= box[0] <= zoom[2] and zoom[1] <= box[1] <= zoom[3]):
                ax.text(box[0], box[1] + 0.6 * box[4] + 0.8, f"{score:.2f}", fontsize=7, ha="center", zorder=7)
    n_tp, n_fp = int(m.true_positive.sum()), int((m.evaluated & ~m.true_positive).sum())
    n_missed = int((m.gt_kept & ~m.gt_matched).sum())
    legend += [Line2D([], [], color=MATCH_COLOURS["tp"], linewidth=1.6, label=f"ground truth, detected ({int(m.gt_matched.sum())})"),
               Line2D([], [], color=MATCH_COLOURS["missed"], linewidth=1.6, label=f"ground truth, missed ({n_missed})"),
               Line2D([], [], color=MATCH_COLOURS["tp"], linestyle="--", label=f"prediction, true positive ({n_tp})"),
               Line2D([], [], color=MATCH_COLOURS["fp"], linestyle="--", label=f"prediction, false positive ({n_fp})"),
               Line2D([], [], color=MATCH_COLOURS["ignored"], label="outside the evaluation range")]
    if zoom is not None:
        ax.set_xlim(zoom[0], zoom[2])
        ax.set_ylim(zoom[1], zoom[3])
    ax.set_aspect("equal")
    ax.set_xlabel("x (m, ego frame)")
    ax.set_ylabel("y (m, ego frame)")
    ax.set_facecolor("white")
    ax.grid(True, alpha=0.15)
    method = f", {view.method}" if view.method else ""
    ax.set_title(title or f"{sample.dataset} {sample.scenario} frame {sample.frame}{method} (IoU {iou:g})")
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    return fig


def save_figure(fig: plt.Figure, path: str | Path) -> None:
    """PNG or SVG by the suffix of `path`, written atomically."""
    buf = io.BytesIO()
    fmt = "svg" if str(path).lower().endswith(".svg") else "png"
    fig.savefig(buf, format=fmt, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_sample_bev(sample: CooperativeSample, path: str | Path, view_range: Sequence[float] | None = None,
                    title: str | None = None, detections: tuple[str, np.ndarray, np.ndarray] | None = None,
                    eval_range: Sequence[float] | None = None, gt_range: Sequence[float] | None = None) -> None:
    """One frame to `path`: `detections` (method, boxes, scores) coloured by match."""
    method, boxes, scores = detections if detections is not None else ("", np.zeros((0, 7)), np.zeros(0))
    fig = render_frame(FrameView(sample, boxes, scores, method=method), view_range, eval_range=eval_range,
                       gt_range=gt_range, title=title)
    save_figure(fig, path)


def _xy_range(r: Sequence[float] | None) -> tuple[float, float, float, float] | None:
    if r is None:
        return None
    r = [float(v) for v in r]
    return (r[0], r[1], r[3], r[4]) if len(r) == 6 else (r[0], r[1], r[2], r[3])


EVERYTHING = [-1e9, -1e9, -1e9, 1e9, 1e9, 1e9]  # no eval range given: every box counts


def frame_matches(view: FrameView, iou: float, eval_range: Sequence[float] | None = None,
                  gt_range: Sequence[float] | None = None) -> BoxMatches:
    """The AP protocol's matching of `view`'s predictions and ground truth (what the pictures colour)."""
    return match_boxes(view.boxes, view.scores, view.sample.gt_boxes, iou, eval_range or EVERYTHING, gt_range)


def _agent_index(sample: CooperativeSample, sender: int) -> int | None:
    for k, agent in enumerate(sample.agents):
        if sender_id(agent.agent_id) == sender:
            return k
    return None

"""Other ways to look at a frame: a 3D view (open3d offscreen when it works, else matplotlib's 3D axes)
and a camera image with the boxes projected into it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from coperception.errors import ConfigError, DataFormatError  # noqa: E402
from coperception.geometry import boxes_to_corners, transform_points  # noqa: E402
from coperception.viz.bev import MATCH_COLOURS, FrameView, agent_colour, frame_matches, save_figure  # noqa: E402

# the 12 edges of a box in the corner order of `geometry.boxes_to_corners`
BOX_EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]


def _coloured_boxes(view: FrameView, iou: float, eval_range: Sequence[float] | None,
                    gt_range: Sequence[float] | None) -> list[tuple[np.ndarray, str, str]]:
    """(boxes, colour, line style) groups: GT detected / missed, predictions TP / FP."""
    m = frame_matches(view, iou, eval_range, gt_range)
    gt, boxes = np.asarray(view.sample.gt_boxes).reshape(-1, 7), np.asarray(view.boxes).reshape(-1, 7)
    return [(gt[m.gt_kept & m.gt_matched], MATCH_COLOURS["tp"], "-"), (gt[m.gt_kept & ~m.gt_matched], MATCH_COLOURS["missed"], "-"),
            (boxes[m.true_positive], MATCH_COLOURS["tp"], "--"), (boxes[m.evaluated & ~m.true_positive], MATCH_COLOURS["fp"], "--")]


def _open3d_render(view: FrameView, path: Path, groups, size: tuple[int, int]) -> str | None:
    """Render with open3d's offscreen renderer; returns why it could not (None when it wrote `path`)."""
    try:
        import open3d as o3d  # type: ignore[import-not-found]
        import open3d.visualization.rendering as rendering  # type: ignore[import-not-found]
    except ImportError:
        return "open3d is not installed (pip install 'coperception-v2x[viz3d]')"
    try:
        renderer = rendering.OffscreenRenderer(*size)
    except Exception as exc:  # no EGL / OSMesa: open3d raises a plain RuntimeError
        return f"open3d cannot render offscreen here: {exc}; it needs a Vulkan or EGL driver (Debian: mesa-vulkan-drivers)"
    material = rendering.MaterialRecord()
    material.shader = "defaultUnlit"
    material.point_size = 2.0
    lines_material = rendering.MaterialRecord()
    lines_material.shader = "unlitLine"
    lines_material.line_width = 2.0
    for k, agent in enumerate(view.sample.agents):
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(transform_points(view.sample.T_ego_from_agent(k),
                                                                                     agent.points)[:, :3]))
        cloud.paint_uniform_color(matplotlib.colors.to_rgb(agent_colour(k)))
        renderer.scene.add_geometry(f"agent{k}", cloud, material)
    for g, (boxes, colour, _) in enumerate(groups):
        for b, corners in enumerate(boxes_to_corners(boxes)):
            lineset = o3d.geometry.LineSet(o3d.utility.Vector3dVector(corners), o3d.utility.Vector2iVector(BOX_EDGES))
            lineset.paint_uniform_color(matplotlib.colors.to_rgb(colour))
            renderer.scene.add_geometry(f"box{g}_{b}", lineset, lines_material)
    renderer.scene.set_background([1, 1, 1, 1])
    renderer.scene.view.set_post_processing(False)  # no tone mapping: the palette's own colours
    renderer.setup_camera(50.0, [5, 0, 0], [-35, -28, 30], [0, 0, 1])
    image = np.asarray(renderer.render_to_image())
    Image.fromarray(image).save(path)
    return None


def render_3d(view: FrameView, path: str | Path, view_range: Sequence[float] | None = None, iou: float = 0.5,
              eval_range: Sequence[float] | None = None, gt_range: Sequence[float] | None = None,
              engine: str = "auto") -> str:
    """A 3D picture of the frame (points by agent, boxes as line sets coloured by match) to `path`.
    `engine`: `open3d`, `matplotlib` or `auto` (open3d when it can render offscreen here, else
    matplotlib). Returns what drew it, and why open3d did not when it fell back."""
    path = Path(path)
    if engine not in ("auto", "open3d", "matplotlib"):
        raise ConfigError(f"3D engine {engine!r}: expected auto, open3d or matplotlib")
    groups = _coloured_boxes(view, iou, eval_range, gt_range)
    reason = None
    if engine in ("auto", "open3d"):
        reason = _open3d_render(view, path, groups, (1280, 800))
        if reason is None:
            return "open3d"
        if engine == "open3d":
            raise ConfigError(f"--engine open3d: {reason}")
    r = view_range if view_range is not None else [-40.0, -25.0, -3.0, 40.0, 25.0, 2.0]
    r = list(r) if len(r) == 6 else [r[0], r[1], -3.0, r[2], r[3], 2.0]
    fig = plt.figure(figsize=(10, 7), dpi=110)
    ax = fig.add_subplot(projection="3d")
    for k, agent in enumerate(view.sample.agents):
        pts = transform_points(view.sample.T_ego_from_agent(k), agent.points) if len(agent.points) else agent.points
        keep = ((pts[:, :3] >= r[:3]) & (pts[:, :3] <= r[3:])).all(axis=1) if len(pts) else np.zeros(0, bool)
        ax.scatter(pts[keep, 0], pts[keep, 1], pts[keep, 2], s=0.3, c=agent_colour(k), alpha=0.6, depthshade=False,
                   label=f"{'ego ' if k == 0 else ''}{agent.kind} {agent.agent_id}")
    for boxes, colour, style in groups:
        for corners in boxes_to_corners(boxes):
            if not ((corners[:, :2] >= [r[0], r[1]]) & (corners[:, :2] <= [r[3], r[4]])).all():
                continue  # 3D axes do not clip lines
            for a, b in BOX_EDGES:
                ax.plot(*corners[[a, b]].T, color=colour, linestyle=style, linewidth=1.0)
    ax.set_xlim(r[0], r[3])
    ax.set_ylim(r[1], r[4])
    ax.set_zlim(r[2], r[5])
    ax.set_box_aspect((r[3] - r[0], r[4] - r[1], 4 * (r[5] - r[2])))
    ax.view_init(elev=35, azim=-125)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_zlabel("z (m)")
    ax.set_title(f"{view.sample.scenario} frame {view.sample.frame}: points by agent; boxes: green detected, "
                 "orange missed, red false positive", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", markerscale=10)
    save_figure(fig, path)
    return f"matplotlib ({reason})" if reason else "matplotlib"


def render_camera(view: FrameView, camera: int, path: str | Path, iou: float = 0.5,
                  eval_range: Sequence[float] | None = None, gt_range: Sequence[float] | None = None) -> None:
    """`camera_figure` written to `path`."""
    save_figure(camera_figure(view, camera, iou, eval_range, gt_range), path)


def camera_figure(view: FrameView, camera: int, iou: float = 0.5, eval_range: Sequence[float] | None = None,
                  gt_range: Sequence[float] | None = None) -> plt.Figure:
    """The ego's camera `camera` with ground truth and predictions projected into it (edges in front of
    the camera only), coloured by match."""
    cams = view.sample.ego.cameras
    if not 0 <= camera < len(cams):
        raise ConfigError(f"camera {camera}: the ego of {view.sample.scenario}/{view.sample.frame} has {len(cams)} cameras")
    cam = cams[camera]
    image = cam.image
    if image is None:
        try:
            image = np.asarray(Image.open(cam.image_path).convert("RGB"))
        except OSError as exc:
            raise DataFormatError(cam.image_path, f"camera image cannot be read ({exc})") from None
    h, w = image.shape[:2]
    scale = max(2.0, 640 / w)  # small simulator images are enlarged
    fig, ax = plt.subplots(figsize=(w / 100 * scale, h / 100 * scale), dpi=100)
    ax.imshow(image)
    for boxes, colour, style in _coloured_boxes(view, iou, eval_range, gt_range):
        for corners in boxes_to_corners(boxes):
            uv, depth = cam.project(corners)
            for a, b in BOX_EDGES:
                if depth[a] > 0.5 and depth[b] > 0.5:
                    ax.plot(uv[[a, b], 0], uv[[a, b], 1], color=colour, linestyle=style, linewidth=1.5)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(f"{view.sample.scenario} frame {view.sample.frame}, {cam.name}", fontsize=9)
    return fig

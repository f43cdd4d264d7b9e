"""Pictures checked by their pixels: box colours by match, agent colours, the sent-cell overlay; the
CLI's frame / animation / plots / HTML report on a tiny simulated scene."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image
from typer.testing import CliRunner

from coperception.cli import app
from coperception.datasets.types import AgentObservation, Camera, CooperativeSample
from coperception.errors import ConfigError
from coperception.geometry import boxes_to_corners
from coperception.evaluate import FramePrediction, load_predictions, save_predictions
from coperception.grid import BEVGrid
from coperception.models.postprocess import Detections
from coperception.pipeline.session import HeldMessage
from coperception.viz.bev import MATCH_COLOURS, FrameView, agent_colour, render_frame
from coperception.viz.curves import ap_vs_bytes_figure
from coperception.viz.frames import frame_pixels
from coperception.viz.views import camera_figure, render_3d

RANGE = [-40.0, -20.0, -3.0, 40.0, 20.0, 1.0]
GRID = BEVGrid.from_range(RANGE, 0.8)


def pose(x: float, y: float) -> np.ndarray:
    T = np.eye(4)
    T[:2, 3] = x, y
    return T


def cluster(x: float, y: float, n: int = 400, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(int(abs(x * 10 + y)))
    return np.column_stack([rng.uniform(x - spread, x + spread, n), rng.uniform(y - spread, y + spread, n),
                            np.full(n, 0.5), np.ones(n)]).astype(np.float32)


def ground(n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.column_stack([rng.uniform(-2, 2, n), rng.uniform(-2, 2, n), np.full(n, -1.7), np.ones(n)]).astype(np.float32)


def scene() -> CooperativeSample:
    """An ego at the origin, a sender at (20, -10) whose points form a blob at (25, -15) of the ego
    frame, two GT cars: one detected at (10, 0), one missed at (-10, 5); one false positive at (0, 12)."""
    ego = AgentObservation("1", "vehicle", 0.0, pose(0, 0), np.vstack([ground(), cluster(-30, -15)]))
    sender = AgentObservation("2", "vehicle", 0.0, pose(20, -10), np.vstack([ground(), cluster(5, -5)]))
    gt = np.array([[10, 0, -1, 4, 2, 1.5, 0], [-10, 5, -1, 4, 2, 1.5, 0]], dtype=np.float64)
    return CooperativeSample("opv2v", "scn", "000001", [ego, sender], gt, np.array([1, 2]), ["car", "car"])


PREDICTED = np.array([[10.05, 0, -1, 4, 2, 1.5, 0], [0, 12, -1, 4, 2, 1.5, 0]])
SCORES = np.array([0.9, 0.6])


def colour_at(fig, ax, x: float, y: float, radius: int = 2) -> np.ndarray:
    """The pixels (k, 3) in a small square around data point (x, y)."""
    pixels = frame_pixels(fig)
    px, py = ax.transData.transform((x, y))
    row, col = int(round(pixels.shape[0] - py)), int(round(px))
    return pixels[row - radius:row + radius + 1, col - radius:col + radius + 1].reshape(-1, 3).astype(float)


def has_colour(pixels: np.ndarray, colour: str, tol: float = 45.0) -> bool:
    target = np.array(to_rgb(colour)) * 255
    return bool((np.linalg.norm(pixels - target, axis=1) < tol).any())


def test_ground_truth_edges_are_drawn_in_their_match_colour():
    fig = render_frame(FrameView(scene(), PREDICTED, SCORES), RANGE, eval_range=RANGE)
    ax = fig.axes[0]
    detected_rear = colour_at(fig, ax, 8.0, 0.5)  # rear edge of the detected car
    missed_rear = colour_at(fig, ax, -12.0, 5.5)  # rear edge of the missed car
    false_rear = colour_at(fig, ax, -2.0, 12.5, radius=4)  # rear edge of the false positive (dashed)
    assert has_colour(detected_rear, MATCH_COLOURS["tp"]) and not has_colour(detected_rear, MATCH_COLOURS["missed"])
    assert has_colour(missed_rear, MATCH_COLOURS["missed"]) and not has_colour(missed_rear, MATCH_COLOURS["tp"])
    assert has_colour(false_rear, MATCH_COLOURS["fp"])
    empty = colour_at(fig, ax, -22.5, 12.5)  # nothing there but the light grey grid
    assert (empty.max(axis=1) - empty.min(axis=1) < 10).all() and (empty > 200).all()
    plt.close(fig)


def test_each_agents_points_appear_in_its_colour():
    fig = render_frame(FrameView(scene()), RANGE, eval_range=RANGE)
    ax = fig.axes[0]
    for k, (x, y) in enumerate([(-30, -15), (25, -15)]):  # the ego's blob, the sender's blob in the ego frame
        pixels = colour_at(fig, ax, x, y, radius=1)
        dist = {j: _off_blend(pixels, agent_colour(j)) for j in range(2)}
        assert dist[k] < 12 and dist[k] < dist[1 - k] / 3, dist
    plt.close(fig)


def _off_blend(pixels: np.ndarray, colour: str) -> float:
    """How far the most coloured of `pixels` lies from every blend of `colour` over white (points are
    translucent, so overlapping ones are anywhere between the two)."""
    white, c = np.full(3, 255.0), np.array(to_rgb(colour)) * 255
    p = pixels[np.argmax(np.linalg.norm(pixels - white, axis=1))]
    a = np.clip((p - white) @ (c - white) / ((c - white) @ (c - white)), 0, 1)
    return float(np.linalg.norm(p - (white + a * (c - white))))


def _axes_pixels(fig) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    pixels = frame_pixels(fig)
    x0, y0, x1, y1 = fig.axes[0].get_window_extent().extents
    h = pixels.shape[0]
    return pixels, (int(h - y1) + 2, int(h - y0) - 2, int(x0) + 2, int(x1) - 2)


def test_sent_cell_overlay_covers_only_the_sent_cells():
    sample = scene()
    cells = np.array([GRID.width * 30 + 70, GRID.width * 31 + 70, GRID.width * 31 + 71])  # near (16, 4.4) in the ego frame
    T = pose(0, 0)
    message = HeldMessage(2, cells, T, 321, 0.1)
    plain = render_frame(FrameView(sample, grid=GRID), RANGE, eval_range=RANGE)
    overlaid = render_frame(FrameView(sample, messages=[message], grid=GRID), RANGE, eval_range=RANGE)
    (a, box), (b, _) = _axes_pixels(plain), _axes_pixels(overlaid)
    r0, r1, c0, c1 = box
    diff = np.abs(a.astype(int) - b.astype(int)).sum(axis=2)[r0:r1, c0:c1] > 0
    assert diff.any()
    ax = overlaid.axes[0]
    rows, cols = np.nonzero(diff)
    xy = ax.transData.inverted().transform(np.column_stack([cols + c0, a.shape[0] - (rows + r0)]))
    inside = np.zeros(len(xy), dtype=bool)
    for cell in cells:
        r, c = divmod(int(cell), GRID.width)
        x_lo, y_lo = GRID.x_min + c * GRID.cell, GRID.y_min + r * GRID.cell
        margin = 0.3  # antialiasing: under half a pixel's worth of metres at this zoom
        inside |= (xy[:, 0] > x_lo - margin) & (xy[:, 0] < x_lo + GRID.cell + margin) & \
                  (xy[:, 1] > y_lo - margin) & (xy[:, 1] < y_lo + GRID.cell + margin)
    assert inside.all()
    plt.close(plain)
    plt.close(overlaid)


def test_a_frame_without_detections_or_messages_still_renders(tmp_path):
    empty = CooperativeSample("opv2v", "scn", "000002", [AgentObservation("1", "vehicle", 0.0, pose(0, 0),
                                                                          np.zeros((0, 4), np.float32))],
                              np.zeros((0, 7)), np.zeros(0, np.int64), [])
    for sample in (empty, scene()):
        fig = render_frame(FrameView(sample), None)
        assert frame_pixels(fig).shape[2] == 3
        plt.close(fig)


def test_3d_view_falls_back_to_matplotlib_and_names_what_is_missing(tmp_path):
    view = FrameView(scene(), PREDICTED, SCORES)
    drawn = render_3d(view, tmp_path / "auto.png", eval_range=RANGE)
    assert drawn.startswith(("matplotlib", "open3d"))
    assert Image.open(tmp_path / "auto.png").size[0] > 300
    assert render_3d(view, tmp_path / "mpl.png", engine="matplotlib") == "matplotlib"
    if drawn.startswith("matplotlib ("):  # open3d missing or unable to render offscreen here: said, not crashed
        with pytest.raises(ConfigError, match="open3d"):
            render_3d(view, tmp_path / "o3d.png", engine="open3d")


def test_camera_picture_draws_boxes_where_the_calibration_projects_them(tmp_path):
    # a forward camera 1.5 m above the LiDAR origin: optical z = LiDAR x, optical x = -LiDAR y, optical y = -LiDAR z
    T = np.eye(4)
    T[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]
    T[2, 3] = 1.5
    K = np.array([[200.0, 0, 160], [0, 200.0, 120], [0, 0, 1]])
    Image.new("RGB", (320, 240), "white").save(tmp_path / "cam.png")
    sample = scene()
    sample.agents[0].cameras = [Camera("camera0", K, T, str(tmp_path / "cam.png"))]
    fig = camera_figure(FrameView(sample, PREDICTED, SCORES), 0, eval_range=RANGE)
    ax = fig.axes[0]
    corners = boxes_to_corners(sample.gt_boxes[:1])[0]  # the detected car, 10 m ahead
    uv, depth = sample.agents[0].cameras[0].project(corners)
    assert (depth > 0).all()
    mid = (uv[2] + uv[3]) / 2  # the middle of a bottom edge: drawn in the detected colour
    assert has_colour(colour_at(fig, ax, *mid), MATCH_COLOURS["tp"])
    assert (colour_at(fig, ax, 20.0, 20.0) > 240).all()  # a corner of the white image: nothing drawn
    plt.close(fig)
    with pytest.raises(ConfigError, match="cameras"):
        camera_figure(FrameView(sample), 3)


def test_predictions_file_round_trips(tmp_path):
    held = [HeldMessage(2, np.array([3, 9]), pose(1, 2), 321, 0.1)]
    entry = {"params": {"method": "codebook-max"},
             "_detections": [FramePrediction("scn/000001", Detections(PREDICTED, SCORES, np.zeros(2, np.int64)), held)]}
    save_predictions(tmp_path / "p.json", entry, GRID)
    method, grid, frames = load_predictions(tmp_path / "p.json")
    f = frames["scn/000001"]
    assert method == "codebook-max" and grid == GRID
    assert np.allclose(f.detections.boxes, PREDICTED) and np.allclose(f.detections.scores, SCORES)
    assert f.held[0].cells.tolist() == [3, 9] and f.held[0].bytes == 321 and np.allclose(f.held[0].T_ego_from_frame, pose(1, 2))


def test_ap_vs_bytes_axis_starts_at_the_smallest_real_value():
    rep = {"dataset": "d", "split": "test", "methods": {
        "none": {"ap": {"0.5": 0.5}, "bytes_per_frame": 0.0}, "late": {"ap": {"0.5": 0.6}, "bytes_per_frame": 1200.0}},
        "points": [{"params": {"curve": "codebook 8x2x256"}, "bytes_per_frame": 900.0, "ap": {"0.5": 0.7}},
                   {"params": {"curve": "codebook 8x2x256 + filling"}, "bytes_per_frame": 800.0, "ap": {"0.5": 0.69}}]}
    fig = ap_vs_bytes_figure(rep)
    ax = fig.axes[0]
    assert 800 / 2 < ax.get_xlim()[0] < 800  # not down at the ego-only model's 0 (or 1) byte
    assert ax.get_ylim()[0] >= 0 or all(line.get_ydata()[0] >= 0 for line in ax.lines)
    colours = {line.get_color() for line in ax.lines if line.get_label().startswith("codebook")}
    assert len(colours) == 1  # one colour per message type, the filling curve dashed
    plt.close(fig)


def test_cli_frame_animation_plots_and_report(opv2v_set, tmp_path):
    sets = ["--set", f"dataset.root={opv2v_set.root}", "--set", "dataset.eval_split=test"]
    runner = CliRunner()
    frame = runner.invoke(app, ["viz", "frame", "--out", str(tmp_path / "frame.png"), "--index", "1", *sets])
    assert frame.exit_code == 0, frame.output
    assert Image.open(tmp_path / "frame.png").size[0] > 500
    gif = runner.invoke(app, ["viz", "animate", "--out", str(tmp_path / "anim.gif"), "--count", "3", "--full", *sets])
    assert gif.exit_code == 0, gif.output
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    bad = runner.invoke(app, ["viz", "frame", "--out", str(tmp_path / "x.png"), "--index", "999", *sets])
    assert bad.exit_code == 2 and "frames" in bad.output
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tmp_path / "frame.png", run / "bev.png")
    (run / "report.json").write_text(json.dumps({
        "protocol": "global sort", "dataset": "synthetic", "split": "test", "frames": 2,
        "methods": {"none": {"ap": {"0.3": 0.6, "0.5": 0.5, "0.7": 0.1}, "ap_opencood": {"0.5": 0.3}, "bytes_per_frame": 0},
                    "max": {"ap": {"0.3": 0.7, "0.5": 0.6, "0.7": 0.2}, "ap_opencood": {"0.5": 0.4},
                            "bytes_per_frame": 8448195.0}}}))
    assert runner.invoke(app, ["viz", "plots", "--bench", str(run)]).exit_code == 2  # no bench JSON there
    done = runner.invoke(app, ["report", str(run)])
    assert done.exit_code == 0, done.output
    page = (run / "report.html").read_text()
    assert "src=\"http" not in page and "<script" not in page  # self-contained
    parser = _Images()
    parser.feed(page)
    assert len(parser.images) == 1
    for src in parser.images:
        data = base64.b64decode(src.split(",", 1)[1])
        assert data.startswith(b"\x89PNG")
    assert re.search(r"<td>max</td><td>0\.700</td><td>0\.600</td>", page)
    assert _renders_in_chromium(run / "report.html", tmp_path)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def _renders_in_chromium(page, tmp_path) -> bool:
    """Open the page in headless Chromium: every image must decode and the tables must lay out."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs the Debian package)")
    probe = tmp_path / "probe.html"
    check = ("<script>window.addEventListener('load', () => { const ok = [...document.images].every("
             "i => i.complete && i.naturalWidth > 0) && document.querySelectorAll('table tr').length > 2; "
             "document.body.setAttribute('data-rendered', ok ? 'yes' : 'no'); });</script>")
    probe.write_text(page.read_text().replace("</body>", check + "</body>"))
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return 'data-rendered="yes"' in out.stdout

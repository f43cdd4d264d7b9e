"""Frames to look at: a split's samples with the predictions and messages of a saved evaluation or
of a checkpoint evaluated on the spot, rendered one by one or as an animated GIF."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from coperception.config import ExperimentConfig  # noqa: E402
from coperception.datasets.readers import build_dataset  # noqa: E402
from coperception.errors import ConfigError, DataFormatError  # noqa: E402
from coperception.evaluate import evaluate_method, load_predictions  # noqa: E402
from coperception.io import atomic_write_bytes  # noqa: E402
from coperception.viz.bev import FrameView, render_frame  # noqa: E402


def load_views(cfg: ExperimentConfig, split: str, indices: Sequence[int], predictions: str | Path | None = None,
               checkpoint: str | Path | None = None, progress: bool = True) -> list[FrameView]:
    """The frames `indices` of `split` with the predictions of a `--save-predictions` file, or of
    `checkpoint` evaluated (as `cfg` describes) from the split's first frame up to the last index, so
    the channel's state is what it would be; with neither, ground truth only."""
    data = build_dataset(cfg.dataset, split)
    if not indices or min(indices) < 0 or max(indices) >= len(data):
        raise ConfigError(f"frame indices {list(indices)[:3]}...: the {split} split has {len(data)} frames (0..{len(data) - 1})")
    method, grid, frames = "", None, {}
    if predictions is not None:
        method, grid, frames = load_predictions(predictions)
    elif checkpoint is not None:
        from coperception.pipeline.model import load_model

        model = load_model(checkpoint, cfg)
        entry = evaluate_method(model, cfg, split, progress=progress, limit=max(indices) + 1, keep_detections=True)
        frames = {f.frame_key: f for f in entry["_detections"]}
        grid, method = model.feature_grid, entry["params"]["method"]
    views = []
    for i in indices:
        sample = data[i]
        key = f"{sample.scenario}/{sample.frame}"
        if predictions is not None and key not in frames:
            raise DataFormatError(predictions, f"has no frame {key} (index {i} of {split}); was it evaluated on {split}?")
        f = frames.get(key)
        if f is None:
            views.append(FrameView(sample, method=method))
        else:
            views.append(FrameView(sample, f.detections.boxes, f.detections.scores, f.held, grid, method))
    return views


def animate(views: Sequence[FrameView], path: str | Path, view_range: Sequence[float] | None, fps: float = 5.0,
            progress: bool = True, **render) -> None:
    """An animated GIF of `views` (rendered like `render_frame`, padded to one size), written atomically."""
    if not str(path).lower().endswith(".gif"):
        raise ConfigError(f"{path}: animations are written as GIF (.gif)")
    images = []
    for view in tqdm(views, desc="render frames", disable=not progress, unit="frame"):
        fig = render_frame(view, view_range, **render)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        plt.close(fig)
        images.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    width, height = max(im.width for im in images), max(im.height for im in images)
    canvas = [Image.new("RGB", (width, height), "white") for _ in images]
    for c, im in zip(canvas, images):
        c.paste(im, (0, 0))
    frames = [c.quantize(colors=255, method=Image.Quantize.MEDIANCUT) for c in canvas]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    atomic_write_bytes(path, out.getvalue())


def frame_pixels(fig) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a rendered figure as drawn (no tight crop), for checks."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()

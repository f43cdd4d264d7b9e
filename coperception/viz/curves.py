"""Benchmark plots: AP@0.5 against measured bytes, and AP@0.5 under channel impairments."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from coperception.io import atomic_write_bytes  # noqa: E402

# baselines: one marker and colour each, none shared with the message curves
BASELINES = {"late": ("s", "#4d4d4d", "late fusion (boxes)"), "early": ("^", "#8c510a", "early fusion (points)"),
             "max": ("D", "#01665e", "dense fp32 BEV map (max)")}
CURVE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#e377c2", "#17becf", "#bcbd22"]
SWEEP_TITLES = {"loss": ("Packet loss (Gilbert-Elliott bursts)", "stationary packet loss"),
                "delay_ms": ("Message delay", "one-way latency"),
                "delay_ms_max_age_150": ("Delay, messages older than 150 ms ignored", "one-way latency"),
                "pose_noise": ("Pose noise of the senders", "sigma of x/y and yaw")}


def _save(fig: plt.Figure, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg" if str(path).lower().endswith(".svg") else "png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_ap_vs_bytes(rep: dict[str, Any], path: str | Path) -> None:
    """`ap_vs_bytes_figure` written to `path` (PNG or SVG)."""
    _save(ap_vs_bytes_figure(rep), path)


def ap_vs_bytes_figure(rep: dict[str, Any]) -> plt.Figure:
    """AP@0.5 against measured bytes per frame (every sender's delivered packets plus the ego's broadcast:
    pose and filling request), log x from the smallest real value. One colour per message type (fp32
    cells, each codebook), dashed with information filling; baselines as single markers; the
    ego-only model, which sends nothing, as a horizontal line."""
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    curves: dict[str, list[tuple[float, float]]] = {}
    for point in rep.get("points", []):
        curves.setdefault(point["params"]["curve"], []).append((point["bytes_per_frame"], point["ap"]["0.5"]))
    families = list(dict.fromkeys(name.removesuffix(" + filling") for name in curves))
    xs = [x for xy in curves.values() for x, _ in xy if x > 0]
    for name, xy in curves.items():
        family = name.removesuffix(" + filling")
        colour = CURVE_COLOURS[families.index(family) % len(CURVE_COLOURS)]
        xy = sorted((x, y) for x, y in xy if x > 0)
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", markersize=4, color=colour,
                linestyle="--" if name.endswith("+ filling") else "-",
                label=name.replace("where2comm", "fp32 cells (Where2comm-style)"))
    for name, entry in rep["methods"].items():
        if name == "none":
            ax.axhline(entry["ap"]["0.5"], color="#7f7f7f", linestyle=":", label="ego only (nothing sent)")
        elif name in BASELINES and entry["bytes_per_frame"] > 0:
            marker, colour, label = BASELINES[name]
            ax.scatter([entry["bytes_per_frame"]], [entry["ap"]["0.5"]], marker=marker, color=colour, s=70, zorder=3,
                       label=label)
            xs.append(entry["bytes_per_frame"])
    ax.set_xscale("log")
    if xs:
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    ax.set_xlabel("measured bytes per frame: all senders' packets + the ego's broadcast (log scale)")
    ax.set_ylabel("AP@0.5 (BEV IoU, global sort)")
    ax.set_title(f"Detection vs communication volume ({rep['dataset']}, {rep['split']} split)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_robustness(rep: dict[str, Any], path: str | Path) -> None:
    """AP@0.5 per channel impairment, one panel per sweep, the ego-only model as a reference line."""
    sweeps = rep["sweeps"]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.6 * len(sweeps), 4), dpi=110, squeeze=False)
    ego = rep["methods"].get("none", {}).get("ap", {}).get("0.5")
    for ax, (name, entries) in zip(axes[0], sweeps.items()):
        labels = [e["params"]["setting"] for e in entries]
        title, xlabel = SWEEP_TITLES.get(name, (name.replace("_", " "), "setting"))
        ax.plot(range(len(entries)), [e["ap"]["0.5"] for e in entries], marker="o", color=CURVE_COLOURS[0],
                label="codebook messages")
        if ego is not None:
            ax.axhline(ego, color="#7f7f7f", linestyle=":", label="ego only (nothing sent)")
        ax.set_xticks(range(len(entries)), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("AP@0.5 (global sort)")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    _save(fig, path)


def plot_fusion(rep: dict[str, Any], path: str | Path) -> None:
    """AP@0.5 of every fusion row (`bench fusion`) under each condition, the ego-only model as a reference;
    a row of several training seeds is drawn at their mean with a bar from the lowest seed to the highest.
    A method and its motion-compensated row share a colour (solid: with motion)."""
    conditions = rep["conditions"]
    rows = rep["rows"]
    methods = list(dict.fromkeys(label.removesuffix(" + motion") for label in rows))
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(conditions)), 4.4), dpi=110)
    for label, row in rows.items():
        x = np.arange(len(conditions))
        values = np.array([row["conditions"][c]["ap"]["0.5"] for c in conditions])
        colour = CURVE_COLOURS[methods.index(label.removesuffix(" + motion")) % len(CURVE_COLOURS)]
        style = "-" if label.endswith(" + motion") else "--"
        per_seed = row.get("per_seed", {})
        if len(per_seed) > 1:
            seeds = np.array([[s[c]["ap"]["0.5"] for c in conditions] for s in per_seed.values()])
            ax.errorbar(x, values, yerr=[values - seeds.min(axis=0), seeds.max(axis=0) - values], marker="o",
                        color=colour, linestyle=style, capsize=2, label=f"{label} ({len(per_seed)} seeds)")
        else:
            ax.plot(x, values, marker="o", color=colour, linestyle=style, label=label)
    value = rep["methods"].get("none", {}).get("ap", {}).get("0.5")
    if value is not None:
        ax.axhline(value, color="#7f7f7f", linestyle=":", label="ego only (nothing sent)")
    ax.set_xticks(range(len(conditions)), conditions, fontsize=8, rotation=20)
    ax.set_ylabel("AP@0.5 (global sort)")
    ax.set_title("Fusion under channel impairments (codebook messages; box messages for late and anchor-centric)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    _save(fig, path)

"""Benchmark plots: AP@0.5 against measured bytes, and AP@0.5 under channel impairments."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coperception.io import atomic_write_bytes  # noqa: E402

BASELINE_MARKERS = {"none": "o", "late": "s", "early": "^", "max": "D", "where2comm": "v"}


def _save(fig: plt.Figure, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_ap_vs_bytes(rep: dict[str, Any], path: str | Path) -> None:
    """Curves of `points` grouped by `params.curve`, baselines from `methods` as single markers; x is the
    measured bytes per frame (every sender's delivered packets plus the ego's broadcast: pose and filling request)."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    curves: dict[str, list[tuple[float, float]]] = {}
    for point in rep.get("points", []):
        curves.setdefault(point["params"]["curve"], []).append((point["bytes_per_frame"], point["ap"]["0.5"]))
    for name, xy in curves.items():
        xy = sorted((max(x, 1.0), y) for x, y in xy)
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker=".", label=name)
    for name, entry in rep["methods"].items():
        x = max(entry["bytes_per_frame"], 1.0)
        ax.scatter([x], [entry["ap"]["0.5"]], marker=BASELINE_MARKERS.get(name, "x"), s=60, zorder=3,
                   label=f"{name} (ego only: nothing sent)" if name == "none" else name)
    ax.set_xscale("log")
    ax.set_xlabel("measured bytes per frame, all senders + the ego's broadcast (log scale)")
    ax.set_ylabel("AP@0.5 (global sort)")
    ax.set_title(f"AP vs communication volume, {rep['dataset']} {rep['split']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_robustness(rep: dict[str, Any], path: str | Path) -> None:
    sweeps = rep["sweeps"]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), dpi=110)
    ego = rep["methods"].get("none", {}).get("ap", {}).get("0.5")
    for ax, (name, entries) in zip(axes, sweeps.items()):
        labels = [e["params"]["setting"] for e in entries]
        ax.plot(range(len(entries)), [e["ap"]["0.5"] for e in entries], marker="o", label="codebook messages")
        if ego is not None:
            ax.axhline(ego, color="grey", linestyle="--", label="ego only")
        ax.set_xticks(range(len(entries)), labels, fontsize=8)
        ax.set_title(name)
        ax.set_ylabel("AP@0.5 (global sort)")
        ax.set_ylim(0, 1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)

"""One self-contained HTML page for a run folder: what `demo`, `eval` and the benches wrote there
(tables of AP and measured bytes, the plots, the BEV pictures), pictures embedded as data URIs so the
page opens offline and travels as one file."""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any

from coperception.errors import DataFormatError
from coperception.io import atomic_write_bytes, read_json

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; } th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _methods_table(rep: dict[str, Any]) -> str:
    rows = []
    for name, m in rep.get("methods", {}).items():
        if "ap" not in m:
            continue
        rows.append([name, m["ap"].get("0.3", ""), m["ap"].get("0.5", ""), m["ap"].get("0.7", ""),
                     m.get("ap_opencood", {}).get("0.5", ""), round(m.get("bytes_per_frame", 0.0))])
    return _table(["method", "AP@0.3", "AP@0.5", "AP@0.7", "OpenCOOD AP@0.5", "bytes / frame"], rows)


def _plot(plotter, rep: dict[str, Any]) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "plot.png"
        plotter(rep, target)
        return target.read_bytes()


def build_report(run_dir: str | Path) -> str:
    """The HTML of `run_dir`'s report: every known JSON report there and every PNG picture."""
    from coperception.viz.curves import plot_ap_vs_bytes, plot_robustness

    run = Path(run_dir)
    if not run.is_dir():
        raise DataFormatError(run, "no such run folder")
    parts = [f"<h1>coperception run: {html.escape(run.name)}</h1>"]
    found = False
    protocol = None
    for name, title in (("report.json", "Detection and communication"), ("comm.json", "AP vs measured bytes"),
                        ("robustness.json", "Robustness to the channel"), ("attack.json", "A sender that lies")):
        path = run / name
        if not path.is_file():
            continue
        rep = read_json(path)
        found = True
        protocol = protocol or rep.get("protocol")
        parts.append(f"<h2>{title} <span class='note'>({html.escape(name)})</span></h2>")
        parts.append(f"<p class='note'>{html.escape(str(rep.get('dataset', '')))}, split "
                     f"{html.escape(str(rep.get('split', '')))}, {rep.get('frames', '?')} frames</p>")
        if name == "attack.json":
            rows = [[model] + [row[k]["ap"]["0.5"] for k in ("honest_unchecked", "honest_checked", "attacked_unchecked",
                                                              "attacked_checked")]
                    for model, row in rep.get("methods", {}).items()]
            parts.append(_table(["model", "honest", "honest, checked", "attacked", "attacked, checked"], rows))
            continue
        parts.append(_methods_table(rep))
        if name == "comm.json" and rep.get("points"):
            rows = [[p["params"]["curve"], p["params"]["selection"]["threshold"], p["ap"]["0.5"],
                     round(p["bytes_per_agent_frame"]), round(p["bytes_per_frame"])] for p in rep["points"]]
            parts.append(_table(["messages", "threshold", "AP@0.5", "bytes / agent / frame", "bytes / frame"], rows))
            parts.append(_img(_plot(plot_ap_vs_bytes, rep), "AP vs bytes"))
        if name == "robustness.json" and rep.get("sweeps"):
            for sweep, entries in rep["sweeps"].items():
                parts.append(_table([sweep, "AP@0.5", "bytes / frame"], [[e["params"]["setting"], e["ap"]["0.5"],
                                                                        round(e["bytes_per_frame"])] for e in entries]))
            parts.append(_img(_plot(plot_robustness, rep), "robustness"))
        if name == "report.json" and isinstance(rep.get("training"), dict):
            rows = [[m, s.get("steps", ""), s.get("best_val_ap50", ""), float(s.get("seconds", 0.0)) / 60,
                     s.get("device", "")] for m, s in rep["training"].items() if isinstance(s, dict)]
            parts.append(_table(["trained model", "steps", "best validation AP@0.5", "minutes", "device"], rows))
    pictures = sorted(run.glob("*.png")) + sorted(run.glob("*.gif"))
    if pictures:
        parts.append("<h2>Pictures</h2>")
        for pic in pictures:
            mime = "image/gif" if pic.suffix == ".gif" else "image/png"
            parts.append(f"<p class='note'>{html.escape(pic.name)}</p>" + _img(pic.read_bytes(), pic.name, mime))
            found = True
    if not found:
        raise DataFormatError(run, "no report.json, comm.json, robustness.json, attack.json or picture to report")
    if protocol:
        parts.append(f"<p class='note'>Protocol: {html.escape(protocol)}</p>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>coperception: "
            f"{html.escape(run.name)}</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `build_report(run_dir)` to `out` (default `run_dir/report.html`), atomically."""
    target = Path(out) if out is not None else Path(run_dir) / "report.html"
    atomic_write_bytes(target, build_report(run_dir).encode())
    return target

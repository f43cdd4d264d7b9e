#!/usr/bin/env python
"""Rotated BEV IoU: the vectorized implementation against shapely on random box pairs.

Usage: python tools/bench_iou.py [--pairs 1000] [--repeat 5]
Writes outputs/bench/iou.json (max abs difference, ms per call for both) and prints it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import shapely

from coperception.geometry import bev_corners, rotated_iou_bev, rotated_iou_bev_aligned
from coperception.io import write_json


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.column_stack([rng.uniform(-3, 3, (n, 2)), np.zeros(n), rng.uniform(0.5, 6, (n, 3)),
                            rng.uniform(-np.pi, np.pi, n)])


def shapely_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty(len(a))
    for i, (qa, qb) in enumerate(zip(bev_corners(a), bev_corners(b))):
        pa, pb = shapely.Polygon(qa), shapely.Polygon(qb)
        inter = pa.intersection(pb).area
        out[i] = inter / (pa.area + pb.area - inter)
    return out


def best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="outputs/bench/iou.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, args.pairs), random_boxes(rng, args.pairs)
    ref = shapely_iou(a, b)
    ours = rotated_iou_bev_aligned(a, b)
    n = min(args.pairs, 300)
    report = {
        "pairs": args.pairs,
        "max_abs_difference": float(np.abs(ours - ref).max()),
        "ms_vectorized_aligned": best_ms(lambda: rotated_iou_bev_aligned(a, b), args.repeat),
        "ms_shapely_loop": best_ms(lambda: shapely_iou(a, b), args.repeat),
        f"ms_vectorized_{n}x{n}_matrix": best_ms(lambda: rotated_iou_bev(a[:n], b[:n]), args.repeat),
    }
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Cooperative samples per second: load (PCD + YAML + GT) and voxelize every agent.

Usage: python tools/bench_loader.py [--root data/sim_opv2v] [--split test] [--agents 3] [--workers 2]
Writes outputs/bench/loader.json and prints it. Simulate the data first with
`coperception simulate --out data/sim_opv2v` (or `make demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch.utils.data import DataLoader, Dataset

from coperception.config import load_config
from coperception.datasets.readers import build_dataset
from coperception.datasets.voxelize import voxelize
from coperception.io import write_json


class VoxelizedSamples(Dataset):
    """Each item: a cooperative sample with every agent's points voxelized (what training consumes)."""

    def __init__(self, root: str, split: str, agents: int):
        self.cfg = load_config(None, [f"dataset.root={root}", f"dataset.max_agents={agents}"])
        self.inner = build_dataset(self.cfg.dataset, split)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[int, int]:
        sample = self.inner[index]
        m = self.cfg.model
        pillars = [voxelize(a.points, self.cfg.dataset.point_cloud_range, m.voxel_size, m.max_points_per_voxel, m.max_voxels)
                   for a in sample.agents]
        return len(sample.agents), sum(len(p.coords) for p in pillars)


def run(ds: VoxelizedSamples, n: int, workers: int) -> dict:
    idx = list(range(min(n, len(ds))))
    subset = torch.utils.data.Subset(ds, idx)
    loader = DataLoader(subset, batch_size=None, num_workers=workers, shuffle=False,
                        persistent_workers=False)
    start = time.perf_counter()
    agents = pillars = 0
    for a, p in loader:
        agents += int(a)
        pillars += int(p)
    elapsed = time.perf_counter() - start
    return {"workers": workers, "samples": len(idx), "seconds": elapsed, "samples_per_s": len(idx) / elapsed,
            "mean_agents": agents / len(idx), "mean_pillars_per_agent": pillars / max(agents, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/sim_opv2v")
    parser.add_argument("--split", default="test")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench/loader.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ds = VoxelizedSamples(args.root, args.split, args.agents)
    ds[0]  # warm the file cache so both runs read from memory
    results = [run(ds, args.samples, 0)]
    if args.workers > 0:
        results.append(run(ds, args.samples, args.workers))
    report = {"benchmark": "loader", "what": "OPV2V-layout cooperative sample: read PCD+YAML, GT merge, voxelize each agent",
              "root": args.root, "split": args.split, "max_agents": args.agents, "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "runs": results}
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

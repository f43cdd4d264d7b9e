#!/usr/bin/env python
"""Data pipeline speed: reading cooperative samples and preparing training batches from them.

Usage: python tools/bench_loader.py [--root data/sim_opv2v] [--split train] [--batches 20] [--workers 2]
Writes outputs/bench/loader.json and prints it. Simulate the data first with
`coperception simulate --out data/sim_opv2v` (or `make demo`).

Two presets on the same data: `synthetic` (the demo model, 0.8 m pillars) and `opv2v` (the published
OPV2V PointPillars grid, 0.4 m pillars, 704 x 200 cells, two anchors per cell). Per batch of
`train.batch_size` samples, measured in one process:
- read: the reader's samples (PCD + YAML, GT merge);
- prepare: what training adds on samples already in memory: scene augmentation, voxelization of every
  agent, anchor targets, collation (the work that would leave a GPU waiting);
and the whole pipeline through a DataLoader with `--workers` processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from coperception.config import load_config
from coperception.datasets.collate import collate
from coperception.datasets.prepared import PreparedDataset
from coperception.datasets.readers import build_dataset
from coperception.io import write_json
from coperception.pipeline.model import build_model

PRESETS = {
    "synthetic": [],
    "opv2v": ["model.voxel_size=[0.4,0.4,4.0]", "model.pfn_channels=64", "model.filters=[64,128,256]",
              "model.upsample_filters=[128,128,128]", "model.layers=[3,5,8]"],
}


def _targets_fn(model):
    return getattr(model, "assigner", None) or model.targets  # the function training hands the data pipeline


def measure(root: str, split: str, preset: str, batches: int, workers: int) -> dict:
    cfg = load_config("configs/synthetic.yaml", [f"dataset.root={root}", "cooperation.strategy=intermediate",
                                                 *PRESETS[preset]])
    bs = cfg.train.batch_size
    torch.manual_seed(0)
    model = build_model(cfg)
    reader = build_dataset(cfg.dataset, split)
    n = min(batches * bs, len(reader))
    reader[0]  # warm the file cache
    start = time.perf_counter()
    samples = [reader[i] for i in range(n)]
    read_s = time.perf_counter() - start

    class InMemory:
        def __len__(self):
            return n

        def __getitem__(self, i):
            return samples[i]

    data = PreparedDataset(InMemory(), cfg.dataset, cfg.model, "all", _targets_fn(model), True, 0)
    start = time.perf_counter()
    pillars = 0
    for b in range(0, n, bs):
        batch, _, _ = collate([data[i] for i in range(b, min(b + bs, n))])
        pillars += len(batch.lidar.coords)
    prepare_s = time.perf_counter() - start
    streamed = PreparedDataset(reader, cfg.dataset, cfg.model, "all", _targets_fn(model), True, 0)
    loader = DataLoader(torch.utils.data.Subset(streamed, list(range(n))), batch_size=bs, collate_fn=collate,
                        num_workers=workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    loader_s = time.perf_counter() - start
    n_batches = int(np.ceil(n / bs))
    return {"preset": preset, "batch_size": bs, "batches": n_batches, "anchors": int(model.anchors.shape[0]),
            "mean_pillars_per_batch": pillars / n_batches,
            "read_s_per_batch": read_s / n_batches, "prepare_s_per_batch": prepare_s / n_batches,
            "loader_workers": workers, "loader_s_per_batch": loader_s / n_batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/sim_opv2v")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench/loader.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [measure(args.root, args.split, preset, args.batches, args.workers) for preset in PRESETS]
    report = {"benchmark": "loader", "what": __doc__.split("\n\n")[2].strip(), "root": args.root, "split": args.split,
              "cpu_count": os.cpu_count(), "machine": platform.machine(), "runs": runs}
    write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

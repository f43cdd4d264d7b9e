"""SECOND vs PointPillars on the synthetic world: each trained ego-only with one recipe (the config's
train section: 2 epochs from scratch by default), then AP (global sort) and ms per frame on the test
split -> outputs/bench/second.json. Runs that already have a last.pt are reused.

    python tools/bench_second.py [--epochs 2] [--out outputs/bench]
    python tools/bench_second.py --epochs 8 --out outputs/bench/epochs8  # the demo's budget
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from coperception.config import load_config
from coperception.datasets.collate import collate
from coperception.datasets.prepared import PreparedDataset
from coperception.datasets.readers import build_dataset
from coperception.evaluate import evaluate_method
from coperception.export.latency import time_runs
from coperception.io import write_json
from coperception.pipeline.model import load_model
from coperception.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = parser.parse_args()
    runs = {"second": load_config("configs/synthetic_second.yaml"),
            "pointpillars": load_config("configs/synthetic.yaml", ["cooperation.strategy=none"])}
    report = {"protocol": "AP: BEV rotated IoU, VOC all-point, global sort; ms_per_frame: the model's detect step "
                          "(encode + head + NMS: an undertrained model's many boxes make NMS dominate), mean over the "
                          "test split; encoder_ms: the encoder alone on one ego view, median of 20 runs after 3",
              "encoders": {}}
    for name, cfg in runs.items():
        run_dir = args.out / "second" / name
        cfg = cfg.variant(train={"epochs": args.epochs, "out_dir": str(run_dir)})
        summary = None
        if not (run_dir / "last.pt").is_file():
            summary = train(cfg, progress=True, overwrite=True)
        model = load_model(run_dir / "last.pt", cfg)
        entry = evaluate_method(model, cfg, cfg.dataset.eval_split, progress=True)
        data = PreparedDataset(build_dataset(cfg.dataset, cfg.dataset.eval_split), cfg.dataset, cfg.model, "ego")
        batch = collate([data[len(data) // 2]])[0].to(model.anchors.device)
        with torch.no_grad():
            encoder_ms = time_runs(lambda: model.encode(batch), 20, warmup=3)[0]["median_ms"]
        report["encoders"][name] = {"ap": entry["ap"], "ms_per_frame": entry["ms"]["detect_and_serialize"],
                                    "encoder_ms": encoder_ms,
                                    "load_and_voxelize_ms": entry["ms"]["load_and_voxelize"],
                                    "voxel_size": list(cfg.model.voxel_size), "epochs": args.epochs,
                                    "train_seconds": summary["seconds"] if summary else None,
                                    "checkpoint": str(run_dir / "last.pt")}
        print(name, entry["ap"], f"{entry['ms']['detect_and_serialize']:.1f} ms/frame, encoder {encoder_ms:.1f} ms")
    write_json(args.out / "second.json", report)
    print(f"wrote {args.out / 'second.json'}")


if __name__ == "__main__":
    main()

"""SECOND vs PointPillars on the synthetic world: each trained ego-only with one recipe (the config's
train section: 2 epochs from scratch by default), then AP (global sort) and ms per frame on the test
split -> outputs/bench/second.json. Runs that already have a last.pt are reused.

    python tools/bench_second.py [--epochs 2] [--out outputs/bench]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coperception.config import load_config
from coperception.evaluate import evaluate_method
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
    report = {"protocol": "AP: BEV rotated IoU, VOC all-point, global sort; ms: the model's detect step per frame "
                          "(encode + head + NMS) on this machine, mean over the test split", "encoders": {}}
    for name, cfg in runs.items():
        run_dir = args.out / "second" / name
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": args.epochs,
                                                                           "out_dir": str(run_dir)})})
        summary = None
        if not (run_dir / "last.pt").is_file():
            summary = train(cfg, progress=True, overwrite=True)
        entry = evaluate_method(load_model(run_dir / "last.pt", cfg), cfg, cfg.dataset.eval_split, progress=True)
        report["encoders"][name] = {"ap": entry["ap"], "ms_per_frame": entry["ms"]["detect_and_serialize"],
                                    "load_and_voxelize_ms": entry["ms"]["load_and_voxelize"],
                                    "voxel_size": list(cfg.model.voxel_size), "epochs": args.epochs,
                                    "train_seconds": summary["seconds"] if summary else None,
                                    "checkpoint": str(run_dir / "last.pt")}
        print(name, entry["ap"], f"{entry['ms']['detect_and_serialize']:.1f} ms/frame")
    write_json(args.out / "second.json", report)
    print(f"wrote {args.out / 'second.json'}")


if __name__ == "__main__":
    main()

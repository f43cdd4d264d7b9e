"""Camera-only, LiDAR-only and mixed agents on the synthetic world -> outputs/bench/camera.json.

Rows (test split, AP with global sort, bytes = measured serialized bytes per sender per frame):
- camera: every agent has only its cameras (`lss`): the ego alone, and all agents fusing with max;
- lidar: every agent has only its LiDAR (`pointpillars`): the given ego-only and max checkpoints (the demo's);
- mixed: camera-only cars, LiDAR roadside units (`configs/synthetic_mixed.yaml`), max fusion.
Intermediate rows are evaluated with sparse fp32 messages through the channel (the config's selection
threshold) and with dense maps. Runs that already have a last.pt are reused; the others are trained with
their config's train section.

    python tools/bench_camera.py [--out outputs/bench] [--epochs 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coperception.config import ExperimentConfig, load_config
from coperception.evaluate import evaluate_method
from coperception.io import write_json
from coperception.pipeline.model import load_model
from coperception.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lidar-ego", type=Path, default=Path("outputs/demo/train/none/last.pt"))
    parser.add_argument("--lidar-max", type=Path, default=Path("outputs/demo/train/max/best.pt"))
    args = parser.parse_args()
    camera = "configs/synthetic_camera.yaml"
    trained = {  # name -> (sensors of the ego, of the others, config)
        "camera / ego only": ("camera", "-", load_config(camera)),
        "camera / max": ("camera", "camera", load_config(camera, ["cooperation.strategy=intermediate", "fusion.method=max"])),
        "mixed / max": ("camera", "camera cars, lidar rsu", load_config("configs/synthetic_mixed.yaml")),
    }
    rows: list[dict] = []

    def evaluate(name: str, ego: str, others: str, cfg: ExperimentConfig, checkpoint: Path, epochs: int | None) -> None:
        codecs = ["sparse", "dense"] if cfg.cooperation.strategy == "intermediate" else [cfg.comm.codec]
        for codec in codecs:
            run_cfg = cfg.variant(codec=codec)
            entry = evaluate_method(load_model(checkpoint, run_cfg), run_cfg, run_cfg.dataset.eval_split, progress=True)
            label = name if len(codecs) == 1 else f"{name} ({codec})"
            rows.append({"method": label, "ego_sensors": ego, "other_sensors": others, "ap": entry["ap"],
                         "bytes_per_agent_frame": entry["bytes_per_agent_frame"],
                         "ms_per_frame": entry["ms"]["detect_and_serialize"], "checkpoint": str(checkpoint),
                         "epochs": epochs, "codec": codec if cfg.cooperation.strategy == "intermediate" else None})
            print(label, {k: round(v, 3) for k, v in entry["ap"].items()}, f"{entry['bytes_per_agent_frame']:.0f} B")

    for name, (ego, others, cfg) in trained.items():
        run_dir = args.out / "camera" / name.replace(" / ", "_").replace(" ", "_")
        cfg = cfg.variant(train={"epochs": args.epochs, "out_dir": str(run_dir)})
        if not (run_dir / "last.pt").is_file():
            train(cfg, progress=True, overwrite=True)
        evaluate(name, ego, others, cfg, run_dir / "last.pt", args.epochs)
    lidar = load_config("configs/synthetic.yaml")
    evaluate("lidar / ego only", "lidar", "-", lidar.variant(strategy="none"), args.lidar_ego, None)
    evaluate("lidar / max", "lidar", "lidar", lidar, args.lidar_max, None)
    report = {"protocol": "BEV rotated IoU, VOC all-point AP, detections of all test frames sorted together (global "
                          "sort); bytes: measured serialized bytes each sender's message had, per sender per frame "
                          "(sparse: the selected cells as fp32 through the channel; dense: the whole fp32 map)",
              "rows": rows}
    write_json(args.out / "camera.json", report)
    print("| method | ego | others | AP@0.3 | AP@0.5 | AP@0.7 | B/agent/frame |")
    for r in rows:
        ap = r["ap"]
        print(f"| {r['method']} | {r['ego_sensors']} | {r['other_sensors']} | {ap['0.3']:.3f} | {ap['0.5']:.3f} | "
              f"{ap['0.7']:.3f} | {r['bytes_per_agent_frame']:,.0f} |")
    print(f"wrote {args.out / 'camera.json'}")


if __name__ == "__main__":
    main()

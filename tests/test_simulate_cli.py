import hashlib

import numpy as np
from typer.testing import CliRunner

from coperception.cli import app
from coperception.datasets.readers import build_dataset
from coperception.datasets.stats import visibility_stats
from coperception.config import load_config

SMALL = ["--set", "simulator.lidar.beams=16", "--set", "simulator.lidar.azimuth_steps=256",
         "--set", "simulator.camera.width=48", "--set", "simulator.camera.height=36"]


def tree_digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_simulate_both_formats_deterministic_and_readable(tmp_path):
    runner = CliRunner()
    digests = {}
    for fmt in ("opv2v", "dair-v2x"):
        for run in ("a", "b"):
            out = tmp_path / f"{fmt}_{run}"
            result = runner.invoke(app, ["simulate", "--format", fmt, "--out", str(out), "--scenarios", "3",
                                         "--frames", "2", "--seed", "5", *SMALL])
            assert result.exit_code == 0, result.output
            digests[(fmt, run)] = tree_digest(out)
        assert digests[(fmt, "a")] == digests[(fmt, "b")]
    # different seed -> different files
    out = tmp_path / "opv2v_c"
    assert runner.invoke(app, ["simulate", "--out", str(out), "--scenarios", "3", "--frames", "2", "--seed", "6", *SMALL]).exit_code == 0
    assert tree_digest(out) != digests[("opv2v", "a")]
    # layouts
    opv = tmp_path / "opv2v_a"
    assert sorted(p.name for p in opv.iterdir()) == ["test", "train", "validate"]
    scenario = next((opv / "train").iterdir())
    assert (scenario / "data_protocol.yaml").is_file()
    cav = next(p for p in scenario.iterdir() if p.is_dir())
    assert {p.name for p in cav.iterdir()} >= {"000068.pcd", "000068.yaml", "000068_camera0.png", "000068_camera3.png", "000070.pcd"}
    assert b"DATA ascii" in (cav / "000068.pcd").read_bytes()[:400]
    dair = tmp_path / "dair-v2x_a"
    for rel in ("cooperative/data_info.json", "vehicle-side/data_info.json", "infrastructure-side/data_info.json",
                "vehicle-side/calib/lidar_to_novatel/000000.json", "infrastructure-side/calib/virtuallidar_to_world/000000.json",
                "vehicle-side/image/000000.jpg", "infrastructure-side/label/virtuallidar/000000.json",
                "cooperative/label_world/000000.json", "split/train.json"):
        assert (dair / rel).is_file(), rel
    assert b"DATA binary_compressed" in (dair / "vehicle-side/velodyne/000000.pcd").read_bytes()[:400]
    # read back through the loaders
    cfg = load_config(None, ["dataset.format=dair-v2x", "dataset.point_cloud_range=[-102.4,-51.2,-3.5,102.4,51.2,1.5]"])
    sample = build_dataset(cfg.dataset, "train", str(dair))[0]
    assert len(sample.agents) == 2 and len(sample.gt_boxes) > 0
    stats = visibility_stats(build_dataset(load_config().dataset, "train", str(opv)), load_config().dataset.eval_range,
                             progress=False)
    assert 0 < stats["ego_visible_fraction"] <= stats["union_visible_fraction"] <= 1
    assert np.isfinite(stats["mean_points_per_agent"])


def test_simulate_refuses_non_empty_folder_and_bad_format(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "x"), "--scenarios", "1", "--frames", "1", *SMALL])
    assert result.exit_code == 2 and "not empty" in result.output
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, ["simulate", "--out", str(tmp_path / "y"), "--format", "kitti"])
    assert result.exit_code == 2 and "kitti" in result.output

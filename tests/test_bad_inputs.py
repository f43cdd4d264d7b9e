"""Bad files, configs and checkpoints: each gets a project error naming the file or key (issue 13's
reproducers), never a traceback from deep inside and never a silent skip."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import torch
import yaml

from coperception.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from coperception.config import load_config
from coperception.datasets.pcd import read_pcd, write_pcd
from coperception.errors import ConfigError, DataFormatError
from coperception.io import validate

from test_pcd import opv2v_cloud


def _pcd(tmp_path, kind):
    path = tmp_path / f"c_{kind}.pcd"
    write_pcd(path, opv2v_cloud(50), data=kind)
    raw = path.read_bytes()
    offset = raw.index(b"DATA " + kind.encode()) + len(f"DATA {kind}\n")
    return path, raw, offset


def test_a_non_numeric_token_in_an_ascii_pcd_is_named(tmp_path):
    path, raw, offset = _pcd(tmp_path, "ascii")
    path.write_bytes(raw[:offset] + b"1.0 abc " + raw[offset + 8 :])
    with pytest.raises(DataFormatError, match=str(path.name)):
        read_pcd(path)


def test_compressed_pcd_size_words_cannot_wrap_and_corrupt_lzf_is_named(tmp_path):
    path, raw, offset = _pcd(tmp_path, "binary_compressed")
    raw_size = struct.unpack_from("<I", raw, offset + 4)[0]
    path.write_bytes(raw[:offset] + struct.pack("<II", 0xFFFFFFFF, raw_size) + raw[offset + 8 :])
    with pytest.raises(DataFormatError, match="truncated"):
        read_pcd(path)
    body = bytearray(raw)
    body[offset + 8 : offset + 40] = bytes([0xE0] * 32)  # back-references before the start of the output
    path.write_bytes(bytes(body))
    with pytest.raises(DataFormatError, match="LZF"):
        read_pcd(path)


def test_a_non_finite_pose_in_an_opv2v_frame_is_named(opv2v_set, tmp_path):
    from coperception.datasets.readers import build_dataset

    root = tmp_path / "copy"
    shutil.copytree(opv2v_set.root, root)
    frame = sorted(root.glob("test/*/*/*.yaml"))[0]
    data = yaml.safe_load(frame.read_text())
    data["lidar_pose"][0] = float("nan")
    frame.write_text(yaml.safe_dump(data))
    dataset = build_dataset(opv2v_set.dataset_cfg, "test", str(root))
    with pytest.raises(DataFormatError, match=rf"{frame.name}.*lidar_pose"):
        for i in range(len(dataset)):
            dataset[i]


@pytest.mark.parametrize("calibration, field", [
    ({"rotation": [[1, 0, 0], [0, 1, 0], ["x", 0, 1]], "translation": [[0], [0], [0]]}, "rotation"),
    ({"rotation": [[1, 0, 0], [0, 1], [0, 0, 1]], "translation": [[0], [0], [0]]}, "rotation"),
    ({"rotation": [[1, 0, 0], [0, 1, 0], [0, 0, float("nan")]], "translation": [0, 0, 0]}, "rotation"),
    ({"rotation": [[0, 0, 0], [0, 0, 0], [0, 0, 0]], "translation": [0, 0, 0]}, "degenerate"),
    ({"rotation": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "translation": [[0], ["a"], [0]]}, "translation"),
    ({"rotation": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "translation": [0, float("inf"), 0]}, "translation"),
])
def test_dair_calibrations_that_are_no_rigid_transform_are_named(calibration, field):
    from coperception.datasets.dair_v2x import RigidJson

    with pytest.raises(DataFormatError, match=rf"calib.json.*{field}"):
        validate(RigidJson, calibration, "calib.json")
    good = validate(RigidJson, {"rotation": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "translation": [[1], [2], [3]]}, "c.json")
    np.testing.assert_array_equal(good.matrix()[:3, 3], [1, 2, 3])


@pytest.mark.parametrize("overrides, key", [
    (["model.voxel_size=[0,0.8,4]"], "voxel_size"), (["model.voxel_size=[0.8,-0.8,4]"], "voxel_size"),
    (["dataset.point_cloud_range=[.nan,-40,-3,140,40,1]"], "point_cloud_range"),
    (["model.anchor_yaws_deg=[]"], "anchor_yaws_deg"),
    (["model.layers=[]", "model.strides=[]", "model.filters=[]", "model.upsample_filters=[]"], "layers"),
    (["eval.iou_thresholds=[]"], "iou_thresholds"), (["eval.iou_thresholds=[0.5, 1.5]"], "iou_thresholds"),
])
def test_configs_that_cannot_work_are_refused_when_loaded(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_an_mtu_too_small_for_one_cell_is_a_config_error():
    from coperception.pipeline.model import build_model
    from coperception.pipeline.session import CommSession

    cfg = load_config(None, ["comm.codec=sparse", "comm.channel.mtu=300"])
    model = build_model(cfg)
    with pytest.raises(ConfigError, match="comm.channel.mtu 300"):
        CommSession(model.agent, model.confidence, cfg.comm)


def test_incomplete_or_non_finite_checkpoints_are_refused(opv2v_set, tmp_path):
    from coperception.pipeline.model import architecture, build_model, load_model
    from coperception.train import train

    cfg = load_config(None, ["cooperation.strategy=none", "model.layers=[1]", "model.strides=[2]", "model.filters=[8]",
                             "model.upsample_filters=[8]", "model.pfn_channels=8", f"dataset.root={opv2v_set.root}",
                             "dataset.train_split=test", "dataset.val_split=test"])
    model = build_model(cfg)
    torch.save({"format": "coperception-checkpoint", "version": 1, "model": model.state_dict()}, tmp_path / "no_arch.pt")
    with pytest.raises(CheckpointError, match="lacks arch"):
        load_checkpoint(tmp_path / "no_arch.pt")
    state = model.state_dict()
    state["head.cls.weight"] = torch.full_like(state["head.cls.weight"], float("nan"))
    save_checkpoint(tmp_path / "nan.pt", arch=architecture(cfg), model=state, extra={})
    with pytest.raises(CheckpointError, match=r"non-finite values in \['head.cls.weight'\]"):
        load_model(tmp_path / "nan.pt", cfg)
    run = tmp_path / "run"
    save_checkpoint(run / "last.pt", arch=architecture(cfg), model=model.state_dict(), extra={"step": 3})
    with pytest.raises(CheckpointError, match="lacks optimizer, scheduler, best"):
        train(cfg.variant(train={"out_dir": str(run)}), resume=True, progress=False)


def test_an_output_folder_that_cannot_be_written_is_named_before_training(tmp_path):
    from coperception.errors import OutputError
    from coperception.train import train

    (tmp_path / "file").write_text("not a folder")
    cfg = load_config(None, ["cooperation.strategy=none", f"train.out_dir={tmp_path / 'file' / 'run'}"])
    with pytest.raises(OutputError, match=r"file/run: cannot write"):
        train(cfg, progress=False)


def test_a_failed_write_leaves_neither_a_half_file_nor_a_temp_file(tmp_path, monkeypatch):
    import errno
    import os

    from coperception.errors import OutputError
    from coperception.io import atomic_write_bytes

    target = tmp_path / "report.json"
    target.write_bytes(b"old")

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match="No space left"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_a_retired_setting_in_a_stored_config_is_dropped_but_refused_in_a_yaml(tmp_path):
    from coperception.config import config_from_dict

    cfg = load_config(None, ["cooperation.strategy=none"])
    stored = cfg.model_dump(mode="json")
    stored["fusion"]["motion"]["smoothing"] = 0.5  # written by checkpoints before the least-squares tracker
    save_checkpoint(tmp_path / "old.pt", arch={}, model={}, extra={"config": stored})
    loaded = load_checkpoint(tmp_path / "old.pt")["config"]
    assert "smoothing" not in loaded["fusion"]["motion"]
    assert config_from_dict(loaded, [], "old.pt").fusion.motion.window == cfg.fusion.motion.window
    with pytest.raises(ConfigError, match="smoothing"):
        load_config(None, ["fusion.motion.smoothing=0.5"])

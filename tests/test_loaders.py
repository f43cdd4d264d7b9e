"""Loaders read the simulator's files back to the simulator's truth."""

import json
from pathlib import Path
import shutil

import numpy as np
import pytest
import yaml

from coperception.datasets.dair_v2x import DairV2XDataset, read_side_labels
from coperception.datasets.opv2v import OPV2VDataset
from coperception.datasets.sim.sensors import camera_intrinsics, render_camera
from coperception.datasets.sim.writers import OPV2V_CAMERA_MOUNTS, _rig
from coperception.errors import DataFormatError
from coperception.geometry import invert, points_in_boxes, transform_boxes, transform_points, wrap_angle
from tests.conftest import REALDATA


def test_opv2v_poses_match_simulator_truth(opv2v_set):
    ds = OPV2VDataset(opv2v_set.root, "test", opv2v_set.dataset_cfg)
    assert len(ds) == 3 * opv2v_set.cfg.frames
    checked = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s.ego.kind == "vehicle" and not s.ego.agent_id.startswith("-")
        ego_truth = opv2v_set.truth.T_world_lidar[(s.ego.agent_id, s.frame)]
        for k, agent in enumerate(s.agents):
            truth = invert(ego_truth) @ opv2v_set.truth.T_world_lidar[(agent.agent_id, s.frame)]
            np.testing.assert_allclose(s.T_ego_from_agent(k), truth, atol=1e-6)
            checked += 1
        kinds = [a.kind for a in s.agents]
        assert kinds == sorted(kinds, key=lambda kd: kd == "rsu")  # roadside units last
    assert checked > len(ds)


def test_opv2v_gt_boxes_contain_each_agents_returns(opv2v_set):
    """Each GT box, moved into an agent's frame, holds the returns the simulator says that agent
    got from that vehicle (range noise and the ego-body mask allow a small difference)."""
    ds = OPV2VDataset(opv2v_set.root, "test", opv2v_set.dataset_cfg)
    compared = 0
    for i in range(len(ds)):
        s = ds[i]
        for k, agent in enumerate(s.agents):
            truth_hits = opv2v_set.truth.hits[(agent.agent_id, s.frame)]
            boxes_agent = transform_boxes(invert(s.T_ego_from_agent(k)), s.gt_boxes)
            inside = points_in_boxes(agent.points, boxes_agent, margin=0.15).sum(axis=1)
            for box_id, count in zip(s.gt_ids, inside):
                if str(box_id) == agent.agent_id:
                    continue  # an agent's returns from its own roof are removed by the body mask
                expected = truth_hits.get(int(box_id), 0)
                if expected >= 20:
                    assert abs(int(count) - expected) <= max(3, 0.1 * expected), (agent.agent_id, box_id, count, expected)
                    compared += 1
    assert compared >= 20


def test_opv2v_gt_rules(opv2v_set):
    ds = OPV2VDataset(opv2v_set.root, "test", opv2v_set.dataset_cfg)
    s = ds[0]
    assert int(s.ego.agent_id) not in s.gt_ids.tolist()  # not the ego itself
    assert len(np.unique(s.gt_ids)) == len(s.gt_ids)  # deduplicated
    other_vehicles = [int(a.agent_id) for a in s.agents[1:] if a.kind == "vehicle"]
    in_range = [v for v in other_vehicles if abs(s.T_ego_from_agent(1)[0, 3]) < 140]
    assert set(in_range) <= set(s.gt_ids.tolist()) or not in_range  # other CAVs are objects to detect
    # ego-body returns are removed
    body = (np.abs(s.ego.points[:, 1]) < 1.0) & (s.ego.points[:, 0] > -1.9) & (s.ego.points[:, 0] < 2.9)
    assert not body.any()
    # the first frame has no history, later frames do
    assert all(a is None for a in s.earlier(1))
    later = ds[2]
    old = later.earlier(1)
    assert [a.agent_id for a in old] == [a.agent_id for a in later.agents]
    assert old[0].capture_time == pytest.approx(later.ego.capture_time - 0.1)


def test_opv2v_camera_projection_lands_on_rendered_object(opv2v_set):
    cfg = dict(opv2v_set.dataset_cfg)
    ds = OPV2VDataset(opv2v_set.root, "test", opv2v_set.dataset_cfg.model_copy(update={"load_cameras": True}))
    K_truth = camera_intrinsics(opv2v_set.cfg.camera)
    hits = misses = 0
    for i in range(0, len(ds), opv2v_set.cfg.frames):
        s = ds[i]
        scene = opv2v_set.scenes[s.scenario]
        agent = s.ego
        sim_agent = next(a for a in scene.agents if str(a.aid) == agent.agent_id)
        t = opv2v_set.truth.capture_time[(agent.agent_id, s.frame)]
        rig = _rig(scene, sim_agent, t, opv2v_set.cfg, OPV2V_CAMERA_MOUNTS)
        for c, camera in enumerate(agent.cameras):
            assert camera.image is not None and camera.image.shape == (opv2v_set.cfg.camera.height, opv2v_set.cfg.camera.width, 3)
            render = render_camera(scene, t, rig.cameras_world_from_cv[c], K_truth, opv2v_set.cfg.camera.width, opv2v_set.cfg.camera.height)
            np.testing.assert_array_equal(render.rgb, camera.image)  # PNG is lossless
            uv, depth = camera.project(s.gt_boxes[:, :3])
            for box, (u, v), z, box_id in zip(s.gt_boxes, uv, depth, s.gt_ids):
                if z < 1 or not (0 <= u < camera.image.shape[1] and 0 <= v < camera.image.shape[0]):
                    continue
                drawn = render.object_id[int(v), int(u)]
                if drawn == box_id:
                    hits += 1
                else:  # something nearer hides the box centre
                    assert render.depth[int(v), int(u)] < np.linalg.norm(box[:3] - camera.T_agent_from_camera[:3, 3]), (c, box_id)
                    misses += 1
    assert hits >= 5
    del cfg


def test_dair_poses_offsets_and_labels(dair_set):
    ds = DairV2XDataset(dair_set.root, "test", dair_set.dataset_cfg)
    assert len(ds) == 2 * dair_set.cfg.frames
    records = json.loads((dair_set.root / "cooperative/data_info.json").read_text())
    assert all(isinstance(r["system_error_offset"], dict) for r in records)
    for i in range(len(ds)):
        s = ds[i]
        vid, iid = s.agents[0].agent_id, s.agents[1].agent_id
        T_v = dair_set.truth.T_world_lidar[("vehicle", vid)]
        T_i = dair_set.truth.T_world_lidar[("infrastructure", iid)]
        np.testing.assert_allclose(s.T_ego_from_agent(1), invert(T_v) @ T_i, atol=1e-6)
        assert s.agents[1].kind == "rsu"
        assert 0 <= s.ego.capture_time - s.agents[1].capture_time <= 0.081
        # vehicle returns lie inside the GT boxes (same capture time as the cooperative label)
        inside = points_in_boxes(s.ego.points, s.gt_boxes, margin=0.15).sum(axis=1)
        hits = dair_set.truth.hits[("vehicle", vid)]
        scene = dair_set.scenes[s.scenario]
        ids = scene.vehicle_ids()
        # cooperative labels carry no ids: match each box to the nearest true vehicle centre
        truth_boxes = transform_boxes(invert(T_v), scene.vehicle_boxes(dair_set.truth.capture_time[("vehicle", vid)]))
        for box, count in zip(s.gt_boxes, inside):
            j = int(np.argmin(np.hypot(*(truth_boxes[:, :2] - box[:2]).T)))
            assert np.hypot(*(truth_boxes[j, :2] - box[:2])) < 1e-3
            assert abs(float(truth_boxes[j, 3] - box[3])) < 1e-6
            assert abs(float(wrap_angle(truth_boxes[j, 6] - box[6]))) < 1e-6  # the heading, not modulo pi
            expected = hits.get(int(ids[j]), 0)
            if expected >= 20:
                assert abs(int(count) - expected) <= max(3, 0.1 * expected)
    # without the recorded offset the roadside pose would be wrong
    first = ds.records[0]
    no_offset = ds._infrastructure(str(first.infrastructure_pointcloud_path).split("/")[-1][:-4], "")
    truth = dair_set.truth.T_world_lidar[("infrastructure", no_offset.agent_id)]
    assert np.hypot(*(no_offset.T_world_from_agent[:2, 3] - truth[:2, 3])) > 1e-3


def test_dair_history_and_side_labels(dair_set):
    ds = DairV2XDataset(dair_set.root, "test", dair_set.dataset_cfg)
    s = ds[1]
    old = s.earlier(1)
    assert old[0] is not None and old[0].capture_time == pytest.approx(s.ego.capture_time - 0.1)
    assert ds[0].earlier(1) == [None, None]
    boxes, types = read_side_labels(dair_set.root / "infrastructure-side/label/virtuallidar" / f"{s.agents[1].agent_id}.json")
    assert boxes.shape[1] == 7 and set(types) <= {"Car", "Van", "Truck"}


@pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is absent")
def test_real_dair_labels_and_records():
    boxes, types = read_side_labels(REALDATA / "vehicle-side/label/lidar/017314.json")
    assert "Car" in types and "Trafficcone" in types and boxes.shape[1] == 7
    car = boxes[types.index("Car")]
    assert car.tolist() == pytest.approx([15.31898, 6.497239, -1.037741, 4.221245, 1.886945, 1.524602, 0.004102247])
    iboxes, itypes = read_side_labels(REALDATA / "infrastructure-side/label/virtuallidar/001366.json")  # string fields
    assert len(iboxes) == len(itypes) > 0 and "Motorcyclist" in itypes
    from coperception.datasets.dair_v2x import CooperativeRecord, Offset

    rows = json.loads((REALDATA / "cooperative/data_info_521_rows.json").read_text())
    parsed = [CooperativeRecord.model_validate(r) for r in rows]
    assert len(parsed) == 521 and all(isinstance(p.system_error_offset, Offset) for p in parsed)
    assert CooperativeRecord.model_validate({**rows[0], "system_error_offset": ""}).system_error_offset == ""
    one = CooperativeRecord.model_validate(json.loads((REALDATA / "cooperative/data_info_one_pair.json").read_text())[0])
    assert one.system_error_offset == Offset(delta_x=-0.7, delta_y=-0.54)


# ---- bad input: each names the file and the problem ----

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_yaml_missing_key_is_named(opv2v_set, tmp_path):
    root = _copy(opv2v_set.root, tmp_path / "opv")
    frame = next((root / "test").rglob("000068.yaml"))
    data = yaml.safe_load(frame.read_text())
    del data["lidar_pose"]
    frame.write_text(yaml.safe_dump(data))
    ds = OPV2VDataset(root, "test", opv2v_set.dataset_cfg)
    with pytest.raises(DataFormatError, match=r"000068\.yaml.*lidar_pose.*Field required"):
        for i in range(len(ds)):
            ds[i]


def test_json_wrong_type_is_named(dair_set, tmp_path):
    root = _copy(dair_set.root, tmp_path / "dair")
    calib = sorted((root / "infrastructure-side/calib/virtuallidar_to_world").glob("*.json"))[0]
    data = json.loads(calib.read_text())
    data["rotation"] = "identity"
    calib.write_text(json.dumps(data))
    ds = DairV2XDataset(root, "test", dair_set.dataset_cfg)
    with pytest.raises(DataFormatError, match=rf"{calib.name}.*rotation"):
        ds[0]


def test_missing_file_and_split_are_named(dair_set, opv2v_set, tmp_path):
    root = _copy(dair_set.root, tmp_path / "dair")
    pcd = sorted((root / "vehicle-side/velodyne").glob("*.pcd"))[0]
    pcd.unlink()
    ds = DairV2XDataset(root, "test", dair_set.dataset_cfg)
    with pytest.raises(DataFormatError, match=rf"{pcd.name}: file does not exist"):
        ds[0]
    with pytest.raises(DataFormatError, match=r"split/nosuch\.json: split 'nosuch' has no file.*dataset\.split_files"):
        DairV2XDataset(root, "nosuch", dair_set.dataset_cfg)
    with pytest.raises(DataFormatError, match=r"elsewhere/train\.json: dataset\.split_files\.train: split file does not exist"):
        DairV2XDataset(root, "train", dair_set.dataset_cfg.model_copy(update={"split_files": {"train": str(tmp_path / "elsewhere/train.json")}}))
    with pytest.raises(DataFormatError, match="split folder 'train' does not exist"):
        OPV2VDataset(opv2v_set.root, "train")


def test_truncated_pcd_in_dataset_is_named(opv2v_set, tmp_path):
    root = _copy(opv2v_set.root, tmp_path / "opv")
    ds = OPV2VDataset(root, "test", opv2v_set.dataset_cfg)
    s = ds[0]
    pcd = root / "test" / s.scenario / s.ego.agent_id / f"{s.frame}.pcd"
    pcd.write_bytes(pcd.read_bytes()[:-5000])
    with pytest.raises(DataFormatError, match=rf"{s.frame}\.pcd.*truncated"):
        ds[0]


def test_points_frame_sanity(opv2v_set):
    """Transforming every agent's points to the ego frame puts the ground at the ego's ground."""
    ds = OPV2VDataset(opv2v_set.root, "test", opv2v_set.dataset_cfg)
    s = ds[1]
    for k, agent in enumerate(s.agents):
        pts = transform_points(s.T_ego_from_agent(k), agent.points)
        ground = np.percentile(pts[:, 2], 10)
        assert abs(ground - (-opv2v_set.cfg.lidar.mount_height)) < 0.3


def test_dair_split_files_by_path(dair_set, tmp_path):
    ids = json.loads((dair_set.root / "split/test.json").read_text())
    coalign = tmp_path / "coalign" / "val.json"  # CoAlign/HEAL keep a plain list elsewhere
    coalign.parent.mkdir()
    coalign.write_text(json.dumps(ids[:2]))
    official = tmp_path / "cooperative-split-data.json"  # the official file: one mapping for all splits
    official.write_text(json.dumps({"cooperative_split": {"train": ids[2:], "val": ids[:3], "test": []}}))
    cfg = dair_set.dataset_cfg.model_copy(update={"split_files": {"validate": str(coalign), "train": str(official)}})
    assert [Path(r.vehicle_pointcloud_path).stem for r in DairV2XDataset(dair_set.root, "validate", cfg).records] == ids[:2]
    assert len(DairV2XDataset(dair_set.root, "train", cfg).records) == len(ids) - 2
    by_official = dair_set.dataset_cfg.model_copy(update={"split_files": {"validate": str(official)}})
    assert len(DairV2XDataset(dair_set.root, "validate", by_official).records) == 3  # `validate` is `val` there
    with pytest.raises(DataFormatError, match=r"no list for split 'mine'.*\['test', 'train', 'val'\]"):
        DairV2XDataset(dair_set.root, "mine", dair_set.dataset_cfg.model_copy(update={"split_files": {"mine": str(official)}}))
    coalign.write_text(json.dumps({"frames": 3}))
    with pytest.raises(DataFormatError, match="no list for split 'validate'"):
        DairV2XDataset(dair_set.root, "validate", cfg)
    coalign.write_text(json.dumps([1.5]))
    with pytest.raises(DataFormatError, match="list of vehicle frame ids"):
        DairV2XDataset(dair_set.root, "validate", cfg)

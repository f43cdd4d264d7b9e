"""The camera path: calibration through the data pipeline, lift-splat geometry, camera and mixed agents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coperception.config import load_config
from coperception.datasets.cameras import CameraViews
from coperception.datasets.collate import collate, prepare_sample
from coperception.datasets.dair_v2x import DairV2XDataset
from coperception.datasets.readers import build_dataset
from coperception.datasets.sim.sensors import camera_intrinsics, render_camera
from coperception.datasets.sim.writers import DAIR_RSU_CAMERA_MOUNT, DAIR_VEHICLE_CAMERA_MOUNT, _rig
from coperception.datasets.types import Camera
from coperception.errors import ConfigError
from coperception.geometry import CV_TO_BODY, pose_matrix
from coperception.grid import BEVGrid
from coperception.models.camera import LiftSplatEncoder, frustum_points, splat
from coperception.models.encoders import CombinedEncoder, PointPillarsEncoder, build_encoder
from coperception.pipeline.model import build_model

from test_train import TINY


def _camera(rng: np.random.Generator, width: int = 64, height: int = 48) -> tuple[np.ndarray, np.ndarray]:
    K = np.array([[40.0, 0.0, 30.5], [0.0, 42.0, 25.0], [0.0, 0.0, 1.0]])
    T = pose_matrix(rng.uniform(-2, 2), rng.uniform(-2, 2), 1.6, rng.uniform(-np.pi, np.pi)) @ CV_TO_BODY
    return K, T


def test_frustum_points_project_back_to_their_pixels_and_depths():
    rng = np.random.default_rng(0)
    K, T = _camera(rng)
    depths = torch.tensor([3.0, 10.0, 41.5])
    points = frustum_points(torch.tensor(K[None]), torch.tensor(T[None]), depths.double(), 6, 8, 8)
    assert points.shape == (1, 3, 6, 8, 3)
    camera = Camera("c", K, T, "")
    uv, z = camera.project(points[0].reshape(-1, 3).numpy())
    expected_u = np.broadcast_to((np.arange(8) + 0.5) * 8, (3, 6, 8)).reshape(-1)
    expected_v = np.broadcast_to(((np.arange(6) + 0.5) * 8)[:, None], (3, 6, 8)).reshape(-1)
    np.testing.assert_allclose(uv[:, 0], expected_u, atol=1e-6)
    np.testing.assert_allclose(uv[:, 1], expected_v, atol=1e-6)
    np.testing.assert_allclose(z, np.repeat(depths.numpy(), 48), atol=1e-6)


def test_splat_of_one_lit_pixel_lands_in_its_bev_cell():
    grid = BEVGrid(-20.0, -10.0, 0.5, 40, 80)
    rng = np.random.default_rng(1)
    K, T = _camera(rng)
    intrinsics = torch.tensor(np.stack([K, K]), dtype=torch.float32)
    extrinsics = torch.tensor(np.stack([T, pose_matrix(1.0, 0.5, 1.6, 0.3) @ CV_TO_BODY]), dtype=torch.float32)
    depths = torch.linspace(2.0, 16.0, 8)
    D, h, w, C = 8, 6, 8, 3
    depth = torch.zeros(2, D, h, w)
    context = torch.zeros(2, C, h, w)
    depth[1, 5, 4, 6] = 1.0  # the second image (of view 2), bin 5, feature pixel row 4 col 6
    context[1, :, 4, 6] = torch.tensor([1.0, 2.0, 3.0])
    context[0] = 7.0  # lit everywhere but with zero depth weight: adds nothing
    points = frustum_points(intrinsics, extrinsics, depths, h, w, 8)
    bev = splat(depth, context, points, torch.tensor([0, 2]), 3, grid, (-3.0, 3.0))
    assert bev.shape == (3, C, grid.height, grid.width)
    # where the pixel's ray is at that depth, by hand: K^-1 (u, v, 1) * d, then the camera pose
    u, v, d = (6 + 0.5) * 8, (4 + 0.5) * 8, float(depths[5])
    cam = np.linalg.inv(K) @ np.array([u, v, 1.0]) * d
    x, y, _ = extrinsics[1, :3, :3].double().numpy() @ cam + extrinsics[1, :3, 3].double().numpy()
    row, col = int((y - grid.y_min) // grid.cell), int((x - grid.x_min) // grid.cell)
    nonzero = torch.nonzero(bev.abs().sum(dim=1))
    assert nonzero.tolist() == [[2, row, col]]
    torch.testing.assert_close(bev[2, :, row, col], torch.tensor([1.0, 2.0, 3.0]))


def test_mirrored_rotated_scaled_scene_keeps_each_point_on_its_pixel():
    rng = np.random.default_rng(2)
    K, T = _camera(rng)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    views = CameraViews(image[None], K[None], T[None])
    cam_points = np.column_stack([rng.uniform(-3, 3, 50), rng.uniform(-2, 2, 50), rng.uniform(4, 20, 50)])
    points = cam_points @ T[:3, :3].T + T[:3, 3]  # in the view's frame
    before = Camera("c", K, T, "").project(points)[0]
    for mirror in (False, True):
        M = pose_matrix(0.0, 0.0, 0.0, 0.4)
        M[:3, :3] = M[:3, :3] @ np.diag([1.0, -1.0 if mirror else 1.0, 1.0]) * 1.04
        mapped = views.mapped(M)
        R = mapped.T_frame_from_camera[0, :3, :3]
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
        after = Camera("c", mapped.intrinsics[0], mapped.T_frame_from_camera[0], "").project(points @ M[:3, :3].T)[0]
        expected = np.column_stack([64 - before[:, 0], before[:, 1]]) if mirror else before
        np.testing.assert_allclose(after, expected, atol=1e-9)
        np.testing.assert_array_equal(mapped.images[0], image[:, ::-1] if mirror else image)


def test_resized_images_keep_their_pixels():
    K = np.array([[100.0, 0, 64.0], [0, 100.0, 48.0], [0, 0, 1]])
    camera = Camera("c", K, np.eye(4), "", np.zeros((96, 128, 3), dtype=np.uint8))
    views = CameraViews.from_cameras([camera], (64, 48), "car")
    assert views.images.shape == (1, 48, 64, 3)
    point = np.array([[1.0, 0.5, 8.0]])
    u_full = camera.project(point)[0]
    u_half = Camera("c", views.intrinsics[0], np.eye(4), "").project(point)[0]
    np.testing.assert_allclose(u_half, u_full / 2)


def _mixed(opv2v_set, *extra: str):
    return load_config(None, [f"dataset.root={opv2v_set.root}", *TINY, "dataset.sensors={default: [camera], rsu: [lidar]}",
                              "model.encoders={default: lss, rsu: pointpillars}", "model.camera.image_size=[64, 48]",
                              *extra])


def test_camera_cars_and_lidar_roadside_units_prepare_their_own_sensors(opv2v_set):
    cfg = _mixed(opv2v_set)
    data = build_dataset(cfg.dataset, "test")
    sample = next(s for s in (data[i] for i in range(0, len(data), 5)) if any(a.kind == "rsu" for a in s.agents))
    prepared = prepare_sample(sample, "projected", cfg.dataset, cfg.model, rng=np.random.default_rng(3))
    for agent, view in zip(sample.agents, prepared.agents):
        if agent.kind == "rsu":
            assert view.cameras is None and len(view.voxels.voxels) > 0
        else:  # no LiDAR: not a single pillar; four cameras in the ego frame
            assert len(view.voxels.voxels) == 0 and view.cameras is not None
            assert view.cameras.images.shape == (4, 48, 64, 3)
    batch, _, _ = collate([prepared, prepared])
    cams = batch.cameras
    assert cams is not None and cams.images.dtype == torch.uint8
    n_cars = sum(a.kind != "rsu" for a in sample.agents)
    assert len(cams.images) == 2 * 4 * n_cars
    car_slots = [i for i, k in enumerate(batch.kind.tolist()) if k == 0]
    assert sorted(set(cams.view.tolist())) == car_slots
    # a car view taken out of its sample keeps its own four images
    sub = batch.subset_views(torch.tensor(car_slots[1:2]))
    assert sub.cameras is not None and sub.cameras.view.tolist() == [0] * 4
    torch.testing.assert_close(sub.cameras.images, cams.images[cams.view == car_slots[1]])


def test_lss_and_combined_encoders_share_the_lidar_grid_and_train(opv2v_set):
    cfg = _mixed(opv2v_set, "dataset.sensors={default: [camera, lidar]}")
    torch.manual_seed(0)
    lss = build_encoder("lss", cfg.model, cfg.dataset)
    both = build_encoder("pointpillars+lss", cfg.model, cfg.dataset)
    pillars = PointPillarsEncoder(cfg.model, cfg.dataset)
    assert isinstance(lss, LiftSplatEncoder) and isinstance(both, CombinedEncoder)
    assert lss.grid == pillars.grid == both.grid and lss.out_channels == pillars.out_channels == both.out_channels
    assert set(both.inputs) == {"lidar", "cameras"}
    sample = build_dataset(cfg.dataset, "test")[0]
    batch, _, _ = collate([prepare_sample(sample, "all", cfg.dataset, cfg.model)])
    for encoder in (lss, both):
        feats = encoder(batch)
        assert feats.shape == (batch.n_agents, pillars.out_channels, pillars.grid.height, pillars.grid.width)
        feats.square().mean().backward()
        image_grad = next(encoder.parameters()).grad if encoder is lss else both.parts[1].image_net.net[0][0].weight.grad
        assert image_grad is not None and image_grad.abs().sum() > 0


def test_sensor_and_encoder_mismatch_and_early_fusion_of_images_are_refused(opv2v_set):
    with pytest.raises(ConfigError, match="rsu agents 'pointpillars'.*\\['camera'\\]"):
        build_model(_mixed(opv2v_set, "dataset.sensors={default: [camera]}"))
    cfg = _mixed(opv2v_set, "cooperation.strategy=early")
    with pytest.raises(ConfigError, match="early fusion"):
        prepare_sample(build_dataset(cfg.dataset, "test")[0], "merged", cfg.dataset, cfg.model)
    with pytest.raises(ConfigError, match="dataset.sensors"):
        load_config(None, ["dataset.sensors={vehicle: [camera]}"])


def test_dair_camera_projection_lands_on_rendered_object(dair_set):
    ds = DairV2XDataset(dair_set.root, "test", dair_set.dataset_cfg.model_copy(update={"load_cameras": True}))
    K_truth = camera_intrinsics(dair_set.cfg.camera)
    hits = 0
    for i in range(0, len(ds), 3):
        s = ds[i]
        scene = dair_set.scenes[s.scenario]
        for agent, side, mount in ((s.agents[0], "vehicle", DAIR_VEHICLE_CAMERA_MOUNT),
                                   (s.agents[1], "infrastructure", DAIR_RSU_CAMERA_MOUNT)):
            sim_agent = next(a for a in scene.agents if a.kind == agent.kind)
            t = dair_set.truth.capture_time[(side, agent.agent_id)]
            rig = _rig(scene, sim_agent, t, dair_set.cfg, mount)
            (camera,) = agent.cameras
            assert camera.image is not None
            render = render_camera(scene, t, rig.cameras_world_from_cv[0], K_truth, dair_set.cfg.camera.width,
                                   dair_set.cfg.camera.height)
            assert np.abs(camera.image.astype(float) - render.rgb).mean() < 10  # the JPEG is that render (lossy)
            # the calibration chain as read (LiDAR -> camera) matches the renderer's camera to the millimetre
            T_world_camera = dair_set.truth.T_world_lidar[(side, agent.agent_id)] @ camera.T_agent_from_camera
            np.testing.assert_allclose(T_world_camera, rig.cameras_world_from_cv[0], atol=2e-3)
            boxes = scene.vehicle_boxes(t)
            T_agent_world = np.linalg.inv(dair_set.truth.T_world_lidar[(side, agent.agent_id)])
            centres = boxes[:, :3] @ T_agent_world[:3, :3].T + T_agent_world[:3, 3]
            uv, depth = camera.project(centres)
            for (u, v), z, vid in zip(uv, depth, scene.vehicle_ids()):
                if z < 1 or not (0 <= u < camera.image.shape[1] and 0 <= v < camera.image.shape[0]):
                    continue
                hits += int(render.object_id[int(v), int(u)] == vid)
    assert hits >= 5


def test_mixed_scene_trains_and_evaluates_through_the_channel(opv2v_set, tmp_path):
    from coperception.evaluate import evaluate_method
    from coperception.pipeline.model import load_model
    from coperception.train import train

    cfg = _mixed(opv2v_set, "dataset.train_split=test", "dataset.val_split=test", "dataset.eval_split=test",
                 f"train.out_dir={tmp_path}", "train.max_steps=2", "cooperation.strategy=intermediate",
                 "fusion.method=max")
    assert train(cfg, progress=False)["steps"] == 2
    sparse = cfg.variant(codec="sparse")
    model = load_model(tmp_path / "last.pt", sparse)
    entry = evaluate_method(model, sparse, "test", progress=False, limit=4)
    assert entry["frames"] == 4 and 0.0 <= entry["ap"]["0.5"] <= 1.0
    assert entry["bytes_per_agent_frame"] > 0  # the camera cars' and roadside units' messages went over the air


def test_depth_targets_take_the_nearest_return_of_each_patch():
    rng = np.random.default_rng(4)
    K, T = _camera(rng)
    views = CameraViews(np.zeros((1, 48, 64, 3), dtype=np.uint8), K[None], T[None])
    depths = np.linspace(2.0, 30.0, 15)  # 2 m steps
    # in camera coordinates: two returns in the patch of feature pixel (row 3, col 5), one behind the other,
    # one in pixel (0, 0) beyond the last bin, one behind the camera
    def at(col, row, z):
        u, v = (col + 0.5) * 8, (row + 0.5) * 8
        return np.array([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z])
    cam = np.stack([at(5, 3, 10.2), at(5, 3, 17.0), at(0, 0, 45.0), -at(2, 2, 5.0)])
    points = cam @ T[:3, :3].T + T[:3, 3]
    bins = views.with_depth_targets(points, 8, depths).depth_bins
    assert bins is not None and bins.shape == (1, 6, 8)
    assert bins[0, 3, 5] == 4  # 10.2 m -> the 10 m bin
    assert (bins >= 0).sum() == 1


def test_depth_supervision_adds_a_training_term_that_reaches_the_depth_logits(opv2v_set):
    cfg = _mixed(opv2v_set, "model.camera.depth_loss_weight=1.0", "cooperation.strategy=intermediate")
    model = build_model(cfg).train()
    sample = build_dataset(cfg.dataset, "test")[0]
    training = prepare_sample(sample, "projected", cfg.dataset, cfg.model, model.targets, training=True)
    batch, _, _ = collate([training])
    assert batch.cameras is not None and batch.cameras.depth_bins is not None and (batch.cameras.depth_bins >= 0).any()
    out = model(batch)
    assert out.aux_loss is not None and out.aux_loss > 0
    out.aux_loss.backward()
    lss = model.encoders.nets["lss"]
    assert lss.depth_context.weight.grad is not None and lss.depth_context.weight.grad.abs().sum() > 0
    assert model.encoders.take_training_loss() is None  # handed over once
    evaluation = prepare_sample(sample, "all", cfg.dataset, cfg.model)  # no targets outside training
    assert all(v.cameras is None or v.cameras.depth_bins is None for v in evaluation.agents)

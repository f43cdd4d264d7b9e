"""Small synthetic datasets the tests make themselves (with the simulator's ground truth)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from coperception.config import DAIR_RANGE, DatasetConfig, SimulatorConfig
from coperception.datasets.sim.simulate import build_scenario
from coperception.datasets.sim.world import Scene
from coperception.datasets.sim.writers import DairCounters, Truth, write_dair_scenario, write_opv2v_scenario
from coperception.io import write_json

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "dair-v2x-c"


def small_sim_config(**overrides) -> SimulatorConfig:
    cfg = SimulatorConfig(frames=3, camera={"width": 96, "height": 72}, lidar={"beams": 24, "azimuth_steps": 512})
    return cfg.model_copy(update=overrides)


@dataclass
class SimulatedSet:
    root: Path
    scenes: dict[str, Scene]
    truth: Truth
    cfg: SimulatorConfig
    dataset_cfg: DatasetConfig


@pytest.fixture(scope="session")
def opv2v_set(tmp_path_factory) -> SimulatedSet:
    cfg = small_sim_config(min_agents=3, max_agents=4, rsu_probability=0.5)
    root = tmp_path_factory.mktemp("opv2v")
    truth = Truth()
    scenes = {}
    for index, child in enumerate(np.random.SeedSequence(7).spawn(3)):
        scene, rng = build_scenario(child, cfg, index, "opv2v")
        name = f"scenario_{index:04d}"
        write_opv2v_scenario(scene, root / "test" / name, cfg, cfg.frames, rng, 7, truth)
        scenes[name] = scene
    return SimulatedSet(root, scenes, truth, cfg, DatasetConfig(format="opv2v", root=str(root)))


@pytest.fixture(scope="session")
def dair_set(tmp_path_factory) -> SimulatedSet:
    cfg = small_sim_config(dair_offset_probability=1.0)
    root = tmp_path_factory.mktemp("dair")
    truth = Truth()
    counters = DairCounters()
    coop, vinfo, iinfo, scenes = [], [], [], {}
    for index, child in enumerate(np.random.SeedSequence(11).spawn(2)):
        scene, rng = build_scenario(child, cfg, index, "dair-v2x")
        c, v, i = write_dair_scenario(scene, root, cfg, cfg.frames, rng, counters, truth)
        coop += c
        vinfo += v
        iinfo += i
        scenes[f"batch_{index:04d}"] = scene
    write_json(root / "cooperative/data_info.json", coop)
    write_json(root / "vehicle-side/data_info.json", vinfo)
    write_json(root / "infrastructure-side/data_info.json", iinfo)
    write_json(root / "split/test.json", [Path(r["vehicle_pointcloud_path"]).stem for r in coop])
    dcfg = DatasetConfig(format="dair-v2x", root=str(root), point_cloud_range=list(DAIR_RANGE), eval_range=list(DAIR_RANGE))
    return SimulatedSet(root, scenes, truth, cfg, dcfg)

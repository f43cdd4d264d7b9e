"""Generate a synthetic benchmark on disk in the OPV2V or DAIR-V2X-C layout."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from coperception.config import SimulatorConfig
from coperception.datasets.sim.world import Scene, generate_scene
from coperception.datasets.sim.writers import DairCounters, write_dair_scenario, write_opv2v_scenario
from coperception.errors import CoperceptionError
from coperception.io import write_json

SPLITS = ("train", "validate", "test")


def split_counts(cfg: SimulatorConfig, total: int | None) -> dict[str, int]:
    """Scenarios per split: the config's counts, or `total` shared out in the same proportions."""
    counts = {s: int(cfg.scenarios.get(s, 0)) for s in SPLITS}
    if total is None:
        return counts
    weights = np.array([counts[s] for s in SPLITS], dtype=float)
    weights = weights / weights.sum() if weights.sum() > 0 else np.array([0.7, 0.1, 0.2])
    base = np.floor(weights * total).astype(int)
    if total >= len(SPLITS):  # every split gets at least one scenario
        base = np.maximum(base, 1)
    while base.sum() > total:
        base[int(np.argmax(base))] -= 1
    while base.sum() < total:
        base[int(np.argmax(weights * total - base))] += 1
    return dict(zip(SPLITS, base.tolist()))


def _agent_count(rng: np.random.Generator, cfg: SimulatorConfig) -> tuple[bool, int]:
    with_rsu = bool(rng.random() < cfg.rsu_probability)
    n = int(rng.integers(cfg.min_agents, cfg.max_agents + 1))
    return with_rsu, max(n, 2 if with_rsu else 1)


def build_scenario(seed_seq: np.random.SeedSequence, cfg: SimulatorConfig, index: int, fmt: str) -> tuple[Scene, np.random.Generator]:
    """The scene of scenario `index` and the generator that goes on to drive its sensors."""
    rng = np.random.default_rng(seed_seq)
    if fmt == "dair-v2x":  # DAIR-V2X-C: one vehicle and one roadside unit
        return generate_scene(rng, cfg, True, 2, next_id=100 + 1000 * index), rng
    with_rsu, n = _agent_count(rng, cfg)
    return generate_scene(rng, cfg, with_rsu, n, next_id=100 + 1000 * index), rng


def _opv2v_job(args: tuple) -> str:
    out, split, index, seed_seq, cfg_json, frames, seed = args
    cfg = SimulatorConfig.model_validate_json(cfg_json)
    scene, rng = build_scenario(seed_seq, cfg, index, "opv2v")
    name = f"scenario_{index:04d}"
    write_opv2v_scenario(scene, Path(out) / split / name, cfg, frames, rng, seed)
    return name


def simulate(fmt: Literal["opv2v", "dair-v2x"], out: str | Path, cfg: SimulatorConfig, scenarios: int | None = None,
             frames: int | None = None, seed: int | None = None, workers: int = 1, progress: bool = True) -> Path:
    """Write a synthetic dataset to `out` (which must be empty or absent). Same seed -> same files."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CoperceptionError(f"{out}: output folder is not empty; choose a new folder or remove it")
    frames = frames if frames is not None else cfg.frames
    seed = seed if seed is not None else cfg.seed
    counts = split_counts(cfg, scenarios)
    jobs = [(split, i) for split in SPLITS for i in range(counts[split])]
    children = np.random.SeedSequence(seed).spawn(len(jobs))
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    bar = tqdm(total=len(jobs), desc=f"simulate {fmt}", unit="scenario", disable=not progress)
    if fmt == "opv2v":
        args = [(str(tmp), split, index, child, cfg.model_dump_json(), frames, seed)
                for (split, _), index, child in zip(jobs, range(len(jobs)), children)]
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(_opv2v_job, args):
                    bar.update()
        else:
            for a in args:
                _opv2v_job(a)
                bar.update()
    elif fmt == "dair-v2x":
        counters = DairCounters()
        coop: list[dict] = []
        vinfo: list[dict] = []
        iinfo: list[dict] = []
        split_ids: dict[str, list[str]] = {s: [] for s in SPLITS}
        for (split, _), index, child in zip(jobs, range(len(jobs)), children):
            scene, rng = build_scenario(child, cfg, index, "dair-v2x")
            c, v, i = write_dair_scenario(scene, tmp, cfg, frames, rng, counters)
            coop += c
            vinfo += v
            iinfo += i
            split_ids[split] += [Path(r["vehicle_pointcloud_path"]).stem for r in c]
            bar.update()
        write_json(tmp / "cooperative/data_info.json", coop)
        write_json(tmp / "vehicle-side/data_info.json", vinfo)
        write_json(tmp / "infrastructure-side/data_info.json", iinfo)
        for split, ids in split_ids.items():
            write_json(tmp / "split" / f"{split}.json", ids)
    else:
        raise CoperceptionError(f"unknown dataset format {fmt!r}; expected 'opv2v' or 'dair-v2x'")
    bar.close()
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out

"""A reader's samples as model inputs for one cooperation strategy, and the seeded epoch order."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from coperception.config import DatasetConfig, ModelConfig
from coperception.datasets.collate import InputMode, PreparedSample, TargetFn, prepare_sample
from coperception.datasets.cooperative import CooperativeDataset
from coperception.datasets.types import CooperativeSample


class PreparedDataset(Dataset):
    """Cooperative samples turned into the views `mode` encodes (+ training targets with `targets`);
    with `augment`, each (epoch, index) gets its own seeded scene augmentation; in `training` the pillars
    kept above the cap are drawn from the same (seed, epoch, index) generator (after the augmentation).
    With `delay_frames` (training), a sample's senders come, with `delay_probability`, from 1..`delay_frames`
    frames earlier (drawn from a generator of the same (seed, epoch, index) beside the augmentation's; a
    sender without such a frame stays current). With `true_motion` (min speed m/s, most objects) the delayed
    senders' views also carry the ground truth's moving objects as they were then (`true_motion`), so the
    fusion receives their messages moved forward as motion compensation moves them at evaluation."""

    def __init__(self, inner: CooperativeDataset, dataset: DatasetConfig, model: ModelConfig, mode: InputMode,
                 targets: TargetFn | None = None, augment: bool = False, seed: int = 0, training: bool = False,
                 delay_frames: int = 0, delay_probability: float = 0.0, true_motion: tuple[float, int] | None = None):
        self.inner, self.dataset, self.model, self.mode = inner, dataset, model, mode
        self.targets, self.augment, self.seed, self.training = targets, augment, seed, training
        self.delay_frames, self.delay_probability, self.true_motion = delay_frames, delay_probability, true_motion
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> PreparedSample:
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.augment or self.training else None
        sample = self.inner[index]
        motion = None
        if self.delay_frames and rng is not None:
            delay_rng = np.random.default_rng([self.seed, self.epoch, index, 1])  # leaves the augmentation draws as they were
            if delay_rng.random() < self.delay_probability:
                frames = int(delay_rng.integers(1, self.delay_frames + 1))
                delayed = delayed_senders(sample, frames)
                if self.true_motion is not None:
                    motion = true_motion(sample, delayed, frames, *self.true_motion)
                sample = delayed
        return prepare_sample(sample, self.mode, self.dataset, self.model, self.targets,
                              rng if self.augment else None, self.training, pillar_rng=rng if self.training else None,
                              motion=motion)


def delayed_senders(sample: CooperativeSample, frames: int) -> CooperativeSample:
    """`sample` with every sender as it was `frames` frames earlier (its capture time, pose and points of
    then; a sender without that frame stays current). The ego and the ground truth stay at its frame."""
    if sample.earlier is None or len(sample.agents) < 2:
        return sample
    old = sample.earlier(frames)
    senders = [o if o is not None else a for a, o in zip(sample.agents[1:], old[1:])]
    return replace(sample, agents=[sample.agents[0], *senders])


def true_motion(now: CooperativeSample, delayed: CooperativeSample, frames: int, min_speed: float,
                max_objects: int) -> list[np.ndarray | None] | None:
    """Per agent of `delayed` (`now` with its senders `frames` frames earlier), the moving objects of the
    ground truth as its late message shows them, (K, 7) x, y, vx, vy, length, width, yaw in the ego frame:
    each object's box `frames` frames earlier and the velocity that brings it to its box now in the time the
    message is late; objects slower than `min_speed` are left out, the `max_objects` fastest kept (as senders
    send them). None for the ego and for a sender that stayed current; None in all when the reader gives no
    earlier ground truth."""
    if now.earlier_truth is None:
        return None
    old_boxes, old_ids = now.earlier_truth(frames)
    position = {int(i): k for k, i in enumerate(now.gt_ids)}
    both = np.array([int(i) in position for i in old_ids], dtype=bool)
    before = np.asarray(old_boxes, dtype=np.float64).reshape(-1, 7)[both]
    after = np.asarray(now.gt_boxes, dtype=np.float64).reshape(-1, 7)[[position[int(i)] for i in old_ids[both]]]
    ego_time = delayed.ego.capture_time
    out: list[np.ndarray | None] = [None]
    for current, agent in zip(now.agents[1:], delayed.agents[1:]):
        age = ego_time - agent.capture_time
        if agent is current or age <= 0:
            out.append(None)
            continue
        velocity = (after[:, :2] - before[:, :2]) / age
        speed = np.linalg.norm(velocity, axis=1)
        keep = np.flatnonzero(speed >= min_speed)
        keep = keep[np.argsort(-speed[keep], kind="stable")][:max_objects]
        b = before[keep]
        out.append(np.column_stack([b[:, :2], velocity[keep], b[:, 3:5], b[:, 6]]))
    return out


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, this rank's share, starting after `skip` indices (resume).
    With several ranks the permutation is padded by wrapping around so every rank gets the same
    number of samples (unequal step counts would leave one rank waiting in an all-reduce)."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1, skip: int = 0, shuffle: bool = True):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)) if shuffle else torch.arange(n)
        indices = np.resize(order.numpy(), math.ceil(n / world) * world).tolist()  # cyclic padding
        self.indices = indices[rank::world][skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

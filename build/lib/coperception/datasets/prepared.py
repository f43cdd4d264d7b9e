"""A reader's samples as model inputs for one cooperation strategy, and the seeded epoch order."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from coperception.config import DatasetConfig, ModelConfig
from coperception.datasets.collate import InputMode, PreparedSample, TargetFn, prepare_sample
from coperception.datasets.cooperative import CooperativeDataset


class PreparedDataset(Dataset):
    """Cooperative samples turned into the views `mode` encodes (+ training targets with `targets`);
    with `augment`, each (epoch, index) gets its own seeded scene augmentation; in `training` the pillars
    kept above the cap are drawn from the same (seed, epoch, index) generator (after the augmentation)."""

    def __init__(self, inner: CooperativeDataset, dataset: DatasetConfig, model: ModelConfig, mode: InputMode,
                 targets: TargetFn | None = None, augment: bool = False, seed: int = 0, training: bool = False):
        self.inner, self.dataset, self.model, self.mode = inner, dataset, model, mode
        self.targets, self.augment, self.seed, self.training = targets, augment, seed, training
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> PreparedSample:
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.augment or self.training else None
        return prepare_sample(self.inner[index], self.mode, self.dataset, self.model, self.targets,
                              rng if self.augment else None, self.training, pillar_rng=rng if self.training else None)


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

"""Opening a dataset: the reader for `dataset.format`, and a reader held in memory."""

from __future__ import annotations

from coperception.config import DatasetConfig
from coperception.datasets.cooperative import CooperativeDataset
from coperception.datasets.dair_v2x import DairV2XDataset
from coperception.datasets.opv2v import OPV2VDataset
from coperception.datasets.types import CooperativeSample
from coperception.errors import CoperceptionError

READERS = {"opv2v": OPV2VDataset, "dair-v2x": DairV2XDataset}


def build_dataset(cfg: DatasetConfig, split: str, root: str | None = None) -> CooperativeDataset:
    """The reader registered for `cfg.format`, opened on one split."""
    if cfg.format not in READERS:
        raise CoperceptionError(f"dataset.format {cfg.format!r} has no reader; known: {', '.join(READERS)}")
    return READERS[cfg.format](root or cfg.root, split, cfg)


class InMemoryDataset:
    """Every sample of a reader, read once up front (PCD parsing dominates a training step on CPU).
    DataLoader workers forked afterwards share the arrays copy-on-write."""

    def __init__(self, inner: CooperativeDataset, progress: bool = True, desc: str = "cache samples"):
        from tqdm import tqdm

        self.samples = [inner[i] for i in tqdm(range(len(inner)), desc=desc, disable=not progress, unit="sample")]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> CooperativeSample:
        return self.samples[index]

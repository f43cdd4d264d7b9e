"""Training: one loop for every cooperation method, single process or under `torchrun` (DDP, gloo on CPU)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from coperception.checkpoint import CheckpointError, check_architecture, load_checkpoint, load_state_strict, save_checkpoint
from coperception.config import ExperimentConfig
from coperception.datasets.collate import InputMode, PreparedSample, collate, prepare_sample
from coperception.datasets.cooperative import CooperativeDataset, InMemoryDataset, build_dataset
from coperception.errors import ConfigError
from coperception.fusion.methods import Method, get_method, input_mode
from coperception.models.detector import PointPillars
from coperception.models.losses import LossWeights, detection_loss


class PreparedDataset(Dataset):
    """Cooperative samples turned into model inputs (+ anchor targets) for one method."""

    def __init__(self, inner: CooperativeDataset, cfg: ExperimentConfig, mode: InputMode, anchors: np.ndarray | None,
                 augment: bool, seed: int = 0):
        self.inner, self.cfg, self.mode, self.anchors, self.augment, self.seed = inner, cfg, mode, anchors, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> PreparedSample:
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.augment else None
        return prepare_sample(self.inner[index], self.mode, self.cfg.dataset, self.cfg.model, self.anchors, rng)


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


def architecture(cfg: ExperimentConfig) -> dict[str, Any]:
    """What must match between a checkpoint and the model that loads it."""
    method = get_method(cfg.fusion.method)
    arch = {"model": cfg.model.model_dump(mode="json"), "point_cloud_range": list(cfg.dataset.point_cloud_range),
            "feature_fusion": method.feature_fusion}
    if method.message == "codes":
        cb = cfg.comm.codebook
        arch["codebook"] = {"segments": cb.segments, "stages": cb.stages, "codes": cb.codes}
    return arch


def build_model(cfg: ExperimentConfig) -> PointPillars:
    method = get_method(cfg.fusion.method)
    return PointPillars(cfg.model, cfg.dataset, method.feature_fusion, cfg.comm if method.sparse else None,
                        codebook=method.message == "codes")


def init_weights(model: PointPillars, checkpoint: str | Path, cfg: ExperimentConfig) -> list[str]:
    """Copy every weight from `checkpoint` (same model section, any fusion method); strict on names and
    shapes except that a fusion module the checkpoint lacks starts fresh (its names are returned)."""
    data = load_checkpoint(checkpoint)
    saved, expected = dict(data["arch"]), architecture(cfg)
    for key in ("feature_fusion", "codebook"):
        saved.pop(key, None)
        expected.pop(key, None)
    check_architecture(checkpoint, saved, expected)
    return load_state_strict(checkpoint, model, data["model"], fresh_prefixes=("fusion.", "quantizer."))


def load_model(checkpoint: str | Path, cfg: ExperimentConfig) -> PointPillars:
    """A model for `cfg` with the checkpoint's weights (architecture checked, strict)."""
    data = load_checkpoint(checkpoint)
    check_architecture(checkpoint, data["arch"], architecture(cfg))
    model = build_model(cfg)
    load_state_strict(checkpoint, model, data["model"])
    model.eval()
    return model


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return _Dist(dist.get_rank(), dist.get_world_size())


def fit_codebook(model: PointPillars, data: PreparedDataset, cfg: ExperimentConfig, progress: bool = False) -> float | None:
    """Fit the model's codebook by k-means on the message cells of `codebook.fit_samples` training
    samples (the same seeded choice on every rank, so DDP ranks agree); returns the relative error,
    None when those samples select no cell at all."""
    assert model.quantizer is not None
    settings = cfg.comm.codebook
    generator = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(data), generator=generator)[: settings.fit_samples].tolist()
    was_training = model.training
    model.eval()
    vectors = []
    for start in tqdm(range(0, len(order), cfg.train.batch_size), desc="codebook k-means data", disable=not progress):
        batch, _, _ = collate([data[i] for i in order[start : start + cfg.train.batch_size]])
        vectors.append(model.message_vectors(batch))
    model.train(was_training)
    x = torch.cat(vectors) if vectors else torch.zeros(0, model.quantizer.channels)
    if len(x) == 0:  # e.g. an untrained detector is confident nowhere: the first batch seeds the codes instead
        return None
    return model.quantizer.fit(x, settings.fit_iterations, generator)


def train(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
          sample_cache: dict[tuple[str, str], CooperativeDataset] | None = None) -> dict[str, Any]:
    """Train `cfg.fusion.method`; checkpoints `last.pt` / `best.pt` and TensorBoard logs go to
    `cfg.train.out_dir`. Returns a summary (steps, losses, validation AP, seconds). Several runs
    on the same data may share `sample_cache` (samples read into memory once)."""
    from torch.utils.tensorboard import SummaryWriter

    from coperception.evaluate import evaluate_method

    ddp = _init_distributed()
    torch.manual_seed(cfg.train.seed)
    method: Method = get_method(cfg.fusion.method)
    out_dir = Path(cfg.train.out_dir)
    model = build_model(cfg)
    if cfg.train.init_from and not resume:
        init_weights(model, cfg.train.init_from, cfg)
    model.message_dropout = cfg.train.message_dropout
    model.ego_supervision = cfg.train.ego_loss_weight > 0
    anchors = model.anchors_np
    freeze = cfg.train.freeze_detector
    if freeze:
        if model.quantizer is None:
            raise ConfigError("train.freeze_detector: only a codebook method has anything left to train")
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("quantizer."))
    show = progress and ddp.main

    def open_split(split: str) -> CooperativeDataset:
        if not cfg.train.cache_samples:
            return build_dataset(cfg.dataset, split)
        key = (cfg.dataset.model_dump_json(), split)
        if sample_cache is not None and key in sample_cache:
            return sample_cache[key]
        data = InMemoryDataset(build_dataset(cfg.dataset, split), show, f"read {split}")
        if sample_cache is not None:
            sample_cache[key] = data
        return data

    train_set = open_split(cfg.dataset.train_split)
    val_set = open_split(cfg.dataset.val_split) if cfg.train.validate_each_epoch and ddp.main else None
    mode = input_mode(method, cfg.fusion.project_first, training=True)
    data = PreparedDataset(train_set, cfg, mode, anchors, cfg.train.augment, cfg.train.seed)
    if model.quantizer is not None and not resume and not bool(model.quantizer.initialised):
        error = fit_codebook(model, data, cfg, show)
        if ddp.main:  # summaries print without the progress bar too (logs of unattended runs)
            tqdm.write("no selected cells to fit the codebook on: the first batch seeds it" if error is None
                       else f"codebook fitted by k-means: relative squared error {error:.4f}")
    steps_per_epoch = math.ceil(math.ceil(len(data) / ddp.world) / cfg.train.batch_size)
    total_steps = steps_per_epoch * cfg.train.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.train.lr, total_steps=max(total_steps, 1),
                                                    pct_start=0.3, div_factor=10, final_div_factor=100)
    step, best, resumed_from = 0, -1.0, None
    arch = architecture(cfg)
    last_path = out_dir / "last.pt"
    if resume:
        if not last_path.is_file():
            raise CheckpointError(f"{last_path}: --resume given but there is no checkpoint to resume from")
        state = load_checkpoint(last_path)
        check_architecture(last_path, state["arch"], arch)
        load_state_strict(last_path, model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best = int(state["step"]), float(state["best"])
        resumed_from = step
    train_model: torch.nn.Module = model
    if ddp.world > 1 and not freeze:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    writer = SummaryWriter(str(out_dir / "tensorboard")) if ddp.main else None
    weights = LossWeights()
    history: list[dict[str, float]] = []
    max_steps = min(cfg.train.max_steps or total_steps, total_steps)
    started = time.perf_counter()

    def save(path: Path, metric: float) -> None:
        if ddp.main:
            save_checkpoint(path, arch=arch, model=model.state_dict(),
                            extra={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                                   "best": metric if path.name == "best.pt" else best, "method": method.name,
                                   "config": cfg.model_dump(mode="json")})

    bar = tqdm(total=max_steps, initial=step, desc=f"train {method.name}", unit="step", disable=not show)
    while step < max_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        data.epoch = epoch
        sampler = EpochSampler(len(data), cfg.train.seed, epoch, ddp.rank, ddp.world, skip=done_in_epoch * cfg.train.batch_size)
        loader = DataLoader(data, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=cfg.train.num_workers, persistent_workers=False)
        model.train()
        if freeze:  # keep the detector's BatchNorm statistics too; only the codebook's EMA moves
            model.eval()
            assert model.quantizer is not None
            model.quantizer.train()
        epoch_losses = []
        for batch, targets, _ in loader:
            out = train_model(batch)
            losses = detection_loss(out, targets.labels, targets.residuals, targets.direction, weights)
            if out.aux_loss is not None:
                losses["total"] = losses["total"] + out.aux_loss
                losses["aux"] = out.aux_loss.detach()
            if out.ego_alone is not None:
                alone = detection_loss(out.ego_alone, targets.labels, targets.residuals, targets.direction, weights)
                losses["total"] = losses["total"] + cfg.train.ego_loss_weight * alone["total"]
                losses["ego_alone"] = alone["total"].detach()
            optimizer.zero_grad(set_to_none=True)
            if losses["total"].requires_grad:
                losses["total"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            scheduler.step()
            step += 1
            values = {k: float(v.detach()) for k, v in losses.items()}
            epoch_losses.append(values["total"])
            bar.update()
            bar.set_postfix(loss=f"{values['total']:.3f}")
            if writer is not None:
                for k, v in values.items():
                    writer.add_scalar(f"loss/{k}", v, step)
                writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
            if step % cfg.train.checkpoint_every == 0:
                save(last_path, best)
            if step >= max_steps:
                break
        end_of_epoch = step % steps_per_epoch == 0 or step >= total_steps
        record = {"epoch": epoch, "step": step, "loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan")}
        if end_of_epoch and cfg.train.validate_each_epoch and ddp.main:
            report = evaluate_method(model, cfg, cfg.dataset.val_split, method.name, progress=False, dataset=val_set)
            ap50 = report["ap"]["0.5"]
            record["val_ap50"] = ap50
            if writer is not None:
                writer.add_scalar("val/ap50", ap50, step)
            if ap50 > best:
                best = ap50
                save(out_dir / "best.pt", ap50)
        history.append(record)
        if ddp.main:
            tqdm.write(f"epoch {epoch}: step {step}, loss {record['loss']:.3f}"
                       + (f", val AP@0.5 {record['val_ap50']:.3f}" if "val_ap50" in record else ""))
        save(last_path, best)
    bar.close()
    if writer is not None:
        writer.close()
    if ddp.main and not (out_dir / "best.pt").exists():
        save(out_dir / "best.pt", best)
    return {"method": method.name, "steps": step, "resumed_from": resumed_from, "history": history, "best_val_ap50": best,
            "seconds": time.perf_counter() - started, "world_size": ddp.world, "rank": ddp.rank}

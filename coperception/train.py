"""Training: one loop for every cooperation method, single process or under `torchrun` (DDP, gloo on CPU)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from coperception.checkpoint import (CheckpointError, check_architecture, load_checkpoint, load_state_strict,
                                     require_fields, save_checkpoint)
from coperception.config import AnchorSettings, ExperimentConfig
from coperception.datasets.collate import collate
from coperception.datasets.cooperative import CooperativeDataset
from coperception.datasets.prepared import EpochSampler, PreparedDataset
from coperception.datasets.readers import InMemoryDataset, build_dataset
from coperception.device import autocast, distributed_backend, resolve_device
from coperception.errors import OutputError
from coperception.evaluate import evaluate_method
from coperception.io import read_json, write_json, write_yaml
from coperception.models.losses import LossWeights, detection_loss
from coperception.fusion.anchor_centric import anchor_loss
from coperception.models.uncertainty import uncertainty_loss
from coperception.pipeline.model import (FUSION_PREFIX, CooperativeModel, architecture, build_model, fit_codebook,
                                         init_weights, method_label, saved_architecture)
from coperception.pipeline.strategies import TrainOutput
from coperception.types import TargetBatch


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(distributed_backend(device))
    return _Dist(dist.get_rank(), dist.get_world_size())


def training_losses(out: TrainOutput, targets: TargetBatch, weights: LossWeights, ego_loss_weight: float,
                    anchors: AnchorSettings | None = None) -> dict[str, torch.Tensor]:
    """The detection loss on the fused output plus the training-only terms (codec loss, ego-alone loss,
    uncertainty head, anchor refinement)."""
    losses = detection_loss(out.head, targets.labels, targets.residuals, targets.direction, weights)
    if out.aux_loss is not None:
        losses["total"] = losses["total"] + out.aux_loss
        losses["aux"] = out.aux_loss.detach()
    if out.ego_alone is not None:
        alone = detection_loss(out.ego_alone, targets.labels, targets.residuals, targets.direction, weights)
        losses["total"] = losses["total"] + ego_loss_weight * alone["total"]
        losses["ego_alone"] = alone["total"].detach()
    if out.uncertainty is not None:
        u = out.uncertainty
        term = uncertainty_loss(u.logits, u.log_var, u.head, targets.labels[u.sample], targets.residuals[u.sample],
                                weights.focal_alpha, weights.focal_gamma)
        losses["total"] = losses["total"] + term
        losses["uncertainty"] = term.detach()
    if out.anchors is not None:
        if targets.gt_boxes is None:
            raise ValueError("anchor-centric training needs the ground-truth boxes of the batch")
        settings = anchors if anchors is not None else AnchorSettings()
        terms = anchor_loss(out.anchors.refined, targets.gt_boxes, settings.positive_iou, settings.refine_boxes)
        losses["total"] = losses["total"] + terms["anchor_total"]
        losses.update({k: v.detach() for k, v in terms.items()})
    return losses


def parameter_groups(model: torch.nn.Module, lr: float, fusion_lr_scale: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the fusion module's weights at `lr * fusion_lr_scale`, the rest
    at `lr`; one group when the scale is 1 or the fusion has no weights (as runs before the scale had, so
    their optimiser states resume)."""
    named = list(model.named_parameters())
    fusion = [p for n, p in named if n.startswith(FUSION_PREFIX)]
    if fusion_lr_scale == 1.0 or not fusion:
        return [{"params": [p for _, p in named], "lr": lr}]
    rest = [p for n, p in named if not n.startswith(FUSION_PREFIX)]
    return [{"params": rest, "lr": lr}, {"params": fusion, "lr": lr * fusion_lr_scale}]


@dataclass
class _State:
    """What a run carries from step to step and into its checkpoints."""

    model: CooperativeModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int = 0
    best: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: ExperimentConfig, resume: bool, progress: bool,
                 sample_cache: dict[tuple[str, str], CooperativeDataset] | None, overwrite: bool = False):
        self.device = resolve_device(cfg.train.device)
        self.cfg, self.ddp = cfg, _init_distributed(self.device)
        autocast(self.device, cfg.train.precision)  # an impossible precision fails before any work
        self.show = progress and self.ddp.main
        self.sample_cache = sample_cache
        self.out_dir = Path(cfg.train.out_dir)
        self.last_path = self.out_dir / "last.pt"
        self.arch = architecture(cfg)
        self.label = method_label(cfg)
        if self.ddp.main:  # before any work: a run that cannot save its checkpoints should not start
            prepare_run_folder(self.out_dir, resume, overwrite)
        # a resume that cannot work fails before a whole split is read
        self.saved = self.checked_resume_state() if resume else None
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg)
        if cfg.train.init_from and not resume:
            fresh = init_weights(model, cfg.train.init_from, cfg)
            self.log(f"weights from {cfg.train.init_from}" + (f"; starting fresh: {', '.join(fresh)}" if fresh else ""))
        self.freeze = cfg.train.freeze_detector
        if self.freeze:
            parts = model.trainable_when_frozen()
            prefixes = tuple(prefix for prefix, _ in parts)
            self.trainable = [module for _, module in parts]
            for name, param in model.named_parameters():  # (a weight its module leaves unused stays so)
                param.requires_grad_(name.startswith(prefixes) and param.requires_grad)
        model.to(self.device)
        self.train_set = self.open_split(cfg.dataset.train_split)
        self.val_set = self.open_split(cfg.dataset.val_split) if cfg.train.validate_each_epoch and self.ddp.main else None
        mode = model.strategy.input_mode(training=True, project_first=cfg.cooperation.project_first)
        self.data = PreparedDataset(self.train_set, cfg.dataset, cfg.model, mode, model.assigner, cfg.train.augment,
                                    cfg.train.seed, training=True, delay_frames=cfg.train.delay_frames,
                                    delay_probability=cfg.train.delay_probability,
                                    true_motion=(cfg.fusion.motion.min_speed_mps, cfg.fusion.motion.max_objects)
                                    if cfg.train.true_motion else None)
        if model.agent is not None and cfg.comm.codec == "codebook" and not resume \
                and not bool(model.agent.codec.quantizer.initialised):  # type: ignore[union-attr]
            self.fit_codebook(model)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.data) / self.ddp.world) / cfg.train.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        groups = parameter_groups(model, cfg.train.lr, cfg.train.fusion_lr_scale)
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                        total_steps=max(self.total_steps, 1),
                                                        pct_start=0.3, div_factor=10, final_div_factor=100)
        self.state = _State(model, optimizer, scheduler)
        self.resumed_from = self.resume() if resume else None
        self.train_model: torch.nn.Module = model
        # a frozen detector whose codebook moves by EMA only has no gradient to reduce; anything else does
        if self.ddp.world > 1 and any(p.requires_grad for p in model.parameters()):
            # with an encoder per agent kind a batch without some kind leaves that encoder without gradient
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=len(model.encoders.nets) > 1)
        # fp16 needs loss scaling against underflow; bf16 has fp32's exponent range and does not
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.precision == "fp16")
        self.pin_memory = cfg.train.pin_memory if cfg.train.pin_memory is not None else self.device.type == "cuda"
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out_dir / "tensorboard")) if self.ddp.main else None
        self.weights = LossWeights()

    def log(self, text: str) -> None:
        if self.ddp.main:  # summaries print without the progress bar too (logs of unattended runs)
            tqdm.write(text)
            with open(self.out_dir / "train.log", "a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def open_split(self, split: str) -> CooperativeDataset:
        cfg = self.cfg
        if not cfg.train.cache_samples:
            return build_dataset(cfg.dataset, split)
        key = (cfg.dataset.model_dump_json(), split)
        if self.sample_cache is not None and key in self.sample_cache:
            return self.sample_cache[key]
        data = InMemoryDataset(build_dataset(cfg.dataset, split), self.show, f"read {split}")
        if self.sample_cache is not None:
            self.sample_cache[key] = data
        return data

    def fit_codebook(self, model: CooperativeModel) -> None:
        """k-means start of the codebook on the message cells of `codebook.fit_samples` training samples
        (the same seeded choice on every rank, so DDP ranks agree)."""
        settings, bs = self.cfg.comm.codebook, self.cfg.train.batch_size
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        order = torch.randperm(len(self.data), generator=generator)[: settings.fit_samples].tolist()
        batches = (collate([self.data[i] for i in order[s : s + bs]])[0] for s in range(0, len(order), bs))
        error = fit_codebook(model, batches, self.show, settings.fit_iterations, generator)
        self.log("no selected cells to fit the codebook on: the first batch seeds it" if error is None
                 else f"codebook fitted by k-means: relative squared error {error:.4f}")

    def checked_resume_state(self) -> dict[str, Any]:
        """`last.pt` of this run, with everything a resume needs and this config's architecture."""
        if not self.last_path.is_file():
            raise CheckpointError(f"{self.last_path}: --resume given but there is no checkpoint to resume from")
        saved = load_checkpoint(self.last_path)
        require_fields(self.last_path, saved, ("optimizer", "scheduler", "step", "best"))
        check_architecture(self.last_path, saved_architecture(saved["arch"]), self.arch)
        return saved

    def resume(self) -> int:
        saved, self.saved = self.saved, None  # not kept in memory for the whole run
        assert saved is not None
        s = self.state
        load_state_strict(self.last_path, s.model, saved["model"])
        s.optimizer.load_state_dict(saved["optimizer"])
        s.scheduler.load_state_dict(saved["scheduler"])
        s.step, s.best = int(saved["step"]), float(saved["best"])
        return s.step

    def save(self, path: Path, metric: float) -> None:
        if not self.ddp.main:
            return
        s = self.state
        save_checkpoint(path, arch=self.arch, model=s.model.state_dict(),
                        extra={"optimizer": s.optimizer.state_dict(), "scheduler": s.scheduler.state_dict(), "step": s.step,
                               "best": metric if path.name == "best.pt" else s.best, "method": self.label,
                               "config": self.cfg.model_dump(mode="json")})

    def step(self, batch, targets: TargetBatch) -> float:
        """One optimiser step; returns the total loss."""
        s = self.state
        batch, targets = batch.to(self.device), targets.to(self.device, non_blocking=self.pin_memory)
        with autocast(self.device, self.cfg.train.precision):
            out = self.train_model(batch)
            losses = training_losses(out, targets, self.weights, self.cfg.train.ego_loss_weight,
                                     self.cfg.fusion.anchor)
        s.optimizer.zero_grad(set_to_none=True)
        if losses["total"].requires_grad:
            self.scaler.scale(losses["total"]).backward()
            self.scaler.unscale_(s.optimizer)
            torch.nn.utils.clip_grad_norm_(s.model.parameters(), 10.0)
            self.scaler.step(s.optimizer)  # skipped by the fp16 scaler when a gradient overflowed
            self.scaler.update()
        else:  # nothing to differentiate (e.g. a frozen detector whose codebook moves by EMA only)
            s.optimizer.step()
        s.scheduler.step()
        s.step += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"loss/{k}", v, s.step)
            self.writer.add_scalar("lr", s.scheduler.get_last_lr()[0], s.step)
        if s.step % self.cfg.train.checkpoint_every == 0:
            self.save(self.last_path, s.best)
        return values["total"]

    def end_of_epoch(self, epoch: int, losses: list[float]) -> None:
        """Validate (main rank, whole epochs only), keep the best checkpoint, log, save last.pt."""
        s = self.state
        record = {"epoch": epoch, "step": s.step, "loss": float(np.mean(losses)) if losses else float("nan")}
        whole = s.step % self.steps_per_epoch == 0 or s.step >= self.total_steps
        if whole and self.cfg.train.validate_each_epoch and self.ddp.main:
            report = evaluate_method(s.model, self.cfg, self.cfg.dataset.val_split, progress=False, dataset=self.val_set)
            ap50 = report["ap"]["0.5"]
            record["val_ap50"] = ap50
            if self.writer is not None:
                self.writer.add_scalar("val/ap50", ap50, s.step)
            if ap50 > s.best:
                s.best = ap50
                self.save(self.out_dir / "best.pt", ap50)
        s.history.append(record)
        self.log(f"epoch {epoch}: step {s.step}, loss {record['loss']:.3f}"
                 + (f", val AP@0.5 {record['val_ap50']:.3f}" if "val_ap50" in record else ""))
        self.save(self.last_path, s.best)

    def set_train_mode(self) -> None:
        model = self.state.model
        model.train()
        if self.freeze:  # keep the detector's BatchNorm statistics too; only what trains is in training mode
            model.eval()
            for module in self.trainable:
                module.train()

    def run(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        started = time.perf_counter()
        max_steps = min(cfg.train.max_steps or self.total_steps, self.total_steps)
        bar = tqdm(total=max_steps, initial=s.step, desc=f"train {self.label}", unit="step", disable=not self.show)
        while s.step < max_steps:
            epoch, done_in_epoch = divmod(s.step, self.steps_per_epoch)
            self.data.epoch = epoch
            sampler = EpochSampler(len(self.data), cfg.train.seed, epoch, self.ddp.rank, self.ddp.world,
                                   skip=done_in_epoch * cfg.train.batch_size)
            loader = DataLoader(self.data, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate,
                                num_workers=cfg.train.num_workers, persistent_workers=False, pin_memory=self.pin_memory)
            self.set_train_mode()
            losses = []
            for batch, targets, _ in loader:
                losses.append(self.step(batch, targets))
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if s.step >= max_steps:
                    break
            self.end_of_epoch(epoch, losses)
        bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.ddp.main and not (self.out_dir / "best.pt").exists():
            self.save(self.out_dir / "best.pt", s.best)
        return {"method": self.label, "steps": s.step, "resumed_from": self.resumed_from, "history": s.history,
                "best_val_ap50": s.best, "seconds": time.perf_counter() - started, "world_size": self.ddp.world,
                "rank": self.ddp.rank, "device": str(self.device), "precision": self.cfg.train.precision}


def train(cfg: ExperimentConfig, resume: bool = False, progress: bool = True,
          sample_cache: dict[tuple[str, str], CooperativeDataset] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train the cooperation `cfg` describes into the run folder `cfg.train.out_dir` (checkpoints
    `last.pt` / `best.pt`, TensorBoard logs, the resolved `config.yaml`, `run.json` with the command
    line and git revision, `train.log`). A folder holding an earlier run is refused unless `resume`
    continues it or `overwrite` replaces it. Returns a summary (steps, losses, validation AP, seconds).
    Several runs on the same data may share `sample_cache` (samples read into memory once)."""
    trainer = Trainer(cfg, resume, progress, sample_cache, overwrite)
    if trainer.ddp.main:
        record_run(trainer.out_dir, cfg, resume)
    return trainer.run()


# what a training run writes into its folder; `--overwrite` removes exactly these
RUN_FILES = ("last.pt", "best.pt", "tensorboard", "config.yaml", "run.json", "train.log", "summary.json")


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run folder, refusing to mix two runs in one: a non-empty folder needs `resume`
    (continue the run there) or `overwrite` (its run files are removed first)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(out_dir, "train.out_dir is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not resume:
        if not overwrite:
            held = sorted(p.name for p in out_dir.iterdir())[:6]
            raise OutputError(out_dir, f"train.out_dir is not empty (holds {', '.join(held)}): pass --resume to "
                                       "continue that run, --overwrite to replace it, or choose another folder")
        for name in RUN_FILES:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out_dir, exc.strerror or type(exc).__name__) from None
    if not os.access(out_dir, os.W_OK):
        raise OutputError(out_dir, "no write permission")


def git_revision() -> str | None:
    """The checkout's commit (with `-dirty` when it has uncommitted changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def record_run(out_dir: Path, cfg: ExperimentConfig, resume: bool) -> None:
    """Keep beside the checkpoints what reproduces the run: the resolved config and, per invocation,
    the command line, the git revision and the time (a resume adds an entry)."""
    write_yaml(out_dir / "config.yaml", cfg.model_dump(mode="json"))
    runs_path = out_dir / "run.json"
    previous = read_json(runs_path) if resume and runs_path.is_file() else {}
    invocations = previous.get("invocations", []) if isinstance(previous, dict) else []
    invocations.append({"command": [sys.executable, *sys.argv], "git_revision": git_revision(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resume": resume,
                        "world_size": int(os.environ.get("WORLD_SIZE", "1"))})
    write_json(runs_path, {"invocations": invocations})

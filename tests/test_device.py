"""One device switch for training and evaluation: the same losses on CPU and CUDA (CUDA tests run
where a GPU is present and are skipped otherwise), mixed precision, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from coperception.config import load_config
from coperception.datasets.collate import collate
from coperception.datasets.prepared import PreparedDataset
from coperception.datasets.readers import build_dataset
from coperception.device import autocast, distributed_backend, resolve_device
from coperception.errors import ConfigError
from coperception.models.losses import LossWeights
from coperception.pipeline.model import build_model
from coperception.train import train, training_losses
from test_train import TINY

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _config(opv2v_set, *extra):
    # the tests' tiny model, two samples a batch, the small simulated set's one split for everything
    return load_config(None, [f"dataset.root={opv2v_set.root}", *TINY, "train.batch_size=2", "dataset.train_split=test",
                              "dataset.val_split=test", "dataset.eval_split=test", *extra])


def _step_losses(cfg, device: str, precision: str = "fp32") -> tuple[dict[str, float], float]:
    """Losses of one forward pass of a seeded model on two samples, and the gradient norm."""
    torch.manual_seed(0)
    model = build_model(cfg)
    data = PreparedDataset(build_dataset(cfg.dataset, "test"), cfg.dataset, cfg.model,
                           model.strategy.input_mode(True, cfg.cooperation.project_first), model.assigner, training=True)
    batch, targets, _ = collate([data[0], data[3]])
    model = copy.deepcopy(model).to(device).train()
    with autocast(torch.device(device), precision):
        out = model(batch.to(device))
        losses = training_losses(out, targets.to(device), LossWeights(), cfg.train.ego_loss_weight)
    losses["total"].backward()
    grad = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return {k: float(v.detach()) for k, v in losses.items()}, float(grad)


@pytest.mark.parametrize("strategy", ["none", "intermediate"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_one_step_same_losses_on_every_device(opv2v_set, device, strategy):
    cfg = _config(opv2v_set, f"cooperation.strategy={strategy}", "comm.codec=sparse")
    reference, ref_grad = _step_losses(cfg, "cpu")
    got, grad = _step_losses(cfg, device)
    assert reference["total"] > 0
    for key, value in reference.items():
        assert got[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    assert grad == pytest.approx(ref_grad, rel=1e-3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_bf16_autocast_stays_close_to_fp32(opv2v_set, device):
    cfg = _config(opv2v_set, "cooperation.strategy=intermediate")
    fp32, _ = _step_losses(cfg, device)
    bf16, _ = _step_losses(cfg, device, "bf16")
    assert bf16["total"] == pytest.approx(fp32["total"], rel=0.05)


def test_training_runs_with_bf16_and_reports_its_device(opv2v_set, tmp_path):
    cfg = _config(opv2v_set, f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2", "train.precision=bf16",
                  "train.device=cpu", "cooperation.strategy=intermediate")
    summary = train(cfg, progress=False)
    assert summary["steps"] == 2 and summary["device"] == "cpu" and summary["precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])


def test_device_names_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert distributed_backend(torch.device("cpu")) == "gloo"
    assert distributed_backend(torch.device("cuda", 0)) == "nccl"
    with pytest.raises(ConfigError, match="'tpu' is not a device"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="only cpu and cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA device"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            autocast(torch.device("cpu"), "fp16")
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["train.precision=fp8"])

"""Checkpoints: atomic saves, `weights_only=True` loads, and a refusal to load the wrong model.

A checkpoint records the architecture it was trained with (model config + fusion method).
Loading compares it with the model at hand and checks every tensor name and shape; nothing
is silently skipped (OpenPCDet's habit)."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from coperception.errors import CoperceptionError
from coperception.io import atomic_write_bytes

FORMAT = "coperception-checkpoint"
VERSION = 1


class CheckpointError(CoperceptionError):
    """A checkpoint that cannot be used, with the reason."""


def save_checkpoint(path: str | Path, *, arch: dict[str, Any], model: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "arch": arch, "model": model, **extra}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; a corrupt or foreign file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a coperception checkpoint (no '{FORMAT}' marker)")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {data.get('version')} is not supported (expected {VERSION})")
    missing = [k for k in ("arch", "model") if not isinstance(data.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)} (an incomplete or foreign file)")
    if isinstance(data.get("config"), dict):
        drop_retired_settings(data["config"])
    return data


# evaluation-time settings a stored config may hold that no longer exist (they change no weight): dropped
# when a checkpoint is read, so its model still evaluates; a YAML config that names them is still refused
RETIRED_SETTINGS = (("fusion", "motion", "smoothing"),)  # the tracker's smoothing, now a least-squares `window`


def drop_retired_settings(config: dict[str, Any]) -> None:
    """Remove `RETIRED_SETTINGS` from a stored config, in place."""
    for *parents, name in RETIRED_SETTINGS:
        section: Any = config
        for key in parents:
            section = section.get(key) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(name, None)


def require_fields(path: str | Path, data: dict[str, Any], fields: tuple[str, ...]) -> None:
    """A checkpoint holds `fields` (e.g. the optimizer state a resume needs), else a CheckpointError naming them."""
    missing = [k for k in fields if k not in data]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")


def check_architecture(path: str | Path, saved: dict[str, Any], expected: dict[str, Any]) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {expected.get(k)!r}"
             for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
    if diffs:
        raise CheckpointError(f"{path}: checkpoint is for another architecture: " + "; ".join(diffs[:6]))


def load_state_strict(path: str | Path, module: torch.nn.Module, state: dict[str, torch.Tensor],
                      fresh_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load every tensor or none: missing, unexpected and mis-shaped names are all reported.
    Names under `fresh_prefixes` (e.g. a new fusion module) may be absent and keep their
    initial values; they are returned so the caller can say so."""
    own = module.state_dict()
    fresh = sorted(k for k in set(own) - set(state) if k.startswith(fresh_prefixes)) if fresh_prefixes else []
    missing = sorted(set(own) - set(state) - set(fresh))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:5]}")
        raise CheckpointError(f"{path}: weights do not fit the model: " + "; ".join(parts))
    broken = [k for k, v in state.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(f"{path}: non-finite values in {broken[:5]}" + (f" and {len(broken) - 5} more" if len(broken) > 5 else ""))
    module.load_state_dict(state, strict=not fresh)
    return fresh

"""Atomic writes and validated reads of YAML/JSON files."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from coperception.errors import DataFormatError, OutputError

try:  # libyaml is ~10x faster; PyYAML wheels ship it
    _YamlLoader: Any = yaml.CSafeLoader
    _YamlDumper: Any = yaml.CSafeDumper
except AttributeError:  # pragma: no cover
    _YamlLoader = yaml.SafeLoader
    _YamlDumper = yaml.SafeDumper

M = TypeVar("M", bound=BaseModel)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o666) -> None:
    """Write `data` to `path` through a temporary file and `os.replace`. The file gets `mode` less the
    process umask, as `open` would give it (teammates on a shared server can read datasets, checkpoints
    and reports); secrets pass `mode=0o600`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise OutputError(path, exc.strerror or type(exc).__name__) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # e.g. the disk is full: nothing half-written is left behind
            raise OutputError(path, exc.strerror or type(exc).__name__) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_yaml(path: str | Path, data: Any) -> None:
    atomic_write_text(path, yaml.dump(data, Dumper=_YamlDumper, sort_keys=False, default_flow_style=None))


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent))


def read_bytes(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataFormatError(path, "file does not exist") from None
    except OSError as exc:
        raise DataFormatError(path, f"cannot be read ({exc.strerror})") from None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a syntax error or a missing file raises DataFormatError."""
    text = read_bytes(path)
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as exc:
        raise DataFormatError(path, f"invalid YAML: {exc}") from None


def read_json(path: str | Path) -> Any:
    text = read_bytes(path)
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, f"invalid JSON: {exc}") from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `field.path: message (got value)`."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        got = err.get("input")
        shown = repr(got)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"{where}: {err['msg']} (got {shown})")
    return "; ".join(lines)


def validate(model: type[M], data: Any, path: str | Path) -> M:
    """Validate parsed file content against a pydantic model, naming the file on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DataFormatError(path, format_validation_error(exc)) from None

"""Project exceptions. Every error names the file or field at fault and what was expected."""

from __future__ import annotations

from pathlib import Path


class CoperceptionError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(CoperceptionError):
    """A configuration file or override is invalid."""


class DataFormatError(CoperceptionError):
    """A dataset file is missing, truncated or does not follow its format."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutputError(CoperceptionError):
    """An output cannot be written (a parent that is a file, no permission, disk full)."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        super().__init__(f"{self.path}: cannot write ({problem})")

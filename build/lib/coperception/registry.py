"""Named variants of a stage (encoders, message codecs, fusions, cooperation strategies), chosen by config."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from coperception.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> variants. `key` is the config key that names a variant, for error messages."""

    def __init__(self, key: str):
        self.key = key
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.key}: {name!r} is registered twice")
            self._items[name] = item
            return item
        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(f"{self.key} {name!r} is unknown; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

"""Tiny name -> object registries (in the spirit of timm's register_model).

Tests parametrize over ``Registry.names()`` so every registered thing is exercised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from hwkd.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise a ConfigError listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"Unknown {self.kind} {name!r}.", f"Choose one of: {', '.join(sorted(self._items))}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

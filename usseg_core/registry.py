"""The one registry helper behind every named thing usseg builds: heads, datasets, backbones, edge detectors.

A :class:`Registry` maps a name (the string that appears in configs, deployment names and artifact
metadata) to its declaration. Registering a name twice is an error, and an unknown name fails with one
message shape everywhere::

    unknown backbone 'vit_huge'; known: tf_efficientnet_lite0, vit_base_patch14_dinov2.lvd142m, ...

Torch-free and import-light: the CLI's help reads registries built on it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from usseg_core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> entry, in registration order.

    Args:
        kind: what the entries are, in the user's words ("head", "dataset", "backbone", "edge detector");
            it starts every error message.
        load: called before every read, for registries whose built-in entries register themselves on
            import of modules too heavy to import eagerly (the learned edge detectors import torch).
    """

    def __init__(self, kind: str, load: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._load = load
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; re-registering the same object (a re-imported module) is a no-op.

        Raises:
            ConfigError: ``name`` is already registered to another entry.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{self.kind} name must be a non-empty string, got {name!r}")
        existing = self._entries.get(name)
        if existing is not None and existing is not entry:
            raise ConfigError(f"{self.kind} {name!r} is already registered ({_describe(existing)})")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` if present (tests that register toy entries clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry of ``name``.

        Raises:
            ConfigError: ``unknown <kind> '<name>'; known: a, b, c``.
        """
        self._loaded()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}") from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self._loaded()
        return list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs, in registration order."""
        self._loaded()
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self._loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._loaded()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def _loaded(self) -> None:
        if self._load is not None:
            load, self._load = self._load, None  # once; a failing load is retried on the next read
            try:
                load()
            except BaseException:
                self._load = load
                raise


def _describe(entry: object) -> str:
    name = getattr(entry, "__qualname__", None) or type(entry).__qualname__
    module = getattr(entry, "__module__", None)
    return f"{module}.{name}" if module else name

"""The one dataset registry: a name (as used in configs, deployments and artifact keys) -> class."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from usseg_core.datasets.base import Dataset
from usseg_core.errors import ConfigError

_REGISTRY: dict[str, type[Dataset]] = {}

D = TypeVar("D", bound=type[Dataset])


def register_dataset(name: str) -> Callable[[D], D]:
    """Class decorator registering a :class:`Dataset` subclass under ``name`` (sets ``cls.name``)."""

    def decorator(cls: D) -> D:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"dataset name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def dataset_class(name: str) -> type[Dataset]:
    """The class registered as ``name`` (its protocol attributes, without touching any folder)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}") from None


def get_dataset(name: str, root: str | Path, split: str, **options) -> Dataset:
    """Build the dataset ``name`` over ``root`` for ``split``.

    Args:
        name: registry name ("cocostuff27", "cityscapes27", "potsdam3", "camvid11", "directory",
            "synthetic").
        root: dataset root folder.
        split: split name (dataset-specific, e.g. "train", "val").
        **options: dataset-specific options (e.g. ``curated=False`` for cocostuff27).

    Raises:
        ConfigError: unknown name (the message lists known names), unknown split or option.
        InputError: missing root/split folder, or no images (the message names the folder).
    """
    cls = dataset_class(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p not in ("self", "root", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"dataset {name!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(accepted) or 'none'}"
        )
    return cls(root, split, **options)

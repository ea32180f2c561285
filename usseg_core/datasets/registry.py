"""The one dataset registry: a name (as used in configs, deployments and artifact keys) -> class."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from usseg_core.datasets.base import Dataset
from usseg_core.datasets.protocol import DatasetProtocol
from usseg_core.errors import ConfigError
from usseg_core.registry import Registry

DATASETS: Registry[type[Dataset]] = Registry("dataset")

D = TypeVar("D", bound=type[Dataset])


def register_dataset(name: str) -> Callable[[D], D]:
    """Class decorator registering a :class:`Dataset` subclass under ``name`` (sets ``cls.name``)."""

    def decorator(cls: D) -> D:
        if not isinstance(cls.__dict__.get("protocol"), DatasetProtocol):
            raise ConfigError(f"dataset {name!r} ({cls.__name__}) declares no protocol of its own: set "
                              "protocol = DatasetProtocol(...) in its class body (usseg_core/datasets/protocol.py)")
        DATASETS.register(name, cls)
        cls.name = name
        return cls

    return decorator


def unregister_dataset(name: str) -> None:
    """Remove a dataset (tests that register toy datasets clean up with this)."""
    DATASETS.unregister(name)


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(DATASETS.names())


def dataset_class(name: str) -> type[Dataset]:
    """The class registered as ``name`` (its protocol attributes, without touching any folder)."""
    return DATASETS.get(name)


def dataset_protocol(name: str) -> DatasetProtocol:
    """The protocol the dataset ``name`` declares (folder, views, HSG schedule and grid)."""
    return dataset_class(name).protocol


def dataset_folders() -> dict[str, str]:
    """Registry name -> subfolder of ``$USSEG_DATA_ROOT``, in registration order, for every dataset that has
    a standard folder (a user's ``directory`` has none)."""
    return {name: cls.protocol.folder for name, cls in DATASETS.items() if cls.protocol.folder is not None}


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

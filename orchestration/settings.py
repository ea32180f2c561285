"""Where things are, resolved in one order by every entry point: flag -> environment -> Prefect variable
-> default.

| setting      | flag / flow parameter | environment        | Prefect variable   | default                     |
|--------------|-----------------------|--------------------|--------------------|-----------------------------|
| storage root | ``--storage``/storage | ``USSEG_STORAGE``  | ``usseg_storage``  | ``./storage``               |
| data root    | ``--data-root``       | ``USSEG_DATA_ROOT``| ``usseg_data_root``| synthetic: generated scenes |

``USSEG_DATA_ROOT`` (and the variable) name a folder with one subfolder per dataset
(each dataset's ``protocol.folder``); ``--data-root`` names the dataset's own folder. Prefect variables are read only
when a Prefect API is at hand (inside a run, ``PREFECT_API_URL`` set, or a command's flow on a running
``usseg up`` service, its look-up pass included: ``commands/launch.py``): a plain command never starts a
temporary server just to read one. A command resolves its storage root before it looks for the service
(the service is found through it): with the service alone, the variable ``usseg_storage`` does not move a
command's storage; with ``PREFECT_API_URL`` set it does.
"""
from __future__ import annotations

import os
from pathlib import Path

from usseg_core.config import DATA_ROOT_ENV, DEFAULT_STORAGE, STORAGE_ENV, first_set
from usseg_core.errors import ConfigError

if False:  # typing only
    from usseg_core.remote import RemoteRoot  # noqa: F401

STORAGE_VARIABLE = "usseg_storage"
DATA_ROOT_VARIABLE = "usseg_data_root"


# The default synthetic set (the same scenes as `usseg demo` with its defaults).
SYNTHETIC_DEFAULT = {"n_train": 40, "n_val": 12}


def _api_at_hand() -> bool:
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    return FlowRunContext.get() is not None or bool(PREFECT_API_URL.value())


def prefect_variable(name: str) -> str | None:
    """The Prefect variable ``name``, or None (unset, or no Prefect API at hand)."""
    if not _api_at_hand():
        return None
    from prefect.variables import Variable

    try:
        value = Variable.get(name, default=None)
    except Exception:  # noqa: BLE001 - an unreachable API must not break a local run
        return None
    return None if value is None else str(value)


def resolve(flag: str | os.PathLike | None, env: str, variable: str, default: str | None) -> str | None:
    """The first set value of: flag, ``$env``, Prefect variable ``variable``, ``default``."""
    value = first_set(flag, os.environ.get(env))
    if value is None:
        value = first_set(prefect_variable(variable), default)
    return value


def storage_root(flag: str | os.PathLike | None = None) -> "Path | RemoteRoot":
    """The artifact root: an absolute folder (``file://`` URLs accepted), or an object store's URL
    (``s3://bucket/prefix``; usseg_core/remote.py) as a :class:`RemoteRoot`, whose ``str`` is the URL and
    whose ``/`` is a path in its local mirror."""
    value = resolve(flag, STORAGE_ENV, STORAGE_VARIABLE, DEFAULT_STORAGE)
    if value.startswith("file://"):
        value = value.removeprefix("file://")
    elif "://" in value:
        from usseg_core.remote import RemoteRoot

        return RemoteRoot(value)
    return Path(value).expanduser().resolve()


def data_root(dataset: str, flag: str | os.PathLike | None = None,
              storage: str | os.PathLike | None = None) -> str:
    """The root folder of ``dataset``.

    ``flag`` is the dataset's own folder; otherwise ``<USSEG_DATA_ROOT or usseg_data_root>/<folder>`` with
    the folder the dataset's protocol declares (its name for a user's ``directory``). With neither, ``synthetic`` is rendered (once) under
    ``<storage>/data/synthetic-40-12``; any other dataset is a ConfigError that says what to set.
    """
    if first_set(flag) is not None:
        return str(Path(str(flag)).expanduser().resolve())
    parent = resolve(None, DATA_ROOT_ENV, DATA_ROOT_VARIABLE, None)
    from usseg_core.datasets.registry import dataset_protocol

    folder = dataset_protocol(dataset).folder or dataset
    if parent is not None and (Path(parent).expanduser() / folder).is_dir():
        return str((Path(parent).expanduser() / folder).resolve())
    if dataset == "synthetic":
        from usseg_core.datasets.synthetic import ensure_synthetic

        n_train, n_val = SYNTHETIC_DEFAULT["n_train"], SYNTHETIC_DEFAULT["n_val"]
        target = storage_root(storage) / "data" / f"synthetic-{n_train}-{n_val}"
        return str(ensure_synthetic(target, n_train=n_train, n_val=n_val))
    where = f"{parent}/{folder} does not exist" if parent else f"${DATA_ROOT_ENV} is not set"
    raise ConfigError(f"no data root for dataset {dataset!r}: {where}. Pass --data-root (flow parameter "
                      f"data_root), or set ${DATA_ROOT_ENV} or the Prefect variable {DATA_ROOT_VARIABLE!r} "
                      f"to a folder holding {folder}/")

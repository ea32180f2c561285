"""Names and defaults of usseg's settings, and ``--set`` parsing.

Resolution (flag, environment, Prefect variable, default) lives in ``orchestration/settings.py``: the variable step
needs Prefect, which the core never imports.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

STORAGE_ENV = "USSEG_STORAGE"
DATA_ROOT_ENV = "USSEG_DATA_ROOT"
DEFAULT_STORAGE = "./storage"


def first_set(*values: str | os.PathLike | None) -> str | None:
    """The first value that is neither None nor empty."""
    for v in values:
        if v is not None and str(v) != "":
            return str(v)
    return None


def positive_int_env(name: str, default: int, unit: str) -> int:
    """The positive integer in environment variable ``name``, or ``default`` when it is unset or blank; any
    other value is a ConfigError naming the variable (``unit`` says what it counts)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        from usseg_core.errors import ConfigError

        raise ConfigError(f"{name}={raw!r}: must be a positive integer ({unit})")
    return value


def parse_set_options(items: list[str] | None) -> dict[str, object]:
    """``key=value`` pairs from ``--set`` into a dict; values parsed as JSON when they parse."""
    import json

    out: dict[str, object] = {}
    for item in items or []:
        if "=" not in item:
            from usseg_core.errors import ConfigError

            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# A config field declared with ``dataclasses.field(..., metadata=KEYED_WHEN_SET)`` enters the JSON form of
# its dataclass (:func:`keyed_asdict`: hence artifact keys, meta.json's params, head.pt's config and the
# resume check of a training checkpoint) only when its value differs from its default. An option added
# later whose default reproduces the old behaviour thus leaves every existing key, cache and checkpoint
# valid; whoever reads a saved config takes the field's default where it is absent (``PicieTrained`` reads
# its ``centroids`` so). Tests: tests/core/test_registry.py (the key), tests/flows/test_artifact_keys.py.
KEYED_WHEN_SET = {"keyed": "when-set"}


def keyed_asdict(obj: Any) -> dict:
    """``dataclasses.asdict(obj)`` less the fields marked :data:`KEYED_WHEN_SET` that hold their default."""
    out = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        if f.metadata.get("keyed") != KEYED_WHEN_SET["keyed"]:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if out[f.name] == default:
            del out[f.name]
    return out

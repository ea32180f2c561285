"""Names and defaults of usseg's settings, and ``--set`` parsing.

Resolution (flag, environment, Prefect variable, default) lives in ``orchestration/settings.py``: the variable step
needs Prefect, which the core never imports.
"""
from __future__ import annotations

import os

STORAGE_ENV = "USSEG_STORAGE"
DATA_ROOT_ENV = "USSEG_DATA_ROOT"
DEFAULT_STORAGE = "./storage"


def first_set(*values: str | os.PathLike | None) -> str | None:
    """The first value that is neither None nor empty."""
    for v in values:
        if v is not None and str(v) != "":
            return str(v)
    return None


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

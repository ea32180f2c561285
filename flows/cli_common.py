"""Pieces shared by the CLI modules (options and formatting)."""
from __future__ import annotations

import typer

StorageOpt = typer.Option(None, "--storage", help="Artifact root (default $USSEG_STORAGE, Prefect variable "
                          "usseg_storage, else ./storage).")


def human(n: float) -> str:
    """Bytes as a short human-readable size."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

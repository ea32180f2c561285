"""Pieces shared by the CLI modules (options and formatting)."""
from __future__ import annotations

import typer

StorageOpt = typer.Option(None, "--storage", help="Artifact root (default $USSEG_STORAGE, Prefect variable "
                          "usseg_storage, else ./storage).")
RunnerOpt = typer.Option("threads", "--runner", "--dask-address",
                         help="Task runner: threads[:N] | dask[:N] (local cluster) | tcp://host:port "
                         "(existing Dask cluster)")
# The options `usseg run` and `usseg compare` share (one definition, one help text).
DatasetOpt = typer.Option(..., help="Dataset registry name.")
DataRootOpt = typer.Option(None, "--data-root",
                           help="Dataset root folder (default: $USSEG_DATA_ROOT/<dataset folder>).")
TrainSplitOpt = typer.Option("train", help="Training split(s), comma-separated (labels unused).")
BackboneOpt = typer.Option("tf_efficientnet_lite0", help="Backbone registry name.")
WeightsOpt = typer.Option(None, help="Local backbone weights file.")
RandomWeightsOpt = typer.Option(False, "--random-weights", help="Random init (tests).")
ResolutionOpt = typer.Option(224, help="Training resolution (five-crops, view-bank frame).")
EvalResolutionOpt = typer.Option(None, help="Override the eval protocol's resolution.")
CrfOpt = typer.Option(True, "--crf/--no-crf", help="Dense CRF refinement rows.")


def human(n: float) -> str:
    """Bytes as a short human-readable size."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"

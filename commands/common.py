"""Pieces shared by the CLI modules (options and formatting)."""
from __future__ import annotations

import logging
import sys

import typer

from orchestration import console
from orchestration.compat import stop_temporary_server
from usseg_core.spec import DataSpec, RunSettings



def spec_default(cls: type, name: str):
    """The default of spec field ``name`` (the one place defaults are written: usseg_core/spec.py)."""
    return cls.model_fields[name].get_default(call_default_factory=True)


def spec_choices(cls: type, name: str) -> tuple[str, ...]:
    """The values a ``Literal`` spec field accepts."""
    from typing import get_args

    return get_args(cls.model_fields[name].annotation)


def choice_of(flag: str, cls: type, name: str, spellings: dict | None = None):
    """A typer callback: the option's value must be one of the spec field's choices (a usage error, exit 2,
    otherwise). ``spellings`` maps command-line spellings to spec values (``--on-error fail`` -> raise)."""
    spellings = spellings or {}

    def check(value):
        if value is None:
            return value
        value = spellings.get(value, value)
        valid = spec_choices(cls, name)
        if value not in valid:
            shown = [k for k, v in spellings.items() if v in valid] + [v for v in valid if v not in spellings.values()]
            use = " or ".join(shown) if len(shown) == 2 else "one of " + ", ".join(shown)
            raise typer.BadParameter(f"{flag} {value!r}: use {use}")
        return value

    return check


StorageOpt = typer.Option(None, "--storage", help="Artifact root (default $USSEG_STORAGE, Prefect variable "
                          "usseg_storage, else ./storage).")
RunnerOpt = typer.Option(spec_default(DataSpec, "task_runner"), "--runner", "--dask-address",
                         help="Task runner: threads[:N] | dask[:N] (local cluster) | tcp://host:port "
                         "(existing Dask cluster)")
# The options `usseg run` and `usseg compare` share (one definition, one help text; defaults from the spec).
DatasetOpt = typer.Option(..., help="Dataset registry name.")
DataRootOpt = typer.Option(None, "--data-root",
                           help="Dataset root folder (default: $USSEG_DATA_ROOT/<dataset folder>).")
TrainSplitOpt = typer.Option(",".join(spec_default(RunSettings, "train_split")),
                             help="Training split(s), comma-separated (labels unused).")
EvalSplitOpt = typer.Option(spec_default(RunSettings, "eval_split"), help="Labelled split to evaluate on.")
BackboneOpt = typer.Option(spec_default(DataSpec, "backbone"), help="Backbone registry name.")
WeightsOpt = typer.Option(None, help="Local backbone weights file.")
RandomWeightsOpt = typer.Option(False, "--random-weights", help="Random init (tests).")
ResolutionOpt = typer.Option(spec_default(RunSettings, "resolution"),
                             help="Training resolution (five-crops, view-bank frame).")
EvalResolutionOpt = typer.Option(None, help="Override the eval protocol's resolution.")
CrfOpt = typer.Option(True, "--crf/--no-crf", help="Dense CRF refinement rows.")
DeviceOpt = typer.Option(spec_default(DataSpec, "device"), help="auto | cpu | cuda[:i]: where the work runs.")
OverclusterOpt = typer.Option(
    spec_default(RunSettings, "overcluster"), callback=choice_of("--overcluster", RunSettings, "overcluster"),
    help="With more clusters than classes (--set n_clusters=K): unmatched-wrong (ours: unmatched clusters are "
         "errors) | majority | reference-drop (STEGO's: drop pixels of clusters >= n_classes).")
SetOpt = typer.Option(None, "--set", help="Config override key=value (repeatable): bare names set the head's "
                      "main section (steps=2000), SECTION.field another (omh.w_match=0.1, picie.k_over=100), "
                      "views.field the view bank (views.n_views=8), overseg.field the oversegmentation "
                      "(overseg.detector, overseg.weights, overseg.t0, overseg.max_regions), knn.field the KNN "
                      "search (knn.k, knn.method=exact|ivf|hnsw|auto, knn.nprobe, knn.nlist, knn.ef_search, "
                      "knn.m, knn.recall_floor), crops.field the five-crop view; seed, n_clusters and "
                      "dataset_options set the run's fields of those names.")


def path_or_none(path) -> str | None:
    return None if path is None else str(path)


def human(n: float) -> str:
    """Bytes as a short human-readable size."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --- bad input and errors: one spelling, one line, one exit code per kind ----------------------------

EXIT_USAGE, EXIT_CONFIG, EXIT_INPUT, EXIT_UNEXPECTED = 2, 3, 4, 1
EXIT_CODES_HELP = ("Exit codes: 0 ok; 1 unexpected error (traceback in <storage>/logs/usseg-errors.log; "
                   "--debug shows it); 2 usage error (bad option or argument); 3 configuration error "
                   "(unknown --set key, registry name, setting, missing storage or data root); 4 input or "
                   "data error (unreadable or invalid image, label or weights file).")
OnErrorOpt = typer.Option("fail", "--on-error", callback=choice_of("--on-error", DataSpec, "on_error",
                                                                  {"fail": "raise"}),
                          help="fail | skip: stop at the first invalid image/label file, or leave invalid files "
                          "out (listed in the manifest artifact).")


def existing_storage(flag) -> "Path":
    """The storage root of an inspecting command; a missing folder is a ConfigError, not an empty table."""
    from orchestration.settings import storage_root
    from usseg_core.errors import ConfigError

    root = storage_root(flag)
    if not root.is_dir():
        raise ConfigError(f"storage {root} does not exist (pass --storage, or set $USSEG_STORAGE)")
    return root


def _storage_from_argv() -> str | None:
    args = sys.argv[1:]
    for i, a in enumerate(args):
        if a == "--storage" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--storage="):
            return a.split("=", 1)[1]
    return None


def write_failure_log(exc: BaseException) -> "Path | None":
    """Prefect's held-back failure records and ``exc``'s traceback, appended to ``<storage>/logs/``."""
    import traceback

    from orchestration.settings import storage_root

    try:
        root = storage_root(_storage_from_argv())
        if not root.is_dir():  # never create a storage just to hold a log
            return None
        folder = root / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "usseg-errors.log"
        fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
        with open(path, "a") as fh:
            fh.write(f"==== usseg {' '.join(sys.argv[1:])}\n")
            for record in console.FAILURE_RECORDS:
                fh.write(fmt.format(record) + "\n")
            fh.write("".join(traceback.format_exception(exc)))
        return path
    except Exception:  # noqa: BLE001 - the log is a courtesy; the error line must still be printed
        return None


def exit_code(exc: BaseException) -> int:
    from usseg_core.errors import ConfigError, InputError, UssegError, WeightsError

    if isinstance(exc, (InputError, WeightsError)):
        return EXIT_INPUT
    if isinstance(exc, (ConfigError, UssegError)):
        return EXIT_CONFIG
    return EXIT_UNEXPECTED


def handled(exc: BaseException) -> BaseException:
    """The usseg error inside ``exc`` (Prefect may wrap it), else ``exc``."""
    from usseg_core.errors import UssegError

    seen = exc
    while seen is not None:
        if isinstance(seen, UssegError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def error_exit(exc: BaseException) -> None:
    """One literal line on stderr (the last thing printed) and the exit code of the error's kind."""
    if isinstance(exc, (SystemExit, KeyboardInterrupt)):
        raise exc
    err = handled(exc)
    code = exit_code(err)
    log = write_failure_log(exc) if console.FAILURE_RECORDS or code == EXIT_UNEXPECTED else None
    if code == EXIT_UNEXPECTED:
        if console.DEBUG:
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        where = f"; traceback in {log}" if log else ""
        line = f"error: unexpected {type(err).__name__}: {err}{where}"
    else:
        line = f"error: {err}" + (f" (Prefect's log of the failed run: {log})" if log else "")
    stop_temporary_server()
    sys.stdout.flush()
    sys.stderr.write(line.replace("\n", " ") + "\n")
    sys.stderr.flush()
    sys.exit(code)


def fail(exc: BaseException) -> None:
    """For commands that catch their own usseg errors: the same line and exit code as :func:`error_exit`,
    as a ``typer.Exit`` (so CliRunner tests see the code)."""
    err = handled(exc)
    sys.stdout.flush()
    sys.stderr.write(f"error: {err}".replace("\n", " ") + "\n")
    raise typer.Exit(code=exit_code(err))

"""Pieces shared by the CLI modules (options and formatting)."""
from __future__ import annotations

import logging
import re
import sys

import typer

from orchestration import console
from orchestration.compat import stop_temporary_server
from usseg_core.spec import DataSpec, RunSettings



def spec_default(cls: type, name: str):
    """The default of spec field ``name`` (the one place defaults are written: usseg_core/spec.py)."""
    return cls.model_fields[name].get_default(call_default_factory=True)


def spec_choices(cls: type, name: str) -> tuple[str, ...]:
    """The values a ``Literal`` spec field accepts (of ``Literal[...] | None``: the literal's values)."""
    from typing import Literal, get_args, get_origin

    values: list = []
    for arg in get_args(cls.model_fields[name].annotation):
        values.extend(get_args(arg) if get_origin(arg) is Literal else [] if arg is type(None) else [arg])
    return tuple(values)


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
    from usseg_core.errors import human_size

    return human_size(n)


# --- bad input and errors: one spelling, one line, one exit code per kind ----------------------------

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_CONFIG, EXIT_INPUT, EXIT_DISK_FULL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
# The one table of exit codes: --help's epilog, and docs/commands.md's table (tests/flows/test_exit_codes.py
# checks that the docs list exactly these, and one real command per code).
EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_UNEXPECTED: "unexpected error (a bug; traceback in <storage>/logs/usseg-errors.log, --debug shows it)",
    EXIT_USAGE: "usage error (bad option or argument)",
    EXIT_CONFIG: "configuration error (unknown --set key, registry name, bad setting, missing storage or data root)",
    EXIT_INPUT: "input or data error (unreadable or invalid image, label or weights file; a damaged cache: usseg storage verify)",
    EXIT_DISK_FULL: "environment: the storage's disk is full (or the quota); rerun after freeing space to resume",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); finished artifacts are kept, rerun to resume",
}
EXIT_CODES_HELP = "Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + "."
INTERRUPTED_LINE = "interrupted; finished artifacts are kept, rerun the command to resume"
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
    from usseg_core.errors import ConfigError, DiskFull, InputError, UssegError, WeightsError

    if isinstance(exc, DiskFull):
        return EXIT_DISK_FULL
    if isinstance(exc, (InputError, WeightsError)):
        return EXIT_INPUT
    if isinstance(exc, (ConfigError, UssegError)):
        return EXIT_CONFIG
    return EXIT_UNEXPECTED


def handled(exc: BaseException) -> BaseException:
    """The usseg error inside ``exc`` (Prefect may wrap it), else a full disk met outside any stage as a
    :class:`~usseg_core.errors.DiskFull` naming the file, else ``exc``."""
    from usseg_core.errors import DiskFull, UssegError, disk_full_cause

    seen = exc
    while seen is not None:
        if isinstance(seen, UssegError):
            return seen
        seen = seen.__cause__ or seen.__context__
    full = disk_full_cause(exc)
    if full is not None:
        from pathlib import Path

        where = Path(full.filename).parent if full.filename else Path.cwd()
        return DiskFull.of(full, where)
    return exc


# --- what a message passed through from a library becomes -------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
PASSED_THROUGH_MAX = 200  # characters of a library's message kept in the line (the rest goes to the log)


def plain_text(text: str) -> str:
    """``text`` without terminal escapes (torch bolds its advice), on one line, printable."""
    from usseg_core.errors import printable

    return " ".join(printable(_ANSI.sub("", text)).split())


def first_sentence(text: str) -> str:
    """The first meaningful sentence of a library's message: its first non-empty line, cut after its first
    full stop, at most :data:`PASSED_THROUGH_MAX` characters."""
    line = next((ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()), "")
    cut = re.search(r"\.(\s|$)", line)
    if cut:
        line = line[:cut.start() + 1]
    return line if len(line) <= PASSED_THROUGH_MAX else line[:PASSED_THROUGH_MAX - 1].rstrip() + "…"


def refused_pickle(texts: list[str]) -> str | None:
    """For torch's ``weights_only`` refusal, what it means for usseg: the file holds a pickled callable
    (named), which usseg never loads. Never torch's advice to pass ``weights_only=False``."""
    text = " ".join(_ANSI.sub("", t) for t in texts)
    if "Weights only load failed" not in text:
        return None
    found = (re.search(r"GLOBAL (\S+) (?:whose module|was not an allowed)", text)
             or re.search(r"Unsupported global: GLOBAL (\S+)", text)
             or re.search(r"unrecognized function `?([^`]+?)`? which belongs", text))
    name = f" ({found.group(1)})" if found else ""
    return (f"the file holds a pickled callable{name}, which usseg never loads: loading it would run code. Only "
            "tensors and plain containers are read; if you trust the file, re-save its weights as a plain state "
            "dict (torch.save(model.state_dict(), ...)) or as .safetensors")


def error_message(err: BaseException) -> tuple[str, bool]:
    """The text of ``err`` for its one line: library messages it carries shortened to their first sentence,
    torch's pickle refusal explained, escapes stripped. Returns (text, whether anything was cut)."""
    from usseg_core.errors import UssegError

    text = str(err)
    causes, seen = [], err.__cause__ or err.__context__
    while seen is not None:
        causes.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    pickle = refused_pickle([text, *causes])
    cut = False
    if pickle is not None:
        at = text.find("Weights only load failed")
        head = text[:at].rstrip(" (:.") if at >= 0 else text
        text, cut = f"{head}: {pickle}" if at > 0 else pickle if at == 0 else f"{text}: {pickle}", True
    for cause in causes:  # a long library message quoted whole in ours
        for quoted in (cause.strip(), cause.strip().splitlines()[0] if cause.strip() else ""):
            if len(quoted) > PASSED_THROUGH_MAX and quoted in text:
                text, cut = text.replace(quoted, first_sentence(quoted)), True
    if len(text) > 4 * PASSED_THROUGH_MAX and not isinstance(err, UssegError):  # a library's own error
        text, cut = first_sentence(text), True
    return plain_text(text), cut


def error_line(exc: BaseException) -> tuple[str, int]:
    """The one line (without ``error: ``) and the exit code of ``exc``; the failure log gets Prefect's held
    records and the traceback when the run failed in Prefect, the error is a bug, or a message was cut."""
    err = handled(exc)
    code = exit_code(err)
    text, cut = error_message(err)
    log = write_failure_log(exc) if console.FAILURE_RECORDS or code == EXIT_UNEXPECTED or cut else None
    if code == EXIT_UNEXPECTED:
        if console.DEBUG:
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        return f"unexpected {type(err).__name__}: {text}" + (f"; traceback in {log}" if log else ""), code
    if cut and log:
        return f"{text} (full message in {log})", code
    return text + (f" (Prefect's log of the failed run: {log})" if log else ""), code


def interrupted(exc: BaseException | None) -> bool:
    """Whether ``exc`` is (or ends) a Ctrl-C: a KeyboardInterrupt, or typer's exit 130 raised from one."""
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# Set by the console entry point (commands.cli.main): this process owns the temporary server it started.
# A command invoked in-process (typer's CliRunner in tests) must not stop the server of its host process.
OWNS_SERVER = False


def say_last(line: str) -> None:
    """Stop the temporary server first (its "Stopping temporary server" line must not follow ours), then
    print ``line`` on stderr as the last thing."""
    if OWNS_SERVER:
        stop_temporary_server()
    sys.stdout.flush()
    sys.stderr.write(line.replace("\n", " ") + "\n")
    sys.stderr.flush()


def error_exit(exc: BaseException) -> None:
    """One literal line on stderr (the last thing printed) and the exit code of the error's kind; a
    Ctrl-C is one line and exit 130."""
    if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == EXIT_INTERRUPTED
                                              and interrupted(exc)):
        say_last(INTERRUPTED_LINE)
        sys.exit(EXIT_INTERRUPTED)
    if isinstance(exc, SystemExit):
        raise exc
    line, code = error_line(exc)
    say_last(f"error: {line}")
    sys.exit(code)


def fail(exc: BaseException) -> None:
    """For commands that catch their own usseg errors: the same line and exit code as :func:`error_exit`,
    as a ``typer.Exit`` (so CliRunner tests see the code)."""
    line, code = error_line(exc)
    say_last(f"error: {line}")
    raise typer.Exit(code=code)


# --- what run and compare check before any work, and say after it -----------------------------------

def check_data_fits(spec) -> None:
    """Refuse, before any server or work, a run or comparison its data cannot feed: the data check of
    ``usseg data check`` on its splits (:func:`check_data_layout`), and a KNN table needs more training items
    than ``knn.k`` (``tasks.heads.check_knn_rows``, on the listed images)."""
    from orchestration.refs import resolved
    from tasks.heads import check_knn_rows

    spec = resolved(spec)
    check_data_layout(spec)
    for run in spec.runs() if hasattr(spec, "runs") else [spec]:
        check_knn_rows(run)


def say_data_problems(lines: list[str]) -> None:
    """Lines of a data check (``DataCheck.lines()``: warnings, then errors) on stderr."""
    for line in lines:
        print(line, file=sys.stderr, flush=True)


def check_data_layout(spec) -> None:
    """``usseg data check`` on the splits of a resolved run or comparison, sampling labels (seconds): its
    warnings are printed, its errors too and the last one is raised (exit 4). The splits that need labels are
    the evaluation split and the linear probe's (the first other training split, flows/train.py
    ``evaluation_plan``); under ``--on-error skip`` a file's own problem is a warning (the run leaves it out)."""
    from usseg_core.datasets.check import check_data, needs_check
    from usseg_core.errors import InputError

    if not needs_check(spec.dataset):  # the synthetic scenes usseg renders itself
        return
    splits = list(dict.fromkeys([*spec.train_split, *([spec.eval_split] if spec.eval_split else [])]))
    probe = [s for s in spec.train_split if s != spec.eval_split][:1]
    labelled = [spec.eval_split, *probe] if spec.eval_split else []
    report = check_data(spec.dataset, spec.data_root, splits, options=spec.dataset_options, labelled=labelled,
                        skip_invalid=spec.on_error == "skip")
    errors = report.errors
    say_data_problems(report.lines()[:-1] if errors else report.lines())
    if errors:  # the last line, printed by the command's error handling (the last error: lines() ends with it)
        raise InputError(errors[-1].path, errors[-1].problem)


def skipped_lines(spec) -> list[str]:
    """Under ``--on-error skip``: one line per split whose manifest left invalid files out, as ``extract``
    says it (``<split>: N files skipped (invalid; listed in <manifest.json>)``); found by look-ups only."""
    if spec is None or spec.on_error != "skip":  # None: answered from its record (never under skip)
        return []
    from orchestration.refs import data_ref, resolved
    from tasks.manifest import ensure_manifest
    from usseg_core.store import NotCached, lookups_only

    spec = resolved(spec)
    lines = []
    for split in dict.fromkeys([*spec.train_split, *([spec.eval_split] if spec.eval_split else [])]):
        try:
            with lookups_only():
                manifest = ensure_manifest(data_ref(spec, split), spec.storage)
        except NotCached:
            continue
        if manifest.skipped:
            lines.append(f"{split}: {len(manifest.skipped)} files skipped (invalid; listed in {manifest.path})")
    return lines

"""Errors raised at usseg's boundaries.

Every error that comes from a user's input names the file (or argument) and the problem, so that a
message alone tells the user what to fix (docs/contributing.md: validate early, say what is wrong).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


def printable(text: str) -> str:
    """``text`` (an id, a path, a message naming one) as valid text: a file name that is not valid UTF-8 (a
    folder copied from an old system: ``café.png`` written in Latin-1) reaches Python with surrogates
    (os.fsdecode), which cannot be hashed, logged or sent to Prefect as text; its undecodable bytes become
    backslash escapes (``caf\\xe9.png``), the same on every run."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class UssegError(Exception):
    """Base class of every error usseg raises on purpose."""


class InputError(UssegError):
    """A user-supplied file is unreadable or invalid.

    Attributes:
        path: the offending file.
        problem: one sentence saying what is wrong with it.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(printable(f"{self.path}: {problem}"))


class WeightsError(UssegError):
    """Weights are missing, unreadable, or do not fit the model they are loaded into."""


class ConfigError(UssegError):
    """A parameter, registry name or setting is invalid."""


class DamagedArtifact(InputError):
    """A file of a stored artifact is damaged or missing: a checksum or size that does not match what was
    written, a chunk of a written item missing, non-finite values. The cached result cannot be trusted; the
    message names the artifact and the folder to delete (exit code 4, as every :class:`InputError`).

    Attributes:
        folder: the artifact folder (``<storage>/<stage>/<key>``), or the damaged store outside one.
        problem: what is damaged, e.g. ``item 17 (features.zarr/dense/c/0/0/0/0): checksum mismatch``.
    """

    def __init__(self, folder: str | Path, problem: str) -> None:
        self.folder = self.path = Path(folder)
        self.problem = problem
        label = "/".join(self.folder.parts[-2:])
        UssegError.__init__(self, f"{label}: {problem}; the cache is damaged: delete {self.folder} to recompute "
                            "it (usseg storage verify lists every damaged artifact)")

    def __reduce__(self):  # pickles (Dask workers) with its two arguments, not its message
        return type(self), (self.folder, self.problem)


def human_size(n: float) -> str:
    """Bytes as a short human-readable size (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# What a write fails with when the storage's disk is full: no space, the user's quota, the file size limit.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The ``OSError`` of a full disk that ``exc`` is or wraps (a shard task's, re-raised by its future),
    else None."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class DiskFull(UssegError):
    """The storage's disk (or the user's quota, or the file size limit) ran out while an artifact was being
    written. Nothing of it is marked done; a rerun after freeing space resumes where it stopped (exit code 5).

    Attributes:
        where: the storage root (or the folder of the file being written, outside an artifact).
        artifact: ``<stage>/<key>`` being written (or the file).
        reason: the operating system's message (``[Errno 28] No space left on device``).
        written: bytes the artifact's folder holds so far (None: unknown).
        free: bytes free on that file system.
        total: the artifact's expected size where the stage knows one (uncompressed arrays), else None.
    """

    def __init__(self, where: str | Path, artifact: str, reason: str, written: int | None, free: int,
                 total: int | None = None) -> None:
        self.where, self.artifact, self.reason = Path(where), artifact, reason
        self.written, self.free, self.total = written, free, total
        so_far = "" if written is None else f"{human_size(written)} written so far" + (
            f" of about {human_size(total)} (uncompressed)" if total else "") + ", "
        super().__init__(printable(
            f"disk full: writing {artifact} in {self.where} failed ({reason}); {so_far}{human_size(free)} free "
            "on its disk; free space and rerun the same command (what is finished is kept and the run resumes), "
            "or pass --storage on a larger disk"))

    @classmethod
    def of(cls, err: OSError, where: str | Path, artifact: str | None = None, written: int | None = None,
           total: int | None = None) -> "DiskFull":
        """From the operating system's error, with the free space of ``where``'s file system."""
        import shutil

        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = 0
        reason = f"[Errno {err.errno}] {err.strerror or os.strerror(err.errno)}"
        return cls(where, artifact or str(err.filename or "a file"), reason, written, free, total)

    def __reduce__(self):  # pickles (Dask workers) with its arguments, not its message
        return type(self), (self.where, self.artifact, self.reason, self.written, self.free, self.total)

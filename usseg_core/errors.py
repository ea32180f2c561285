"""Errors raised at usseg's boundaries.

Every error that comes from a user's input names the file (or argument) and the problem, so that a
message alone tells the user what to fix (docs/contributing.md: validate early, say what is wrong).
"""
from __future__ import annotations

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
        problem: what is damaged, e.g. ``item 17 (features.zarr/dense/c/17/0/0/0): checksum mismatch``.
    """

    def __init__(self, folder: str | Path, problem: str) -> None:
        self.folder = self.path = Path(folder)
        self.problem = problem
        label = "/".join(self.folder.parts[-2:])
        UssegError.__init__(self, f"{label}: {problem}; the cache is damaged: delete {self.folder} to recompute "
                            "it (usseg storage verify lists every damaged artifact)")

    def __reduce__(self):  # pickles (Dask workers) with its two arguments, not its message
        return type(self), (self.folder, self.problem)


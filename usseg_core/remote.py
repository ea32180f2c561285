"""The artifact store on object storage (``s3://bucket/prefix``, and the other URLs obstore opens).

An object store has no folders and no rename, so a remote store keeps a *local mirror* of the artifacts it
works with (``$USSEG_CACHE_DIR``, default ``~/.cache/usseg``, one folder per bucket and prefix) and the
bucket holds what is published:

``<prefix>/<stage>/<key>/_COMPLETE``
    the commit: a JSON object naming the attempt that completed the artifact. It is written last, with a
    conditional PUT (``If-None-Match: *``), so of two writers of the same artifact exactly one commits;
    the other drops its attempt and reads the winner's.
``<prefix>/<stage>/<key>/<attempt>/...``
    the artifact's files, exactly as in a local folder (``meta.json``, Zarr stores, checkpoints,
    tables, pictures), uploaded by one writer. ``<attempt>`` is ``w`` and 12 hex digits. A Zarr store in
    it is an ordinary Zarr 3 store on the bucket (``zarr.storage.ObjectStore`` opens it).

A stage computes into the mirror folder exactly as into a local store. Every atomic write (``meta.json``,
checkpoints, a done mark) is also PUT to the attempt's prefix as it happens (one PUT is all-or-nothing:
readers see the old object or the whole new one), so a run killed on one machine resumes on another from
its last checkpoint. At finish every file is uploaded, then ``_COMPLETE`` is committed. A reader
(:meth:`RemoteStore.fetch`) downloads a committed attempt into a temporary folder of the mirror and renames
it into place: the mirror holds whole artifacts or none. The mirror is a read-through cache bounded by
``$USSEG_CACHE_MAX_GB`` (default 50): the least recently used complete artifacts are evicted.

Credentials and endpoint come from the environment the library reads (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ALLOW_HTTP=true`` for a local
``http://`` endpoint), never from the command line.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from usseg_core.errors import ConfigError, DamagedArtifact, UssegError

SCHEMES = ("s3", "gs", "az", "abfs", "memory")
CACHE_ENV = "USSEG_CACHE_DIR"
CACHE_MAX_ENV = "USSEG_CACHE_MAX_GB"
DEFAULT_CACHE_MAX_GB = 50.0
COMMIT = "_COMPLETE"
USED = ".used"  # touched in a mirror folder on every fetch: the eviction order
ATTEMPT_FILE = ".attempt"  # in a mirror folder being computed: the attempt id its writes go to
TRANSFER_THREADS = 16
_ATTEMPT = re.compile(r"^w[0-9a-f]{12}$")
_URL = re.compile(r"^(?P<scheme>[a-z0-9]+)://(?P<bucket>[A-Za-z0-9._-]+)(?P<prefix>/[A-Za-z0-9._/=-]*)?$")


class RemoteError(UssegError):
    """The object store refused or could not be reached."""


def is_url(root: object) -> bool:
    text = str(root)
    return "://" in text and not text.startswith("file://")


def check_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, prefix)`` of a storage URL, or a ConfigError saying what is wrong with it."""
    match = _URL.match(url.rstrip("/"))
    if not match or match["scheme"] not in SCHEMES:
        raise ConfigError(f"storage {url!r}: expected a local path or {' | '.join(s + '://bucket/prefix' for s in SCHEMES[:3])}")
    prefix = (match["prefix"] or "")[1:]  # the URL has no trailing slash: every part must be named
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ConfigError(f"storage {url!r}: the prefix may not contain empty, '.' or '..' parts")
    return match["scheme"], match["bucket"], prefix


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "usseg").expanduser().resolve()


def cache_max_bytes() -> int:
    raw = os.environ.get(CACHE_MAX_ENV)
    try:
        gb = float(raw) if raw else DEFAULT_CACHE_MAX_GB
    except ValueError:
        raise ConfigError(f"${CACHE_MAX_ENV}={raw!r}: expected a number of gigabytes") from None
    if gb <= 0:
        raise ConfigError(f"${CACHE_MAX_ENV}={raw!r}: must be positive")
    return int(gb * (1 << 30))


def mirror_dir(url: str) -> Path:
    """The local mirror of a storage URL: ``$USSEG_CACHE_DIR/<scheme>/<bucket>/<prefix>``."""
    scheme, bucket, prefix = check_url(url)
    return cache_dir() / scheme / bucket / prefix if prefix else cache_dir() / scheme / bucket


class RemoteRoot:
    """A storage root on object storage, as the settings resolve it: ``str()`` is the URL (what specs and
    artifact keys carry), ``/`` a path in the local mirror (run records, answers, rendered data)."""

    def __init__(self, url: str) -> None:
        check_url(url)
        self.url = url.rstrip("/")
        self.local = mirror_dir(self.url)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemoteRoot({self.url!r})"

    def __eq__(self, other) -> bool:
        return str(other) == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, other) -> Path:
        return self.local / other

    def resolve(self) -> "RemoteRoot":
        return self

    def expanduser(self) -> "RemoteRoot":
        return self

    def exists(self) -> bool:
        return self.is_dir()

    def is_dir(self) -> bool:
        """True when the bucket answers a listing of the prefix (an empty prefix is an empty store); a
        refused or unreachable bucket raises :class:`RemoteError` with the library's reason."""
        remote_for(self.url).list_dirs("")
        return True


@dataclass(frozen=True)
class Listed:
    path: str  # relative to the store's prefix
    size: int
    modified: float  # epoch seconds


class RemoteStore:
    """The object-store side of one storage URL: small, synchronous calls over obstore."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.scheme, self.bucket, self.prefix = check_url(self.url)
        try:
            from obstore.store import from_url
        except ImportError:  # pragma: no cover - obstore is a dependency
            raise ConfigError(f"storage {url!r} needs obstore: pip install obstore") from None
        try:
            self.store = from_url(self.url)
        except Exception as exc:  # noqa: BLE001 - the library's own configuration errors
            raise ConfigError(f"storage {url!r}: {exc}") from exc

    # -- primitives -------------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - obstore raises its own error classes
            if type(exc).__name__ == "NotFoundError":
                raise FileNotFoundError(what) from exc
            if type(exc).__name__ == "AlreadyExistsError":
                raise FileExistsError(what) from exc
            raise RemoteError(f"{self.url}/{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc

    def get(self, rel: str) -> bytes | None:
        import obstore

        try:
            return bytes(self._call(rel, lambda: obstore.get(self.store, rel).bytes()))
        except FileNotFoundError:
            return None

    def put(self, rel: str, data: bytes, *, create: bool = False) -> bool:
        """PUT ``data`` at ``rel``; with ``create`` only if nothing is there (False when something was)."""
        import obstore

        try:
            self._call(rel, obstore.put, self.store, rel, data, mode="create" if create else "overwrite")
        except FileExistsError:
            return False
        return True

    def upload(self, local: Path, rel: str) -> None:
        import obstore

        self._call(rel, obstore.put, self.store, rel, Path(local))

    def download(self, rel: str, local: Path) -> int:
        import obstore

        local.parent.mkdir(parents=True, exist_ok=True)
        result = self._call(rel, obstore.get, self.store, rel)
        size = 0
        with open(local, "wb") as fh:
            for chunk in result:
                fh.write(chunk)
                size += len(chunk)
        return size

    def list(self, prefix: str) -> list[Listed]:
        import obstore

        def walk():
            out = []
            for batch in obstore.list(self.store, prefix=prefix.rstrip("/") + "/" if prefix else None):
                for obj in batch:
                    out.append(Listed(obj["path"], int(obj["size"]), obj["last_modified"].timestamp()))
            return out

        return self._call(prefix or "/", walk)

    def list_dirs(self, prefix: str) -> list[str]:
        """The names of the 'folders' directly below ``prefix``."""
        import obstore

        pre = prefix.rstrip("/") + "/" if prefix else None
        found = self._call(prefix or "/", obstore.list_with_delimiter, self.store, prefix=pre)
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"])

    def delete(self, paths: list[str]) -> None:
        import obstore

        for start in range(0, len(paths), 500):
            self._call("delete", obstore.delete, self.store, paths[start:start + 500])

    def delete_prefix(self, prefix: str) -> int:
        paths = [o.path for o in self.list(prefix)]
        if paths:
            self.delete(paths)
        return len(paths)

    # -- artifacts --------------------------------------------------------------------------------
    @staticmethod
    def base(stage: str, key: str) -> str:
        return f"{stage}/{key}"

    def commit_record(self, stage: str, key: str) -> dict | None:
        raw = self.get(f"{self.base(stage, key)}/{COMMIT}")
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            record = {}
        if not _ATTEMPT.match(str(record.get("attempt", ""))):
            raise DamagedArtifact(Path(f"{self.url}/{self.base(stage, key)}"), f"{COMMIT} names no attempt")
        return record

    def attempts(self, stage: str, key: str) -> list[str]:
        """The attempts holding objects (a server may keep an emptied 'folder' listed: it is no attempt)."""
        base = self.base(stage, key)
        names = {o.path[len(base) + 1:].split("/", 1)[0] for o in self.list(base)}
        return sorted(a for a in names if _ATTEMPT.match(a))

    def latest_attempt(self, stage: str, key: str) -> str | None:
        """The uncommitted attempt whose ``meta.json`` was written last (a crashed run to resume)."""
        best, when = None, -1.0
        for attempt in self.attempts(stage, key):
            listed = [o for o in self.list(f"{self.base(stage, key)}/{attempt}") if o.path.endswith("/meta.json")]
            stamp = max((o.modified for o in listed), default=-1.0)
            if stamp > when:
                best, when = attempt, stamp
        return best

    def upload_folder(self, folder: Path, stage: str, key: str, attempt: str, *,
                      skip: tuple[str, ...] = ()) -> tuple[int, int]:
        """Upload every file below ``folder`` (but dot-files and ``skip``) to the attempt: (files, bytes)."""
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                 and p.relative_to(folder).as_posix() not in skip]
        base = f"{self.base(stage, key)}/{attempt}"
        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            list(pool.map(lambda p: self.upload(p, f"{base}/{p.relative_to(folder).as_posix()}"), files))
        return len(files), sum(p.stat().st_size for p in files)

    def artifact_size(self, stage: str, key: str, attempt: str | None = None) -> tuple[int, int]:
        """(objects, bytes) of an artifact on the bucket (one attempt, or every attempt and the commit)."""
        listed = self.list(self.base(stage, key) + (f"/{attempt}" if attempt else ""))
        return len(listed), sum(o.size for o in listed)

    def download_attempt(self, stage: str, key: str, attempt: str, target: Path) -> tuple[int, int]:
        """Download every object of an attempt into ``target`` (a new folder): (files, bytes)."""
        base = f"{self.base(stage, key)}/{attempt}"
        objects = self.list(base)
        target.mkdir(parents=True, exist_ok=True)

        def one(obj: Listed) -> int:
            rel = obj.path[len(base) + 1:]
            dest = (target / rel).resolve()
            if not dest.is_relative_to(target.resolve()):
                raise RemoteError(f"{self.url}/{obj.path}: object name escapes the artifact folder")
            return self.download(obj.path, dest)

        with ThreadPoolExecutor(TRANSFER_THREADS) as pool:
            sizes = list(pool.map(one, objects))
        return len(objects), sum(sizes)



def new_attempt() -> str:
    return "w" + uuid.uuid4().hex[:12]


# --- the write-through of atomic writes ------------------------------------------------------------

_STAGING: dict[Path, tuple[str, str, str, str]] = {}  # mirror folder -> (url, stage, key, attempt)


def register_staging(folder: Path, url: str, stage: str, key: str, attempt: str) -> None:
    _STAGING[Path(folder).resolve()] = (url, stage, key, attempt)


def unregister_staging(folder: Path) -> None:
    _STAGING.pop(Path(folder).resolve(), None)


def written(path: Path) -> None:
    """Called after every atomic write: a file of a remote artifact being computed is PUT to its attempt
    (so a checkpoint survives the machine). A no-op for local stores."""
    if not _STAGING:
        return
    path = Path(path).resolve()
    for folder, (url, stage, key, attempt) in list(_STAGING.items()):
        if path.is_relative_to(folder):
            rel = path.relative_to(folder).as_posix()
            if rel == COMMIT or any(part.startswith(".") for part in rel.split("/")):
                return
            remote_for(url).upload(path, f"{stage}/{key}/{attempt}/{rel}")
            return


_REMOTES: dict[tuple[str, int], RemoteStore] = {}


def remote_for(url: str) -> RemoteStore:
    """The process's one client of ``url`` (its connection pool is reused by every store of that URL; a
    forked child makes its own, since a client's runtime does not survive a fork)."""
    key = (url, os.getpid())
    if key not in _REMOTES:
        _REMOTES[key] = RemoteStore(url)
    return _REMOTES[key]


# --- the mirror as a bounded read-through cache ------------------------------------------------------

def touch_used(folder: Path) -> None:
    try:
        (folder / USED).write_text(str(time.time()))
    except OSError:
        pass


def tree_size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _mirror_artifacts(root: Path) -> Iterator[tuple[float, Path, int]]:
    """(last used, folder, bytes) of every complete artifact in a mirror (its ``_COMPLETE`` is the local
    marker of usseg_core/store.py, the same name as the bucket's commit)."""
    if not root.is_dir():
        return
    for stage in root.iterdir():
        if not stage.is_dir() or stage.name.startswith(("_", ".")):
            continue
        for folder in stage.iterdir():
            if (folder / COMMIT).exists():
                used = folder / USED
                stamp = used.stat().st_mtime if used.exists() else (folder / COMMIT).stat().st_mtime
                yield stamp, folder, tree_size(folder)


def evict(root: Path, keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Remove the least recently used complete artifacts of the mirror ``root`` until it holds at most
    ``limit`` bytes (``$USSEG_CACHE_MAX_GB``). Folders being computed are never evicted, nor ``keep``."""
    limit = cache_max_bytes() if limit is None else limit
    entries = sorted(_mirror_artifacts(root))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, folder, size in entries:
        if total <= limit:
            break
        if keep is not None and folder.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        total -= size
    return removed


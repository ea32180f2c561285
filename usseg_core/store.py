"""Content-addressed artifact store: keys, atomic writes, completion markers, catalog.

An artifact is a folder ``<root>/<stage>/<key>/`` holding a ``meta.json`` and the stage's files. Its key
is ``sha256(stage, stage version, params, upstream keys)`` shortened to 16 hex digits, so any change of
input (a parameter, a dataset manifest, a backbone fingerprint) gives a new folder and nothing is ever
overwritten in place. The completion marker ``_COMPLETE`` is written last, by atomic rename: a folder
without it is *incomplete* and is resumed or discarded, never read as a result.

Integrity (docs/architecture.md, "Integrity"): at finish, ``meta.json`` records the sha256 and size of
every file of the artifact outside its Zarr stores (``file_digests``); a cache hit (:meth:`ArtifactStore.get`)
checks them and raises :class:`~usseg_core.errors.DamagedArtifact` naming the folder to delete. Zarr chunks
carry their own crc32c, checked when they are read (``usseg_core/integrity.py``).

This module decides nothing about *which* artifacts exist; the tasks layer does. It never imports Prefect.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from usseg_core.errors import ConfigError, DamagedArtifact, InputError, UssegError
from usseg_core.remote import is_url, tree_size, written

KEY_LENGTH = 16
MARKER = "_COMPLETE"
META = "meta.json"
FILES = "file_digests"  # meta.json entry: relpath -> {"sha256", "size"} of every file outside a *.zarr folder
HIT_HASH_LIMIT = 64 << 20  # a cache hit hashes recorded files up to this many bytes in all, else checks sizes
HIT_HASH_FILES = 512  # ... and up to this many files (an oversegmentation holds 3 per image: sizes only)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form that is hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return obj.as_posix()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def artifact_key(stage: str, version: int | str, params: Mapping[str, Any],
                 upstream: Mapping[str, str] | None = None) -> str:
    """The artifact key of a stage run: sha256 over stage, version, params and upstream keys."""
    payload = canonical_json({"stage": stage, "version": str(version), "params": dict(params),
                              "upstream": dict(upstream or {})})
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: give it an ordinary file's mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    written(path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, sort_keys=True,
                                              default=_json_default).encode())


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def code_version() -> str:
    """usseg's version plus the git commit of the source tree when it is a checkout."""
    from importlib import metadata

    try:
        version = metadata.version("usseg")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+g{sha}" if sha else version


def folder_size(path: Path) -> int:
    """Bytes of every file below ``path``."""
    return tree_size(path)


def _recorded_paths(folder: Path) -> Iterator[Path]:
    """Files of an artifact that ``meta.json`` records: all but meta.json, the marker, dot-files (an
    interrupted atomic write's temporary) and whatever lies in a ``*.zarr`` folder (chunks carry a crc32c)."""
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.endswith(".zarr") and not d.startswith("."))
        for name in sorted(files):
            path = Path(dirpath) / name
            if name.startswith(".") or (Path(dirpath) == folder and name in (META, MARKER)):
                continue
            yield path


def file_digests(folder: Path) -> dict[str, dict]:
    """``{relpath: {"sha256", "size"}}`` of the files :func:`_recorded_paths` names."""
    return {p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
            for p in _recorded_paths(folder)}


def file_problems(art: "Artifact", *, hashes: bool = True) -> list[str]:
    """What differs from the digests recorded at finish: a missing file, a size, a sha256 (``hashes``).

    An artifact finished before digests were recorded has none: nothing to compare (empty list)."""
    problems = []
    for rel, want in sorted((art.meta.get(FILES) or {}).items()):
        path = art.path / rel
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{rel}: {size} bytes, {want['size']} were written")
        elif hashes and file_sha256(path) != want["sha256"]:
            problems.append(f"{rel}: sha256 differs from the one recorded when it was written")
    return problems


def check_files(art: "Artifact") -> None:
    """Raise :class:`DamagedArtifact` when a recorded file of ``art`` is missing or changed (sha256 when the
    recorded files total at most :data:`HIT_HASH_LIMIT` bytes in at most :data:`HIT_HASH_FILES` files, else
    sizes only: ``usseg storage verify`` hashes every file)."""
    recorded = (art.meta.get(FILES) or {}).values()
    total = sum(int(d.get("size", 0)) for d in recorded)
    problems = file_problems(art, hashes=total <= HIT_HASH_LIMIT and len(recorded) <= HIT_HASH_FILES)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DamagedArtifact(art.path, problems[0] + more)


class NotCached(UssegError):
    """Raised by :meth:`ArtifactStore.begin` under :func:`lookups_only`: this artifact would be computed."""

    def __init__(self, stage: str, key: str) -> None:
        super().__init__(f"{stage}/{key} is not in the store")
        self.stage, self.key = stage, key


_LOOKUPS_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("usseg_lookups_only", default=False)


@contextlib.contextmanager
def lookups_only() -> Iterator[None]:
    """Within this block no artifact may be begun: the first one that would be computed raises
    :class:`NotCached` before any of its work. The CLI runs a command's plan this way first, so that a
    command whose every artifact is cached answers from the store without starting a flow run."""
    token = _LOOKUPS_ONLY.set(True)
    try:
        yield
    finally:
        _LOOKUPS_ONLY.reset(token)


def lookups_only_active() -> bool:
    return _LOOKUPS_ONLY.get()


@dataclass
class Artifact:
    """One artifact folder and its metadata."""

    stage: str
    key: str
    path: Path
    meta: dict = field(default_factory=dict)
    committed: bool | None = None  # a remote store's listing: committed on the bucket (None: look locally)
    listed: tuple[int, int, float] | None = None  # ... and (objects, bytes, newest mtime) of its attempt(s)

    @property
    def complete(self) -> bool:
        if self.committed is not None:
            return self.committed
        return (self.path / MARKER).exists()

    def file(self, name: str) -> Path:
        """Path of a file inside the artifact; ``name`` may not escape the folder."""
        target = (self.path / name).resolve()
        if not target.is_relative_to(self.path.resolve()):
            raise InputError(self.path / name, "path escapes the artifact folder")
        recorded = (self.meta.get(FILES) or {}).get(Path(name).as_posix())
        if recorded is not None and (self.path / MARKER).exists():  # a reader of a complete artifact's file:
            size = target.stat().st_size if target.exists() else None  # its size at least (a stat) is checked
            if size != recorded["size"]:
                raise DamagedArtifact(self.path, f"{name}: " + ("missing" if size is None else
                                                                f"{size} bytes, {recorded['size']} were written"))
        return target

    def update_meta(self, **fields: Any) -> None:
        self.meta.update(fields)
        atomic_write_json(self.path / META, self.meta)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (weights fingerprints, imported checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactStore:
    """The artifact root (``./storage`` by default): one folder per stage, one per key below it."""

    def __init__(self, root: str | Path) -> None:
        root_str = str(root)
        self.remote = None  # usseg_core.remote.RemoteStore of an object-store root
        if is_url(root_str):
            from usseg_core.remote import mirror_dir, remote_for

            self.url = root_str.rstrip("/")
            self.remote = remote_for(self.url)
            self.root = mirror_dir(self.url)  # the local mirror: artifacts are computed and read here
        else:
            self.root = Path(root_str.removeprefix("file://")).expanduser().resolve()
            self.url = str(self.root)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url})"

    def path(self, stage: str, key: str) -> Path:
        if not stage.replace("-", "").replace("_", "").isalnum() or not key.isalnum():
            raise ConfigError(f"invalid artifact stage/key: {stage!r}/{key!r}")
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Artifact | None:
        """The complete artifact, or None when it does not exist or is incomplete.

        Its recorded files are checked (:func:`check_files`): a damaged one raises :class:`DamagedArtifact`,
        never a silent cache hit. On an object store the committed attempt is fetched into the mirror first
        (once: a mirror copy of the same attempt is reused)."""
        path = self.path(stage, key)
        if self.remote is not None and not self._fetch(stage, key):
            return None
        if not (path / MARKER).exists():
            return None
        try:
            art = Artifact(stage, key, path, _read_meta(path))
        except InputError as exc:
            raise DamagedArtifact(path, f"{META}: {exc.problem}") from exc
        check_files(art)
        return art

    def _fetch(self, stage: str, key: str) -> bool:
        """Make the mirror hold the committed attempt of ``stage/key`` (False: nothing committed)."""
        from usseg_core.remote import ATTEMPT_FILE, evict, touch_used

        record = self.remote.commit_record(stage, key)
        if record is None:
            return False
        path, attempt = self.path(stage, key), record["attempt"]
        mine = path / ATTEMPT_FILE
        if (path / MARKER).exists() and mine.exists() and mine.read_text().strip() == attempt:
            touch_used(path)
            return True
        tmp = path.parent / f".fetch-{attempt}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            self.remote.download_attempt(stage, key, attempt, tmp)
            (tmp / ATTEMPT_FILE).write_text(attempt)
            (tmp / MARKER).write_text(str(record.get("completed", "")))
            if path.exists():  # an older mirror copy, or a staging folder another writer beat: set aside
                aside = path.parent / f".old-{uuid.uuid4().hex[:8]}"
                os.rename(path, aside)
                shutil.rmtree(aside, ignore_errors=True)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        touch_used(path)
        evict(self.root, keep=path)
        return True

    def open(self, stage: str, key: str) -> Artifact:
        """The artifact whether complete or not (None-safe counterpart of get)."""
        path = self.path(stage, key)
        return Artifact(stage, key, path, _read_meta(path) if (path / META).exists() else {})

    def begin(self, stage: str, key: str, *, version: int | str, params: Mapping[str, Any],
              upstream: Mapping[str, str] | None = None, **info: Any) -> Artifact:
        """Create (or reopen, to resume) the folder of an artifact being computed.

        An incomplete folder left by a crashed run is kept: the stage decides what of it to reuse.
        Under :func:`lookups_only` nothing is created and :class:`NotCached` is raised.
        """
        if lookups_only_active():
            raise NotCached(stage, key)
        path = self.path(stage, key)
        attempt = self._stage_remote(stage, key) if self.remote is not None else None
        path.mkdir(parents=True, exist_ok=True)
        art = Artifact(stage, key, path, _read_meta(path) if (path / META).exists() else {})
        if not art.meta:
            art.meta = {"stage": stage, "key": key, "version": str(version), "params": dict(params),
                        "upstream": dict(upstream or {}), "code_version": code_version(),
                        "created": now_iso(), **info}
            atomic_write_json(path / META, art.meta)
        elif attempt is not None:
            self.remote.upload(path / META, f"{stage}/{key}/{attempt}/{META}")
        return art

    def _stage_remote(self, stage: str, key: str) -> str:
        """The attempt this process writes ``stage/key`` under; a crashed attempt's uploaded files (meta.json,
        checkpoints) seed the mirror folder when this machine has none (resume on another machine)."""
        from usseg_core.remote import ATTEMPT_FILE, new_attempt, register_staging

        path = self.path(stage, key)
        mine = path / ATTEMPT_FILE
        if mine.exists() and not (path / MARKER).exists():
            attempt = mine.read_text().strip()
        else:
            if (path / MARKER).exists():  # a mirror copy of a commit that is gone from the bucket
                shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                crashed = self.remote.latest_attempt(stage, key)
                if crashed is not None:
                    self.remote.download_attempt(stage, key, crashed, path)
            attempt = new_attempt()
            path.mkdir(parents=True, exist_ok=True)
            mine.write_text(attempt)
        register_staging(path, self.url, stage, key, attempt)
        return attempt

    def finish(self, art: Artifact, **fields: Any) -> Artifact:
        """Record final metadata, then write the completion marker last (atomic rename)."""
        art.meta.update(fields)
        art.meta[FILES] = file_digests(art.path)
        art.meta["completed"] = now_iso()
        art.meta["size_bytes"] = folder_size(art.path)
        atomic_write_json(art.path / META, art.meta)
        if self.remote is not None:
            return self._commit(art)
        atomic_write_bytes(art.path / MARKER, art.meta["completed"].encode())
        return art

    def _commit(self, art: Artifact) -> Artifact:
        """Upload the attempt, then commit it with a conditional PUT of ``_COMPLETE`` (the bucket's
        all-or-nothing step: no rename). A writer that loses the race drops its attempt and reads the
        winner's."""
        from usseg_core.remote import ATTEMPT_FILE, COMMIT, unregister_staging

        attempt = (art.path / ATTEMPT_FILE).read_text().strip()
        base = f"{art.stage}/{art.key}"
        self.remote.upload_folder(art.path, art.stage, art.key, attempt, skip=(MARKER,))
        record = {"attempt": attempt, "completed": art.meta["completed"], "size_bytes": art.meta["size_bytes"]}
        won = self.remote.put(f"{base}/{COMMIT}", json.dumps(record).encode(), create=True)
        unregister_staging(art.path)
        if won:
            atomic_write_bytes(art.path / MARKER, art.meta["completed"].encode())
            for other in self.remote.attempts(art.stage, art.key):  # crashed attempts this one resumed
                if other != attempt:
                    self.remote.delete_prefix(f"{base}/{other}")
            return art
        self.remote.delete_prefix(f"{base}/{attempt}")
        winner = self.get(art.stage, art.key)
        if winner is None:
            raise DamagedArtifact(art.path, "another writer committed this artifact but it cannot be read")
        return winner

    def discard(self, stage: str, key: str) -> None:
        """Remove the artifact: its folder, and on an object store its objects (the commit first)."""
        shutil.rmtree(self.path(stage, key), ignore_errors=True)
        if self.remote is not None:
            from usseg_core.remote import COMMIT

            self.remote.delete([f"{stage}/{key}/{COMMIT}"])
            self.remote.delete_prefix(f"{stage}/{key}")

    def size_of(self, art: Artifact) -> int:
        """Bytes of an artifact (its recorded size when complete)."""
        if art.listed is not None:
            return art.listed[1]
        return int(art.meta.get("size_bytes") or folder_size(art.path)) if art.complete else folder_size(art.path)

    def modified(self, art: Artifact) -> float:
        """Newest modification time of anything in the artifact (seconds since the epoch)."""
        if art.listed is not None:
            return art.listed[2]
        newest = art.path.stat().st_mtime
        for dirpath, _, files in os.walk(art.path):
            for name in files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
        return newest

    def file_names(self, art: Artifact) -> list[str]:
        """The top-level file and folder names of an artifact (not dot-files)."""
        if art.path.is_dir():
            return sorted(p.name for p in art.path.iterdir() if not p.name.startswith("."))
        if self.remote is None:
            return []
        base = f"{art.stage}/{art.key}/"
        names = {o.path[len(base):].split("/")[1] for o in self.remote.list(base.rstrip("/"))
                 if o.path[len(base):].count("/") >= 1}
        return sorted(n for n in names if not n.startswith("."))

    def iter_artifacts(self, stage: str | None = None) -> Iterator[Artifact]:
        """Every artifact folder (complete or not), stage by stage, oldest first within a stage."""
        if self.remote is not None:
            yield from self._iter_remote(stage)
            return
        if not self.root.exists():
            return
        stages = [stage] if stage else sorted(p.name for p in self.root.iterdir() if p.is_dir())
        for st in stages:
            stage_dir = self.root / st
            if not stage_dir.is_dir():
                continue
            for folder in sorted(stage_dir.iterdir()):
                if folder.is_dir() and (folder / META).exists():
                    yield Artifact(st, folder.name, folder, _read_meta(folder))

    def find(self, key: str) -> Artifact:
        """The artifact whose key starts with ``key`` (any stage); ConfigError if none or ambiguous."""
        hits = [a for a in self.iter_artifacts() if a.key.startswith(key)]
        if not hits:
            raise ConfigError(f"no artifact with key {key!r} under {self.root}")
        if len(hits) > 1:
            raise ConfigError(f"key {key!r} is ambiguous: " + ", ".join(f"{a.stage}/{a.key}" for a in hits))
        if self.remote is not None and hits[0].complete:
            return self.get(hits[0].stage, hits[0].key) or hits[0]
        return hits[0]

    def _iter_remote(self, stage: str | None) -> Iterator[Artifact]:
        """Every artifact on the bucket: its committed attempt's meta.json, else the newest attempt's."""
        for st in [stage] if stage else self.remote.list_dirs(""):
            if st.startswith(("_", ".")) or not st.replace("-", "").replace("_", "").isalnum():
                continue
            for key in self.remote.list_dirs(st):
                if not key.isalnum():
                    continue
                record = self.remote.commit_record(st, key)
                attempt = record["attempt"] if record else self.remote.latest_attempt(st, key)
                if attempt is None:
                    continue
                raw = self.remote.get(f"{st}/{key}/{attempt}/{META}")
                try:
                    meta = json.loads(raw) if raw else {}
                except json.JSONDecodeError:
                    meta = {}
                listed = self.remote.list(f"{st}/{key}")
                yield Artifact(st, key, self.path(st, key), meta, committed=record is not None,
                               listed=(len(listed), sum(o.size for o in listed),
                                       max((o.modified for o in listed), default=0.0)))


def local_root(storage: str | Path) -> Path:
    """The local folder of a storage root: itself, or an object store's mirror (run records, answers,
    rendered data and the service's files live there)."""
    text = str(storage)
    if is_url(text):
        from usseg_core.remote import mirror_dir

        return mirror_dir(text)
    return Path(text.removeprefix("file://")).expanduser()


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise InputError(path / META, f"corrupt artifact metadata ({exc})") from exc

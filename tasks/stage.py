"""One scaffold for every stage: key -> look-up -> begin -> compute -> finish, and the typed reference
a stage returns.

A stage declares itself once (:func:`declare`: store folder, version, the function that does its work and
the arguments of that function that are deliberately not part of its key) and runs through
:func:`run_stage`, which

1. computes the key from the stage's ``params`` and ``upstream`` keys (``usseg_core.store.artifact_key``);
2. returns the complete artifact's reference on a hit, logging ``cache hit: <stage>/<key>``;
3. otherwise begins the artifact (under ``lookups_only`` this raises ``NotCached`` before any work), with
   the lineage (``dataset``, ``backbone``, ``backbone_fingerprint``) copied from the upstream references;
4. lets the stage's body fill the folder (an incomplete folder is reopened: resumable stages find their
   partial work in it), records the body's final metadata, writes the completion marker and returns the
   reference.

The body calls the core through :meth:`Work.core`, which checks that every keyword argument it passes is
part of the key (equal to an entry of ``params``) or declared unkeyed with a reason: a parameter that
changes an artifact's contents cannot be added to a stage without entering its key
(``tests/tasks/test_key_coverage.py``).

References are frozen dataclasses (they pickle for Dask workers; Prefect passes them between tasks and
resolves futures inside them). They also read as a read-only mapping (``ref["key"]``, ``ref.get("n")``,
``dict(ref)``), so a flow result stays readable by key on the command line and in the run record; new
code uses the attributes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator

from prefect import Task
from prefect.cache_policies import NO_CACHE

from tasks.failures import disk_full, drop_if_empty
from usseg_core.config import keyed_asdict
from usseg_core.errors import printable
from usseg_core.store import Artifact, ArtifactStore, NotCached, artifact_key, canonical_json, lookups_only_active

LINEAGE = ("dataset", "backbone", "backbone_fingerprint")


# --- references ------------------------------------------------------------------------------------

class FieldMapping(Mapping):
    """A frozen dataclass that also reads as a read-only mapping of its fields (``ref["key"]``,
    ``dict(ref)``); a subclass narrows which fields by overriding :meth:`_items`."""

    def _items(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __getitem__(self, name: str) -> Any:
        items = self._items()
        if name not in items:
            raise KeyError(name)
        return items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())


@dataclass(frozen=True, kw_only=True)
class ArtifactRef(FieldMapping):
    """A complete artifact: its stage, key, the file or folder its readers open, whether this run found
    it in the store, and its lineage (None where the stage has none)."""

    stage: str
    key: str
    path: str
    cache_hit: bool | None = None
    dataset: str | None = None
    backbone: str | None = None
    backbone_fingerprint: str | None = None

    @classmethod
    def of(cls, art: Artifact, path: str, cache_hit: bool | None, **extra: Any):
        """The reference of artifact ``art`` (lineage read from its metadata)."""
        lineage = {name: art.meta.get(name) for name in LINEAGE}
        return cls(stage=art.stage, key=art.key, path=path, cache_hit=cache_hit, **lineage, **extra)


@dataclass(frozen=True, kw_only=True)
class ManifestRef(ArtifactRef):
    """A split's manifest: ``path`` is manifest.json; ``hash`` its content hash (the dataset's identity in
    every key below it), ``n`` its items, ``skipped`` the files left out."""

    hash: str
    n: int
    skipped: list = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class FeaturesRef(ArtifactRef):
    """A feature store: ``path`` is features.zarr; ``n`` items, the resolved ``view``, its ``manifest``,
    the ``workers`` that wrote items in this run."""

    n: int
    view: dict
    manifest: ManifestRef
    workers: list = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ViewsRef(ArtifactRef):
    """A view bank: ``path`` is its folder (draws.json, plain.zarr, warped.zarr)."""

    n_images: int
    n_views: int
    view: dict
    manifest: ManifestRef
    workers: list = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class OversegmentRef(ArtifactRef):
    """An oversegmentation: ``path`` is its folder (``segments/<stem>.png`` per image of ``manifest``)."""

    n_images: int
    manifest: ManifestRef
    workers: list = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class HeadRef(ArtifactRef):
    """A trained (or imported) head: ``path`` is head.pt, ``method`` its registry name."""

    method: str


@dataclass(frozen=True, kw_only=True)
class MemoryRef(ArtifactRef):
    """A segment memory: ``path`` is its folder; ``pool_to`` the feature grid (h, w) its k-means ran at."""

    pool_to: list


@dataclass(frozen=True, kw_only=True)
class EvaluationRef(ArtifactRef):
    """An evaluation: ``path`` is its folder; ``rows`` the results table."""

    rows: list


@dataclass(frozen=True, kw_only=True)
class CompareRef(ArtifactRef):
    """A comparison report: ``path`` is its folder; its ``summary``, ``runs`` and ``rows``."""

    summary: list
    runs: list
    rows: list


def lineage_of(refs) -> dict:
    """Lineage fields of the first upstream reference that has each (None-valued fields are left out)."""
    out: dict = {}
    for ref in refs:
        if isinstance(ref, Mapping):
            for name in LINEAGE:
                if name not in out and ref.get(name) is not None:
                    out[name] = ref.get(name)
    return out


# --- stage declarations and the key-coverage check --------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """What a stage is: its store folder, version, the function its body hands the work to (``core``:
    a core function or the shard task that calls it), and the keyword arguments of that function that are
    deliberately not in the key, each with the reason. ``keyed_as`` maps an argument to its ``params``
    entry where the names differ (``"*"``: each field of the argument is a top-level entry)."""

    name: str
    version: int | str
    core: str
    unkeyed: Mapping[str, str] = field(default_factory=dict)
    keyed_as: Mapping[str, str] = field(default_factory=dict)


STAGES: dict[str, Stage] = {}
# What this process checked: the stages whose core was called, and (stage, keyword) of every argument
# (tests/tasks/test_key_coverage.py reads them after a run of every stage)
CALLED: set[str] = set()
CHECKED: set[tuple[str, str]] = set()


# What a backbone shard task (features, view bank) passes to its core that is not part of the key, and why.
IMAGE_SHARD_UNKEYED = {
    "storage": "where the artifact is", "key": "the artifact (the key itself)",
    "data": "keyed as dataset / split / options, and by the manifest's hash",
    "manifest_path": "keyed by the manifest's content hash",
    "backbone": "keyed by its name and weights fingerprint",
    "start": "which items a shard writes", "stop": "which items a shard writes",
    "batch_size": "how many items go through the backbone at once",
}


def declare(name: str, version: int | str, core: str, *, unkeyed: Mapping[str, str] | None = None,
            keyed_as: Mapping[str, str] | None = None) -> Stage:
    """Declare a stage once, at import of its module (a second declaration of a name is an error)."""
    if name in STAGES:
        raise ValueError(f"stage {name!r} is declared twice")
    STAGES[name] = Stage(name, version, core, dict(unkeyed or {}), dict(keyed_as or {}))
    return STAGES[name]


class UnkeyedParameter(RuntimeError):
    """A stage passed its core a keyword argument that is neither in its key nor declared unkeyed."""


def plain(value: Any) -> Any:
    """The JSON form a value takes in a key: ``key_params()`` / ``params()`` / ``to_dict()`` of settings,
    dataclasses as dicts, containers element-wise."""
    for method in ("key_params", "params", "to_dict"):
        if callable(getattr(value, method, None)) and not isinstance(value, type):
            return plain(getattr(value, method)())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(keyed_asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def check_keyed(stage: Stage, params: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    """Raise :class:`UnkeyedParameter` unless every keyword in ``kwargs`` is in ``params`` with the same
    value (as the key hashes it) or declared in ``stage.unkeyed``."""
    for name, value in kwargs.items():
        CHECKED.add((stage.name, name))
        if name in stage.unkeyed:
            continue
        entry = stage.keyed_as.get(name, name)
        found = plain(value)
        if entry == "*" and isinstance(found, dict):  # each field is a top-level entry of params
            wanted: Any = {k: params[k] for k in found if k in params}
        else:
            wanted = params[entry] if entry in params else _MISSING
        if wanted is _MISSING or canonical_json(found) != canonical_json(plain(wanted)):
            raise UnkeyedParameter(
                f"stage {stage.name!r} passes {name}={value!r} to {stage.core}, but its key has "
                f"{entry}={'(nothing)' if wanted is _MISSING else repr(wanted)}: put it in the stage's params "
                f"(and bump its version), or declare it unkeyed with the reason")


_MISSING = object()


def logger():
    """The Prefect run logger inside a run, a plain logger outside one (tests, notebooks); either way, a
    path argument that is not valid UTF-8 is logged escaped (Prefect's API refuses surrogates)."""
    import logging

    try:
        from prefect import get_run_logger

        return PrintableArgs(get_run_logger(), {})
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return PrintableArgs(logging.getLogger("usseg"), {})


class PrintableArgs(logging.LoggerAdapter):
    """A logger whose string and path arguments are made printable (``caf\\xe9.png``:
    :func:`usseg_core.errors.printable`) before the record is built."""

    def log(self, level, msg, *args, **kwargs):
        from pathlib import PurePath

        args = tuple(printable(str(a)) if isinstance(a, (str, PurePath)) else a for a in args)
        super().log(level, msg, *args, **kwargs)

    def process(self, msg, kwargs):  # the wrapped logger (Prefect's run logger) adds its own context
        return msg, kwargs


# --- the scaffold ----------------------------------------------------------------------------------

@dataclass
class Work:
    """What a stage's body gets: the artifact being written (reopened when a run resumes), the keyed
    ``params`` and ``upstream``, and :meth:`core` to hand the work on."""

    stage: Stage
    store: ArtifactStore
    art: Artifact
    params: Mapping[str, Any]
    upstream: Mapping[str, str]

    def core(self, fn: Callable, *data: Any, **kwargs: Any) -> Any:
        """``fn(*data, **kwargs)`` after checking that every keyword is keyed (:func:`check_keyed`).

        ``data`` are the inputs read from upstream artifacts (covered by their keys); parameters go by
        keyword."""
        check_keyed(self.stage, self.params, kwargs)
        CALLED.add(self.stage.name)
        return fn(*data, **kwargs)


def run_stage(storage: str, stage: Stage, params: Mapping[str, Any], upstream: Mapping[str, str] | None,
              body: Callable[[Work], Mapping[str, Any] | None], ref: Callable[[Artifact, bool], ArtifactRef], *,
              inputs=(), record_upstream: Mapping[str, str] | None = None,
              info: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
              prepare: Callable[[], None] | None = None, hit_note: Callable[[Artifact], str] | None = None,
              key: str | None = None, log=None) -> ArtifactRef:
    """The stage's artifact: found by key, or computed by ``body`` and finished.

    Args:
        params, upstream: what the key hashes (``upstream``: name -> upstream key or content hash).
        body: fills the folder (``Work.art``), returns the metadata to record at finish.
        ref: the reference of a complete artifact (``cache_hit`` True on a look-up).
        inputs: upstream references the lineage is copied from (first one that has each field).
        record_upstream: the upstream recorded in meta.json where it differs from the keyed one (a
            manifest is keyed by its content hash but recorded by its artifact key).
        info: metadata written at begin (overrides copied lineage), or a function returning it (called
            after ``prepare``).
        prepare: work after a miss and before begin: checks (a failure leaves no folder behind) and what
            ``info`` records.
        hit_note: text after ``cache hit: <stage>/<key>`` in the log.
        key: the key from the stage's own key function, where it has one that callers share
            (default ``artifact_key(stage.name, stage.version, params, upstream)``).
    """
    if log is None:
        log = logger()
    store = ArtifactStore(storage)
    key = key or artifact_key(stage.name, stage.version, params, upstream)
    art = store.get(stage.name, key)
    if art is not None:
        log.info("cache hit: %s/%s%s", stage.name, key, f" {hit_note(art)}" if hit_note else "")
        return ref(art, True)
    if lookups_only_active():  # the look-up pass: a miss stops here, before any work
        raise NotCached(stage.name, key)
    if prepare is not None:
        prepare()
    fresh = not store.path(stage.name, key).exists()
    try:
        art = store.begin(stage.name, key, version=stage.version, params=params,
                          upstream=record_upstream if record_upstream is not None else upstream,
                          **(lineage_of(inputs) | dict((info() if callable(info) else info) or {})))
        final = body(Work(stage, store, art, params, dict(upstream or {})))
        store.finish(art, **dict(final or {}))
    except Exception as exc:
        full = disk_full(exc, store, stage.name, key)
        if fresh and full is None:
            drop_if_empty(store, stage.name, key)
        if full is not None and full is not exc:
            raise full from exc
        raise
    return ref(art, False)


# --- the Prefect task of a stage --------------------------------------------------------------------

class Done:
    """The already-computed result of a stage task called under ``lookups_only`` (a future's API)."""

    def __init__(self, value) -> None:
        self.value = value

    def result(self, *args, **kwargs):
        return self.value

    def wait(self, *args, **kwargs) -> None:
        return None


def _resolved(obj):
    """``obj`` with every :class:`Done` in it (nested in lists, tuples, dicts) replaced by its value, as
    Prefect resolves futures passed to a task."""
    if isinstance(obj, Done):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolved(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _resolved(v) for k, v in obj.items()}
    return obj


class StageTask(Task):
    """A stage's Prefect task (``ensure_*``: find the artifact or compute it).

    Under :func:`usseg_core.store.lookups_only` it runs inline, without Prefect: a look-up needs no task
    run, and a miss raises ``NotCached`` before any work. Otherwise it is an ordinary task.
    """

    def __call__(self, *args, **kwargs):
        if lookups_only_active():
            return self.fn(*_resolved(args), **_resolved(kwargs))
        return super().__call__(*args, **kwargs)

    def submit(self, *args, **kwargs):
        if lookups_only_active():
            return Done(self.fn(*_resolved(args), **_resolved(kwargs)))
        return super().submit(*args, **kwargs)


def stage_task(name: str, **options):
    """``@stage_task("kmeans")``: the :class:`StageTask` of an ``ensure_*`` function (never Prefect-cached:
    the artifact store is the cache)."""
    return lambda fn: StageTask(fn=_with_inputs_fetched(fn), name=name, cache_policy=NO_CACHE, **options)


def _refs(obj, depth: int = 0) -> Iterator[ArtifactRef]:
    """The artifact references in a task's argument (nested in lists, tuples, dicts and dataclasses)."""
    if depth > 4:
        return
    if isinstance(obj, ArtifactRef):
        yield obj
    if isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from _refs(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _refs(item, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from _refs(getattr(obj, f.name), depth + 1)


def _with_inputs_fetched(fn):
    """``fn`` that first makes every artifact its arguments reference present in this machine's mirror of an
    object-store root (a Dask worker on another machine fetches its inputs from the bucket; on a local root,
    or when the mirror already holds the commit, this costs nothing or one small GET each)."""
    import functools

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        storage = kwargs.get("storage", args[0] if args else None)
        if isinstance(storage, str) and "://" in storage and not storage.startswith("file://"):
            store = ArtifactStore(storage)
            for stage, key in {(r.stage, r.key) for r in _refs((args, kwargs))}:
                if stage and key and key.isalnum():
                    store.get(stage, key)
        return fn(*args, **kwargs)

    return inner


def worker_id(device: str | None = None) -> str:
    """``host:pid`` of the process running a task (recorded by shards and trainings: where work ran),
    followed by the device ``device`` resolves to there (``usseg_core.device.device_label``) when given:
    ``host:1234 cuda:0 = GPU 3 (NVIDIA H100 80GB HBM3)`` on a Dask worker pinned to GPU 3."""
    import socket

    where = f"{socket.gethostname()}:{os.getpid()}"
    if device is None:
        return where
    from usseg_core.device import device_label, resolve_device

    return f"{where} {device_label(resolve_device(device))}"

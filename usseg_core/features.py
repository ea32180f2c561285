"""The Zarr feature store and the extraction loop that fills it.

Layout of one feature artifact (docs/architecture.md, "Feature store"): a Zarr v3 group with

- ``dense``  ``(N, C, h, w)`` float16, one chunk per item, zstd (Blosc) compressed, the chunks of
  ``shard_size`` consecutive items stored as one object (zarr's sharding codec): ``N / shard_size``
  objects, not N;
- ``pooled`` ``(N, C)`` float32: global average of the dense map (computed in fp32 before the cast);
- ``done``   ``(N,)`` bool: an item is marked done only after its dense and pooled rows are written.

Every chunk (every inner chunk of a shard, and each shard's index) ends with a crc32c and every chunk is
written, even one equal to the fill value: a damaged chunk, a missing chunk of an item marked done, or a
non-finite value read raises :class:`~usseg_core.errors.DamagedArtifact` naming the item
(usseg_core/integrity.py); non-finite values are refused on write (:class:`NonFiniteFeatures`).

``pooled`` and ``done`` are chunked by *shard* too: a shard is written by exactly one worker, so workers
never touch each other's objects. The extraction holds a shard's items in memory and writes the shard once
(a write into a shard rewrites the whole object); ``done`` is per item, so a killed run resumes item by
item: it loses only the items embedded but not yet written (:func:`extract_into`).

Training reads batches of dense maps (:meth:`FeatureStore.read_batch`) in one of two modes, chosen once by
:func:`choose_read_mode`: **in-memory** (every map decoded once into RAM) when the features fit the memory
budget (:func:`memory_budget`: ``$USSEG_FEATURE_MEMORY``, default 8 GiB), **streamed** otherwise (every
batch's chunks read and decoded when it is read, nothing kept). Both give the same values bit for bit.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync as zarr_sync

from usseg_core.chunk_reads import direct_reader
from usseg_core.device import autocast_for, resolve_precision  # noqa: F401  (the one precision policy)
from usseg_core.errors import ConfigError, UssegError
from usseg_core.integrity import checked_read, chunk_damage, chunk_key, in_complete_artifact, n_nonfinite

DENSE, POOLED, DONE = "dense", "pooled", "done"
MEMORY_ENV = "USSEG_FEATURE_MEMORY"  # bytes of dense features training may hold in RAM: "8G", "512M", "0"
DEFAULT_MEMORY_BUDGET = 8 << 30
IN_MEMORY, STREAMED = "in-memory", "streamed"
SHARD_SIZE = 128  # items per shard (and per extraction task): measured, docs/results.md "Sharded feature stores"
FLUSH_BYTES = 256 << 20  # dense bytes an extraction holds before it writes them into their shard
_log = logging.getLogger("usseg")


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


WRITE_ALL = {"write_empty_chunks": True}  # a chunk equal to the fill value is written too: absent = damaged


class NonFiniteFeatures(UssegError):
    """Features to be written hold nan or inf (``item``: the first such item's index); nothing was written."""

    def __init__(self, store: Path, item: int, count: int, array: str) -> None:
        self.store, self.item, self.count, self.array = store, item, count, array
        super().__init__(f"{store}: item {item}: {count} non-finite {array} values (nan/inf) refused")

    def __reduce__(self):  # pickles (Dask workers) with its arguments, not its message
        return type(self), (self.store, self.item, self.count, self.array)


def memory_budget() -> int:
    """Bytes of dense features that training keeps in memory: ``$USSEG_FEATURE_MEMORY`` or 8 GiB.

    The variable takes bytes with an optional binary suffix: ``16G``, ``512M``, ``0`` (always stream).
    """
    raw = os.environ.get(MEMORY_ENV, "").strip()
    if not raw:
        return DEFAULT_MEMORY_BUDGET
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", raw, flags=re.IGNORECASE)
    if m is None:
        raise ConfigError(f"${MEMORY_ENV}={raw!r}: expected bytes with an optional K/M/G/T suffix, e.g. 8G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def _read_chunks(dense: zarr.Array, items: np.ndarray) -> list[np.ndarray]:
    """Items ``dense[i]`` for i in ``items`` through Zarr, in one call (any layout, any store).

    One ``getitem`` per chunk, gathered: Zarr's orthogonal indexing (``oindex``) reads the same chunks but
    builds an ``np.ix_`` index over every element of each chunk, about 3x slower here (measured: 32 chunks
    of 384x28x28 float16, 2 cores: per item 105 ms, oindex 196 ms, gathered 52 ms).
    """
    arr = dense.async_array

    async def gather() -> list:
        return await asyncio.gather(*(arr.getitem(int(i)) for i in items))

    return [np.asarray(a) for a in zarr_sync(gather())]


class FeatureStore:
    """Read/write access to one feature group. Indexable: ``store[i]`` -> ``(C, h, w)`` float16."""

    def __init__(self, path: str | Path, mode: str = "r") -> None:
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:  # type: ignore[attr-defined]
            raise ConfigError(f"{self.path}: no feature store here") from exc
        self.dense = self.group[DENSE]
        self.pooled = self.group[POOLED]
        self.done = self.group[DONE]
        if mode != "r":  # Zarr does not store this setting: every writer sets it
            self.dense, self.pooled, self.done = (a.with_config(WRITE_ALL) for a in (self.dense, self.pooled,
                                                                                     self.done))
        self._cache: np.ndarray | None = None
        self._files = direct_reader(self.dense, self.path / DENSE, functools.partial(self._missing, DENSE))

    @classmethod
    def create(cls, path: str | Path, n: int, dim: int, h: int, w: int, shard_size: int = SHARD_SIZE,
               sharded: bool = True) -> "FeatureStore":
        """Create the arrays, or reopen them if a previous (crashed) run made them with this shape.

        ``shard_size`` items share one stored object of each array. ``sharded=False`` writes the layout
        of stores made before shards (one ``dense`` chunk file per item), kept for bench/shards.py's
        comparison and for tests that stores of that layout still read and verify."""
        path = Path(path)
        if (path / "zarr.json").exists():
            store = cls(path, mode="r+")
            if store.dense.shape == (n, dim, h, w) and store.done.chunks == (shard_size,) and (
                    store.dense.shards == ((shard_size, dim, h, w) if sharded else None)):
                return store
            raise ConfigError(f"{path}: existing feature store has shape {store.dense.shape} in shards of "
                              f"{store.shard_size} items, expected {(n, dim, h, w)} in shards of {shard_size}; "
                              "remove the incomplete artifact")
        if int(shard_size) != shard_size or shard_size < 1:
            raise ConfigError(f"shard_size must be a positive integer, got {shard_size!r}")
        group = zarr.open_group(str(path), mode="w")
        codecs = dict(compressors=(_compressor(), Crc32cCodec()), config=WRITE_ALL)  # crc32c of each chunk
        # sharded: each inner chunk (one item) keeps its crc32c; the shard index gets its own (zarr's default)
        shards = dict(shards=(shard_size, dim, h, w)) if sharded else {}
        group.create_array(DENSE, shape=(n, dim, h, w), chunks=(1, dim, h, w), dtype="float16", fill_value=0,
                           **shards, **codecs)
        group.create_array(POOLED, shape=(n, dim), chunks=(shard_size, dim), dtype="float32", fill_value=0,
                           **codecs)
        group.create_array(DONE, shape=(n,), chunks=(shard_size,), dtype="bool", fill_value=False, **codecs)
        return cls(path, mode="r+")

    # --- integrity: every read is checked, a damaged or missing chunk of a written item raises ------------

    def _missing(self, array: str, a: int, b: int) -> None:
        """The chunk of items ``[a, b)`` is absent: damage when one is marked done or the artifact is
        complete (every chunk is written); else they were never written and read as the fill value."""
        try:
            done = bool(np.asarray(self.done[a:b]).any())
        except ValueError:  # its done chunk is damaged too
            done = True
        if done or in_complete_artifact(self.path):
            raise chunk_damage(self.path / array / chunk_key(self.group[array], a), (a, b), "missing")

    def _zarr_read(self, array: str, items: np.ndarray, read: Callable[[], np.ndarray]) -> np.ndarray:
        return checked_read(self.group[array], self.path / array, items, read,
                            lambda a, b: self._missing(array, a, b))

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.dense.shape)  # type: ignore[return-value]

    @property
    def shard_size(self) -> int:
        return int(self.done.chunks[0])

    def shards(self) -> list[tuple[int, int]]:
        """Half-open item ranges, one per shard (aligned to the pooled/done chunks)."""
        n, s = len(self), self.shard_size
        return [(a, min(a + s, n)) for a in range(0, n, s)]

    def missing(self, start: int = 0, stop: int | None = None) -> list[int]:
        stop = len(self) if stop is None else stop
        done = self._zarr_read(DONE, np.arange(start, stop), lambda: np.asarray(self.done[start:stop]))
        return [start + int(i) for i in np.flatnonzero(~done)]

    def write(self, indices: Sequence[int], dense: np.ndarray, pooled: np.ndarray) -> None:
        """Write items; ``indices`` must be contiguous and inside one shard (one writer per shard). Each
        array's shard is written once, whole (a store's write replaces an object at once: zarr's LocalStore
        writes a temporary file and renames it, an object store's PUT is all or nothing), so the items of
        the shard written before are kept, whatever happens during this write.

        Non-finite values (after the cast to float16: a value above 65504 becomes inf) raise
        :class:`NonFiniteFeatures` naming the first such item, and nothing is written."""
        a, b = int(indices[0]), int(indices[-1]) + 1
        if b - a != len(indices) or a // self.shard_size != (b - 1) // self.shard_size:
            raise ValueError("write() takes contiguous indices inside one shard")
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused below
            dense, pooled = dense.astype(np.float16), pooled.astype(np.float32)
        for name, values in ((DENSE, dense), (POOLED, pooled)):
            if n_nonfinite(values):
                first = next(j for j in range(len(values)) if n_nonfinite(values[j]))
                raise NonFiniteFeatures(self.path, a + first, n_nonfinite(values[first]), name)
        self.dense[a:b] = dense
        self.pooled[a:b] = pooled
        self.done[a:b] = True  # last: done implies the data is there

    @property
    def nbytes(self) -> int:
        """Bytes of all dense maps in memory (float16)."""
        n, c, h, w = self.shape
        return n * c * h * w * 2

    def load_all(self, max_bytes: int | None = None) -> bool:
        """Keep every dense map in memory when they fit in ``max_bytes`` (default :func:`memory_budget`)."""
        if self.nbytes > (memory_budget() if max_bytes is None else max_bytes):
            return False
        if self._cache is None and self._files is not None:  # shard by shard, each item's bytes read directly
            cache = np.empty(self.shape, dtype=np.float16)
            for a, b in self.shards():
                self._files.read_into(np.arange(a, b), cache[a:b], np.arange(b - a))
            self._cache = cache
        elif self._cache is None:
            self._cache = self._zarr_read(DENSE, np.arange(len(self)), lambda: np.asarray(self.dense[:]))
        return True

    def unload(self) -> None:
        """Drop the in-memory copy: reads stream from the Zarr store again."""
        self._cache = None

    @property
    def in_memory(self) -> bool:
        return self._cache is not None

    def __getitem__(self, i: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[i]
        return self.read_batch([int(i)])[0]

    def read_batch(self, indices: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """``store[i]`` for every i in ``indices`` (any order, repeats allowed): ``(B, C, h, w)``.

        Streamed, each distinct chunk is read and decoded once (its bytes directly, see
        usseg_core/chunk_reads.py, or through Zarr for another layout); in memory, a copy out of the cache. ``out`` (shape ``(B, C, h, w)``, any float dtype, e.g. float32 or a pinned
        buffer's view) receives the values (cast once); default a new float16 array. Same values either way.
        """
        idx = _check_indices(indices, len(self))
        if out is None:
            out = np.empty((len(idx), *self.shape[1:]), dtype=np.float16)
        if self._cache is not None:
            for j, i in enumerate(idx):
                out[j] = self._cache[i]
            return out
        uniq, inverse = np.unique(idx, return_inverse=True)
        if self._files is not None:
            self._files.read_into(uniq, out, inverse)
            return out
        chunks = self._zarr_read(DENSE, uniq, lambda: np.stack(_read_chunks(self.dense, uniq)))
        for j, k in enumerate(inverse):
            out[j] = chunks[k]
        return out

    def pooled_all(self) -> np.ndarray:
        return self._zarr_read(POOLED, np.arange(len(self)), lambda: np.asarray(self.pooled[:], dtype=np.float32))

    def is_complete(self) -> bool:
        return not self.missing()


def prefetch_iter(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``items``, producing the next ``depth`` of them in a background thread (decoding, reading)
    while the consumer works on the current one. Errors re-raise in the consumer; abandoning the iteration
    stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()
    stop = threading.Event()
    failure: list[BaseException] = []

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as exc:  # re-raised in the consumer, with its traceback
            failure.append(exc)
        put(sentinel)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                break
            yield item
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


@torch.no_grad()
def embed(backbone: torch.nn.Module, images: torch.Tensor, precision: str = "auto"
          ) -> tuple[np.ndarray, np.ndarray]:
    """Dense and pooled features of a batch ``(B, 3, H, W)`` in [0, 1] -> ``(B,C,h,w)``, ``(B,C)``."""
    device = next(backbone.parameters()).device
    x = backbone.normalize(images.to(device, non_blocking=True))
    with autocast_for(device, precision):
        feats = backbone(x)  # (B, C, h, w)
    feats = feats.float()
    pooled = feats.mean(dim=(2, 3))  # (B, C) global average pooling, fp32
    return feats.cpu().numpy(), pooled.cpu().numpy()


def extract_into(store: FeatureStore, backbone: torch.nn.Module, load_item: Callable[[int], torch.Tensor],
                 indices: Sequence[int], *, batch_size: int = 8, precision: str = "auto",
                 progress: Callable[[int], None] | None = None, flush_bytes: int = FLUSH_BYTES) -> int:
    """Embed the items ``indices`` and write them; returns the count.

    ``load_item(i)`` gives item i as (3, H, W) float in [0, 1]. Batches never straddle a shard. Embedded
    items are held until their shard's last item in ``indices`` is embedded, or until ``flush_bytes`` of
    dense maps are held, then written in one write per contiguous run: a write into a shard rewrites the
    whole object, so a shard is written once, not once per batch. Resume is per item: a kill loses the
    items held, never one written (``done`` is set after each write).
    """
    def batches() -> Iterable[tuple[list[int], torch.Tensor]]:
        for run in _contiguous_runs(indices, store.shard_size, batch_size):
            yield run, torch.stack([load_item(i) for i in run])

    held: list[tuple[list[int], np.ndarray, np.ndarray]] = []  # (items, dense float16, pooled float32)

    def flush() -> None:
        if held:
            items = [i for run, _, _ in held for i in run]
            dense = np.concatenate([d for _, d, _ in held])
            pooled = np.concatenate([p for _, _, p in held])
            at = 0
            for run in _contiguous_runs(items, store.shard_size, len(items)):
                store.write(run, dense[at:at + len(run)], pooled[at:at + len(run)])
                at += len(run)
            held.clear()

    written = 0
    for run, images in prefetch_iter(batches()):
        if held and run[0] // store.shard_size != held[0][0][0] // store.shard_size:
            flush()  # the previous shard is complete
        dense, pooled = embed(backbone, images, precision)
        with np.errstate(over="ignore"):  # held as stored; an overflow becomes inf, refused by write()
            held.append((run, dense.astype(np.float16), pooled))
        if sum(d.nbytes for _, d, _ in held) >= flush_bytes:
            flush()
        written += len(run)
        if progress:
            progress(len(run))
    flush()
    return written


def _contiguous_runs(indices: Sequence[int], shard_size: int, batch_size: int) -> Iterable[list[int]]:
    """``indices`` sorted, in runs of consecutive items inside one shard, at most ``batch_size`` long."""
    run: list[int] = []
    for i in sorted(indices):
        if run and (i != run[-1] + 1 or i // shard_size != run[0] // shard_size or len(run) == batch_size):
            yield run
            run = []
        run.append(i)
    if run:
        yield run


class ConcatFeatures:
    """Several feature stores seen as one indexable training set (e.g. train + val splits)."""

    def __init__(self, stores: Sequence[FeatureStore]) -> None:
        if not stores:
            raise ConfigError("ConcatFeatures needs at least one feature store")
        shapes = {s.shape[1:] for s in stores}
        if len(shapes) != 1:
            raise ConfigError(f"feature stores differ in (C, h, w): {sorted(shapes)}")
        self.stores = list(stores)
        self.offsets = np.cumsum([0] + [len(s) for s in stores])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self.stores[0].shape[1:])  # type: ignore[return-value]

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.stores[s][int(i - self.offsets[s])]

    def read_batch(self, indices: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """:meth:`FeatureStore.read_batch` over the concatenation (one read per store touched)."""
        idx = _check_indices(indices, len(self))
        if out is None:
            out = np.empty((len(idx), *self.shape[1:]), dtype=np.float16)
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        if len(self.stores) == 1 or (len(idx) and (which == which[0]).all()):
            s = int(which[0]) if len(idx) else 0
            return self.stores[s].read_batch(idx - self.offsets[s], out=out)
        for s in np.unique(which):
            pos = np.flatnonzero(which == s)
            out[pos] = self.stores[s].read_batch(idx[pos] - self.offsets[s])
        return out

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stores)

    @property
    def in_memory(self) -> bool:
        return all(s.in_memory for s in self.stores)

    def pooled_all(self) -> np.ndarray:
        return np.concatenate([s.pooled_all() for s in self.stores])

    def load_all(self, max_bytes: int | None = None) -> bool:
        """Every store in memory when together they fit ``max_bytes`` (default :func:`memory_budget`)."""
        if self.nbytes > (memory_budget() if max_bytes is None else max_bytes):
            return False
        return all(s.load_all(self.nbytes) for s in self.stores)

    def unload(self) -> None:
        for s in self.stores:
            s.unload()


def _check_indices(indices: Sequence[int], n: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"item indices must lie in [0, {n}), got [{idx.min()}, {idx.max()}]")
    return idx


def read_items(features: Sequence, indices: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """``features[i]`` for i in ``indices`` as one ``(B, C, h, w)`` array (into ``out`` when given).

    Uses ``features.read_batch`` where the source has one (feature stores: each distinct chunk once), else
    indexes item by item (a list of arrays, a source that computes its items).
    """
    if hasattr(features, "read_batch"):
        return features.read_batch(indices, out=out)
    items = [np.asarray(features[int(i)]) for i in indices]
    if out is None:
        return np.stack(items)
    for j, item in enumerate(items):
        out[j] = item
    return out


@dataclass(frozen=True)
class ReadMode:
    """How training reads its dense features: :data:`IN_MEMORY` or :data:`STREAMED`, and why."""

    mode: str
    nbytes: int  # dense features of every source together (float16)
    budget: int  # the memory budget they were compared with

    def __str__(self) -> str:
        return (f"{self.mode} ({self.nbytes / 2**30:.2f} GiB of dense features, "
                f"budget {self.budget / 2**30:.2f} GiB, ${MEMORY_ENV})")


def choose_read_mode(sources: Sequence, max_bytes: int | None = None) -> ReadMode:
    """Load every source into memory when together they fit ``max_bytes``, else stream them all.

    ``sources`` have ``nbytes``, ``load_all`` and ``unload`` (feature stores, :class:`ConcatFeatures`,
    view banks). ``max_bytes`` defaults to :func:`memory_budget`. The choice is logged.
    """
    budget = memory_budget() if max_bytes is None else int(max_bytes)
    total = sum(int(s.nbytes) for s in sources)
    fits = total <= budget
    for s in sources:
        if fits:
            s.load_all(total)
        else:
            s.unload()
    choice = ReadMode(IN_MEMORY if fits else STREAMED, total, budget)
    _log.debug("training reads features %s", choice)
    return choice

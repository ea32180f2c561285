"""The Zarr feature store and the extraction loop that fills it.

Layout of one feature artifact (ARCHITECTURE.md, "Feature store"): a Zarr v3 group with

- ``dense``  ``(N, C, h, w)`` float16, one chunk per item, zstd (Blosc) compressed;
- ``pooled`` ``(N, C)`` float32: global average of the dense map (computed in fp32 before the cast);
- ``done``   ``(N,)`` bool: an item is marked done only after its dense and pooled rows are written.

``pooled`` and ``done`` are chunked by *shard* (``shard_size`` items): a shard is written by exactly one
worker, so workers never touch each other's chunks, and a killed run resumes item by item from ``done``.
"""
from __future__ import annotations

import contextlib
import queue
import threading
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from usseg_core.device import autocast_for, resolve_precision  # noqa: F401  (the one precision policy)
from usseg_core.errors import ConfigError

DENSE, POOLED, DONE = "dense", "pooled", "done"


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


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
        self._cache: np.ndarray | None = None

    @classmethod
    def create(cls, path: str | Path, n: int, dim: int, h: int, w: int,
               shard_size: int = 64) -> "FeatureStore":
        """Create the arrays, or reopen them if a previous (crashed) run made them with this shape."""
        path = Path(path)
        if (path / "zarr.json").exists():
            store = cls(path, mode="r+")
            if store.dense.shape == (n, dim, h, w) and store.done.chunks == (shard_size,):
                return store
            raise ConfigError(f"{path}: existing feature store has shape {store.dense.shape}, "
                              f"expected {(n, dim, h, w)}; remove the incomplete artifact")
        group = zarr.open_group(str(path), mode="w")
        group.create_array(DENSE, shape=(n, dim, h, w), chunks=(1, dim, h, w), dtype="float16",
                           compressors=_compressor(), fill_value=0)
        group.create_array(POOLED, shape=(n, dim), chunks=(shard_size, dim), dtype="float32",
                           compressors=_compressor(), fill_value=0)
        group.create_array(DONE, shape=(n,), chunks=(shard_size,), dtype="bool", fill_value=False)
        return cls(path, mode="r+")

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
        done = np.asarray(self.done[start:stop])
        return [start + int(i) for i in np.flatnonzero(~done)]

    def write(self, indices: Sequence[int], dense: np.ndarray, pooled: np.ndarray) -> None:
        """Write items; ``indices`` must be contiguous and inside one shard (one writer per chunk)."""
        a, b = int(indices[0]), int(indices[-1]) + 1
        if b - a != len(indices) or a // self.shard_size != (b - 1) // self.shard_size:
            raise ValueError("write() takes contiguous indices inside one shard")
        self.dense[a:b] = dense.astype(np.float16)
        self.pooled[a:b] = pooled.astype(np.float32)
        self.done[a:b] = True  # last: done implies the data is there

    def load_all(self, max_bytes: int = 8 << 30) -> bool:
        """Keep every dense map in memory when they fit in ``max_bytes`` (fast training reads)."""
        n, c, h, w = self.shape
        if n * c * h * w * 2 > max_bytes:
            return False
        self._cache = np.asarray(self.dense[:])
        return True

    def __getitem__(self, i: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[i]
        return np.asarray(self.dense[int(i)])

    def pooled_all(self) -> np.ndarray:
        return np.asarray(self.pooled[:], dtype=np.float32)

    def is_complete(self) -> bool:
        return bool(np.asarray(self.done[:]).all())


def _prefetch(batches: Iterable, depth: int = 2) -> Iterable:
    """Decode the next batches in a background thread while the backbone runs."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            for item in batches:
                q.put(item)
        except BaseException as exc:  # re-raised in the consumer, with its traceback
            failure.append(exc)
        finally:
            q.put(sentinel)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while True:
        item = q.get()
        if item is sentinel:
            break
        yield item
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
                 progress: Callable[[int], None] | None = None) -> int:
    """Embed the items ``indices`` (contiguous runs within shards) and write them; returns the count.

    ``load_item(i)`` gives item i as (3, H, W) float in [0, 1]. Batches never straddle a shard, so a
    shard's chunks have one writer.
    """
    def batches() -> Iterable[tuple[list[int], torch.Tensor]]:
        for run in _contiguous_runs(indices, store.shard_size, batch_size):
            yield run, torch.stack([load_item(i) for i in run])

    written = 0
    for run, images in _prefetch(batches()):
        dense, pooled = embed(backbone, images, precision)
        store.write(run, dense, pooled)
        written += len(run)
        if progress:
            progress(len(run))
    return written


def _contiguous_runs(indices: Sequence[int], shard_size: int, batch_size: int) -> Iterable[list[int]]:
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

    def pooled_all(self) -> np.ndarray:
        return np.concatenate([s.pooled_all() for s in self.stores])

    def load_all(self, max_bytes: int = 8 << 30) -> bool:
        return all(s.load_all(max_bytes // len(self.stores)) for s in self.stores)

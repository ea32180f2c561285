"""Direct reads of a feature store's dense items: each item's bytes fetched, checked and decoded without
Zarr's per-chunk read path, for the layout :meth:`~usseg_core.features.FeatureStore.create` writes (one item
per chunk, little-endian bytes, one Blosc codec, then crc32c; in shards or one object per item).

- :class:`LocalChunkReads`, a local store: ``os.pread`` of each item's byte range in its shard (or of its
  chunk file), after the shard's index.
- :class:`StoreChunkReads`, any other Zarr store (an object store): per shard one request for its index
  (the last bytes), then one byte-range request per item, all concurrent. Zarr's own read of a shard
  fetches the index again for every item it reads.

A background reader next to a Python training loop must hold the GIL as little as possible. Zarr 3's
read path runs per chunk in Python (asyncio tasks, indexers, buffers: ~1.7 ms of one core per 384x28x28
float16 chunk, and it slows a concurrent op-by-op torch loop by 1.6x on 2 cores); a file read plus
``numcodecs.blosc.decompress`` into the batch (both without the GIL) costs ~0.8 ms and slows it by 1.15x
(measured, see bench/scale.py; shards: bench/shards.py). Each item's crc32c is checked before it is
decoded, and its values for nan / inf after; damage raises as every reader's does (usseg_core/integrity.py).
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Callable

import numcodecs.blosc
import numpy as np

from usseg_core.integrity import (EMPTY, chunk_codecs, chunk_damage, chunk_key, index_bytes, inner_chunks, item_step,
                                  n_nonfinite, payload, shard_index)

Missing = Callable[[int, int], None]  # items [a, b) have no stored bytes: raises unless never written


def direct_reader(dense, root: Path, missing: Missing, local: bool | None = None):
    """The direct reader of ``dense`` (whose objects lie under ``root``), or None when its layout is not
    FeatureStore's (such an array reads through Zarr). ``local`` None: by its store's kind."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
    from zarr.storage import LocalStore

    codecs = chunk_codecs(dense)
    plain = (len(codecs) == 3 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], BloscCodec)
             and isinstance(codecs[2], Crc32cCodec)
             and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder))
    if not plain or dense.chunks != (1, *dense.shape[1:]) or np.dtype(dense.dtype) != np.float16:
        return None
    local = isinstance(dense.store, LocalStore) if local is None else local
    return (LocalChunkReads if local else StoreChunkReads)(dense, root, missing)


class _Reads:
    def __init__(self, dense, root: Path, missing: Missing) -> None:
        self.dense, self.root, self.missing = dense, root, missing
        self.inner = inner_chunks(dense)  # items per shard; None: one object per item
        self.n = int(dense.shape[0])

    def read_into(self, items: np.ndarray, out: np.ndarray, inverse: np.ndarray) -> None:
        """``out[j] = dense[items[inverse[j]]]``: each distinct item read and decoded once (``items`` sorted,
        distinct)."""
        first = np.full(len(items), -1)  # position in ``out`` of a distinct item's first copy
        for j, k in enumerate(inverse):
            if first[k] < 0:
                first[k] = j
        self._read(np.asarray(items, dtype=np.int64), out, first)
        for j, k in enumerate(inverse):
            if first[k] != j:
                out[j] = out[first[k]]

    def _groups(self, items: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(first item of the object, positions in ``items``) of each stored object ``items`` touch."""
        step = item_step(self.dense)
        objects = items // step
        return [(int(o) * step, np.flatnonzero(objects == o)) for o in np.unique(objects)]

    def _absent(self, a: int, b: int, out: np.ndarray, at) -> None:
        self.missing(a, b)  # raises when one of them was written: damage
        out[at] = self.dense.fill_value

    def _decode(self, data, obj: Path, i: int, out: np.ndarray, j: int) -> None:
        body = payload(data)
        if body is None:
            raise chunk_damage(obj, (i, i + 1), "checksum mismatch")
        item = np.empty(self.dense.shape[1:], dtype=np.float16)
        numcodecs.blosc.decompress(body, item)
        if n_nonfinite(item):
            raise chunk_damage(obj, (i, i + 1), f"{n_nonfinite(item)} non-finite values (nan/inf)")
        out[j] = item

    def _index(self, tail: bytes, obj: Path, a: int) -> np.ndarray:
        index = shard_index(tail, self.inner)
        if index is None:
            raise chunk_damage(obj, (a, min(a + self.inner, self.n)), "shard index checksum mismatch")
        return index


class LocalChunkReads(_Reads):
    """Items of a local store: its files read with ``os.pread`` (no Python file object, no GIL held)."""

    def _read(self, items: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        for a, ks in self._groups(items):
            obj = self.root / chunk_key(self.dense, a)
            try:
                fd = os.open(obj, os.O_RDONLY)
            except FileNotFoundError:
                if self.inner:  # a whole shard absent
                    self._absent(a, min(a + self.inner, self.n), out, at[ks])
                else:
                    self._absent(a, a + 1, out, at[ks])
                continue
            try:
                if not self.inner:
                    self._decode(os.pread(fd, os.fstat(fd).st_size, 0), obj, a, out, int(at[ks[0]]))
                    continue
                size, need = os.fstat(fd).st_size, index_bytes(self.inner)
                index = self._index(os.pread(fd, need, max(0, size - need)), obj, a)
                for k in ks:
                    i = int(items[k])
                    off, nbytes = index[i - a]
                    if off == EMPTY:
                        self._absent(i, i + 1, out, at[k])
                    else:
                        self._decode(os.pread(fd, int(nbytes), int(off)), obj, i, out, int(at[k]))
            finally:
                os.close(fd)


class StoreChunkReads(_Reads):
    """Items of any Zarr store through its byte-range API: per shard its index once, then its items'
    byte ranges, every request of a batch in flight at once."""

    def _read(self, items: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
        from zarr.abc.store import RangeByteRequest, SuffixByteRequest
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        store, proto, prefix = self.dense.store, default_buffer_prototype(), self.dense.path

        async def get(key: str, byte_range=None) -> bytes | None:
            buf = await store.get(f"{prefix}/{key}" if prefix else key, proto, byte_range)
            return None if buf is None else buf.to_bytes()

        async def one(a: int, ks: np.ndarray) -> list:
            """((first item, end), positions in ``out``, bytes or None) of what object ``a`` holds."""
            key = chunk_key(self.dense, a)
            if not self.inner:
                return [((a, a + 1), at[ks[0]], await get(key))]
            tail = await get(key, SuffixByteRequest(index_bytes(self.inner)))
            if tail is None:  # a whole shard absent
                return [((a, min(a + self.inner, self.n)), at[ks], None)]
            index = self._index(tail, self.root / key, a)
            wanted = [(int(items[k]), at[k], index[int(items[k]) - a]) for k in ks]
            datas = iter(await asyncio.gather(*(get(key, RangeByteRequest(int(off), int(off) + int(n)))
                                                for _, _, (off, n) in wanted if off != EMPTY)))
            return [((i, i + 1), j, None if off == EMPTY else next(datas)) for i, j, (off, _) in wanted]

        async def every() -> list:
            return await asyncio.gather(*(one(a, ks) for a, ks in self._groups(items)))

        for (a, _), found in zip(self._groups(items), sync(every())):
            obj = self.root / chunk_key(self.dense, a)
            for span, j, data in found:
                if data is None:
                    self._absent(*span, out, j)
                else:
                    self._decode(data, obj, span[0], out, int(j))

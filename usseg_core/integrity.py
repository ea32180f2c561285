"""Caches that detect their own damage: checked Zarr chunks and the whole-artifact check.

Every chunk :class:`~usseg_core.features.FeatureStore` writes ends with zarr's ``crc32c`` codec: 4 bytes,
the little-endian crc32c (``google_crc32c.value``, what zarr uses) of the compressed bytes before them.
Every chunk is written, even one equal to the fill value (``write_empty_chunks``), so a missing chunk of an
item marked done is damage, never zeros. Readers check both (:func:`payload`, :func:`chunk_damage`); this
module also holds the check of a whole artifact behind ``usseg storage verify`` (:func:`verify_artifact`):
its recorded file digests (``usseg_core/store.py``), every Zarr chunk's checksum and presence, finite
values, ``done`` marks, and that its ``.pt`` / ``.npy`` / ``.json`` files load.

A *sharded* array (zarr's sharding codec: ``dense`` of a feature store) keeps many items' chunks in one
stored object, the *shard*: the items' chunks one after the other, then an index of ``(offset, nbytes)``
per chunk (uint64, little-endian; both all ones for a chunk never written) with its own crc32c. Each inner
chunk keeps its crc32c, so damage is still found and named item by item (:func:`shard_index`,
:func:`inner_chunk`); an absent inner chunk of a done item is damage, as an absent chunk file is.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import google_crc32c
import numpy as np

from usseg_core.errors import DamagedArtifact
from usseg_core.store import FILES, MARKER, META, Artifact, file_problems

CRC_BYTES = 4
_F16_EXP = 0x7C00  # float16 exponent bits: all set = inf or nan
EMPTY = np.uint64(2**64 - 1)  # a shard index entry of a chunk never written (zarr's sharding codec)


def payload(data: bytes) -> np.ndarray | None:
    """The bytes before a chunk's trailing crc32c (a uint8 view, no copy), or None when it does not match."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if len(raw) < CRC_BYTES:
        return None
    body = raw[:-CRC_BYTES]
    return body if google_crc32c.value(body) == int.from_bytes(data[-CRC_BYTES:], "little") else None


def n_nonfinite(values: np.ndarray, block: int = 1 << 22) -> int:
    """How many of ``values`` are nan or inf: float16 through its exponent bits (20x faster than isfinite),
    ``block`` elements at a time (a check of an in-memory store must not double its memory)."""
    if values.dtype.kind != "f":
        return 0
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.dtype == np.float16:
        bits = flat.view(np.uint16)
        return sum(int(np.count_nonzero((bits[a:a + block] & _F16_EXP) == _F16_EXP))
                   for a in range(0, len(bits), block))
    return sum(int(block - np.count_nonzero(np.isfinite(flat[a:a + block]))) - max(0, a + block - len(flat))
               for a in range(0, len(flat), block))


def artifact_folder(path: Path) -> Path:
    """The artifact folder holding ``path`` (nearest of it and its parents with a ``meta.json``), or
    ``path`` itself for a store outside the artifact store."""
    for folder in (path, *list(path.parents)[:3]):
        if (folder / META).is_file():
            return folder
    return path


def in_complete_artifact(path: Path) -> bool:
    folder = artifact_folder(path)
    return (folder / META).is_file() and (folder / MARKER).exists()


def _items(start: int, stop: int) -> str:
    return f"item {start}" if stop - start == 1 else f"items {start}-{stop - 1}"


def chunk_damage(chunk: Path, items: tuple[int, int] | None, what: str) -> DamagedArtifact:
    """The error for a damaged chunk file of the items ``[start, stop)``, named relative to its artifact."""
    store = next((p for p in chunk.parents if p.suffix == ".zarr"), chunk.parent)
    folder = artifact_folder(store)
    where = chunk.relative_to(store.parent if folder == store else folder).as_posix()
    return DamagedArtifact(folder, f"{_items(*items)} ({where}): {what}" if items else f"{where}: {what}")


def item_step(arr) -> int:
    """Items per stored object of an array split along its first axis: a shard's, else a chunk's."""
    return int((arr.shards or arr.chunks)[0])


def chunk_key(arr, i: int) -> str:
    """The key of the object holding item ``i`` of an array split along its first axis (``c/17/0/0/0``):
    its chunk, or its shard for a sharded array."""
    return arr.metadata.encode_chunk_key((i // item_step(arr),) + (0,) * (len(arr.shape) - 1))


def inner_chunks(arr) -> int | None:
    """Items per shard when ``arr`` is sharded the way :class:`~usseg_core.features.FeatureStore` writes it
    (one item per inner chunk, the index at the end with a crc32c), else None (not sharded)."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    codecs = getattr(arr.metadata, "codecs", ())  # a Zarr v2 array has none: not sharded
    if not (len(codecs) == 1 and isinstance(codecs[0], ShardingCodec)):
        return None
    sharding = codecs[0]
    index = sharding.index_codecs
    if (sharding.index_location.value != "end" or len(index) != 2 or not isinstance(index[0], BytesCodec)
            or not isinstance(index[1], Crc32cCodec) or tuple(arr.chunks[1:]) != tuple(arr.shape[1:])
            or int(arr.chunks[0]) != 1):
        raise ValueError(f"unexpected sharded layout {sharding} (one item per inner chunk, index at the end "
                         "with a crc32c expected)")
    return int(arr.shards[0])


def chunk_codecs(arr) -> tuple:
    """The codecs of each chunk holding values: the inner chunks' of a sharded array, else the array's."""
    codecs = getattr(arr.metadata, "codecs", ())
    return tuple(codecs[0].codecs) if inner_chunks(arr) else tuple(codecs)


def index_bytes(n_inner: int) -> int:
    return n_inner * 16 + CRC_BYTES


def shard_index(tail: bytes, n_inner: int) -> np.ndarray | None:
    """``(n_inner, 2)`` uint64 ``(offset, nbytes)`` of each inner chunk, from a shard's last
    :func:`index_bytes` bytes (or the whole shard); None when they are too few or their crc32c fails."""
    size = index_bytes(n_inner)
    if len(tail) < size:
        return None
    body = payload(tail[len(tail) - size:])
    return None if body is None else body.view("<u8").reshape(n_inner, 2)


def inner_chunk(data: bytes, index: np.ndarray, j: int) -> bytes | None:
    """Inner chunk ``j`` of a shard's bytes (crc32c included), None when it was never written."""
    off, size = index[j]
    if off == EMPTY:
        return None
    return data[int(off):int(off) + int(size)]


def read_tail(path: Path, nbytes: int) -> bytes:
    """The last ``nbytes`` of a file (a shard's index) without reading the rest."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, min(nbytes, size), max(0, size - nbytes))
    finally:
        os.close(fd)


def _shard_damage(shard: Path, span: tuple[int, int]) -> DamagedArtifact:
    return chunk_damage(shard, span, "shard index checksum mismatch")


def checked_read(arr, root: Path, items: np.ndarray, read: Callable[[], np.ndarray],
                 missing: Callable[[int, int], None]) -> np.ndarray:
    """``read()`` (a Zarr read of the first-axis indices ``items`` of ``arr``, whose objects lie in
    ``root``), checked: ``missing(a, b)`` for each absent chunk (or inner chunk of a shard) of items
    ``[a, b)`` (it raises unless they were never written), a crc32c mismatch and non-finite values raise
    :class:`DamagedArtifact`."""
    step, n, inner = item_step(arr), int(arr.shape[0]), inner_chunks(arr)
    items = np.asarray(items, dtype=np.int64)
    starts = [int(a) for a in np.unique(items // step) * step]
    for a in starts:
        obj = root / chunk_key(arr, a)
        if not obj.exists():
            missing(a, min(a + step, n))
        elif inner:  # a shard: each item asked for must have its inner chunk
            index = shard_index(read_tail(obj, index_bytes(inner)), inner)
            if index is None:
                raise _shard_damage(obj, (a, min(a + step, n)))
            for i in np.unique(items[(items >= a) & (items < a + step)]):
                if index[int(i) - a, 0] == EMPTY:
                    missing(int(i), int(i) + 1)
    try:
        values = read()
    except ValueError as exc:
        if "checksum" not in str(exc):  # zarr's Crc32cCodec: "Stored and computed checksum do not match"
            raise
        _name_checksum_damage(arr, root, items, starts, inner, exc)
        raise DamagedArtifact(artifact_folder(root), f"{root.name}: {exc}") from exc
    if n_nonfinite(values):  # values[j] is item items[j]
        j = next(j for j in range(len(values)) if n_nonfinite(values[j]))
        i = int(items[j])
        raise chunk_damage(root / chunk_key(arr, i), (i, i + 1), f"{n_nonfinite(values[j])} non-finite values "
                           "(nan/inf)")
    return values


def _name_checksum_damage(arr, root: Path, items: np.ndarray, starts: list[int], inner: int | None,
                          exc: Exception) -> None:
    """Raise the error naming the first damaged chunk (or inner chunk) among those ``items`` touch."""
    step, n = item_step(arr), int(arr.shape[0])
    for a in starts:
        obj = root / chunk_key(arr, a)
        if not obj.exists():
            continue
        data = obj.read_bytes()
        if not inner:
            if payload(data) is None:
                raise chunk_damage(obj, (a, min(a + step, n)), "checksum mismatch") from exc
            continue
        index = shard_index(data, inner)
        if index is None:
            raise _shard_damage(obj, (a, min(a + step, n))) from exc
        for i in np.unique(items[(items >= a) & (items < a + step)]):
            chunk = inner_chunk(data, index, int(i) - a)
            if chunk is not None and payload(chunk) is None:
                raise chunk_damage(obj, (int(i), int(i) + 1), "checksum mismatch") from exc


# --- the whole-artifact check (usseg storage verify) -------------------------------------------------

@dataclass
class Verdict:
    """What :func:`verify_artifact` found: ``status`` ok | damaged | incomplete, the problems, the notes
    (what could not be checked, e.g. an artifact finished before digests were recorded)."""

    artifact: Artifact
    status: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_artifact(art: Artifact) -> Verdict:
    """Check a whole artifact: every recorded file's sha256 and size, every Zarr chunk's checksum and
    presence, finite feature values, ``done`` marks, and that its ``.pt`` / ``.npy`` / ``.npz`` / ``.json``
    files load. An incomplete artifact is not checked (it is resumed, or removed by ``storage gc``)."""
    if not art.complete:
        return Verdict(art, "incomplete", notes=["incomplete: not checked (resumed by its stage, or storage gc)"])
    problems, notes = [], []
    if FILES in art.meta:
        problems += file_problems(art, hashes=True)
    else:
        notes.append("no digests recorded (finished before they were)")
    for store in sorted(p for p in art.path.rglob("*.zarr") if (p / "zarr.json").is_file()):
        zp, zn = zarr_problems(store, art.path)
        problems += zp
        notes += zn
    named = {p.split(":")[0] for p in problems}
    problems += [p for p in (_load_problem(f, art.path) for f in _loadable(art.path)
                             if f.relative_to(art.path).as_posix() not in named) if p]
    return Verdict(art, "damaged" if problems else "ok", problems, sorted(set(notes)))


def _loadable(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != META and ".zarr" not in p.parts
                  and p.suffix in (".pt", ".pth", ".npy", ".npz", ".json"))


def _load_problem(path: Path, folder: Path) -> str | None:
    rel = path.relative_to(folder).as_posix()
    try:
        if path.suffix in (".pt", ".pth"):
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".npy":
            np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                for name in npz.files:
                    npz[name]
        else:
            json.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        first = (str(exc).splitlines() or [""])[0].split(". ")[0][:160]
        return f"{rel}: unreadable ({type(exc).__name__}: {first})"
    return None


def zarr_problems(store: Path, folder: Path) -> tuple[list[str], list[str]]:
    """Problems and notes of one Zarr group of a complete artifact: each array's every chunk (every inner
    chunk of a shard) present, its crc32c matching, its float values finite; a ``done`` array all set."""
    import zarr
    from zarr.codecs import Crc32cCodec

    problems, notes = [], []
    try:
        group = zarr.open_group(str(store), mode="r")
        arrays = sorted(group.arrays())
    except Exception as exc:  # noqa: BLE001 - an unreadable group is the finding
        return [f"{store.relative_to(folder).as_posix()}: unreadable Zarr group ({exc})"], []
    for name, arr in arrays:
        codecs = chunk_codecs(arr)
        crc = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
        if not crc:
            notes.append(f"{store.name}/{name}: no chunk checksums (written before they were)")
        found = (_shard_problems(store, arr) if inner_chunks(arr) else _chunk_problems(store, arr, crc))
        for obj, span, what in found:
            if what == "missing" and not crc:  # before every chunk was written: maybe all fill value
                notes.append(f"{store.name}/{name}: chunks absent (read as the fill value)")
            else:
                problems.append(str(chunk_damage(obj, span, what).problem))
    if "done" in dict(arrays) and not problems:
        done = np.asarray(group["done"][:])
        if not done.all():
            missing = np.flatnonzero(~done)
            problems.append(f"{store.name}/done: {len(missing)} items not marked done in a complete artifact "
                            f"(first: item {int(missing[0])})")
    return problems, notes


def _chunk_problems(store: Path, arr, crc: bool):
    """(chunk file, items, problem) of each damaged chunk of an unsharded array."""
    decode, step = _direct_decoder(arr), int(arr.chunks[0])
    for coords in np.ndindex(*arr.cdata_shape):
        chunk = store / arr.path / arr.metadata.encode_chunk_key(coords)
        a = coords[0] * step if coords else 0
        span = (a, min(a + step, int(arr.shape[0]))) if arr.shape else None
        try:
            data = chunk.read_bytes()
        except FileNotFoundError:
            yield chunk, span, "missing"
            continue
        what = _chunk_problem(data, arr, crc, decode, lambda: np.asarray(arr.get_block_selection(coords)))
        if what:
            yield chunk, span, what


def _shard_problems(store: Path, arr):
    """(shard file, items, problem) of each absent shard, damaged index and damaged or absent inner chunk."""
    decode, step, n = _direct_decoder(arr), item_step(arr), int(arr.shape[0])
    for a in range(0, n, step):
        shard = store / arr.path / chunk_key(arr, a)
        b = min(a + step, n)
        try:
            data = shard.read_bytes()
        except FileNotFoundError:
            yield shard, (a, b), "missing"
            continue
        index = shard_index(data, step)
        if index is None:
            yield shard, (a, b), "shard index checksum mismatch"
            continue
        for i in range(a, b):
            chunk = inner_chunk(data, index, i - a)
            what = "missing" if chunk is None else _chunk_problem(chunk, arr, True, decode,
                                                                  lambda i=i: np.asarray(arr[i]))
            if what:
                yield shard, (i, i + 1), what


def _direct_decoder(arr) -> Callable[[np.ndarray], np.ndarray] | None:
    """Decode a checked payload without Zarr where the layout is FeatureStore's (bytes, Blosc, crc32c),
    inside shards or not."""
    import numcodecs.blosc
    from zarr.codecs import BloscCodec, BytesCodec

    codecs = chunk_codecs(arr)
    if len(codecs) != 3 or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[1], BloscCodec):
        return None
    dtype = np.dtype(arr.dtype).newbyteorder("<" if codecs[0].endian is None or
                                             codecs[0].endian.value == "little" else ">")
    return lambda body: np.frombuffer(numcodecs.blosc.decompress(body), dtype=dtype)


def _chunk_problem(data: bytes, arr, crc: bool, decode, via_zarr: Callable[[], np.ndarray]) -> str | None:
    body = payload(data) if crc else np.frombuffer(data, np.uint8)
    if body is None:
        return "checksum mismatch"
    if np.dtype(arr.dtype).kind != "f":
        return None
    try:
        values = decode(body) if decode else via_zarr()
    except Exception as exc:  # noqa: BLE001 - an undecodable chunk is the finding
        return f"undecodable ({exc})"
    bad = n_nonfinite(values)
    return f"{bad} non-finite values (nan/inf)" if bad else None

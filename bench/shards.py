"""Sharded feature stores against one chunk file per item: write and read throughput, object counts.

Writes the same N synthetic dense maps (ViT-S/8 at 224: C=384, h=w=28, float16, 0.6 MB an item by
default) into feature stores of each layout (``1``: one chunk file per item, the layout before shards;
``S``: shards of S items), in this one run, then reads them back the ways training and the stages do:

- **write**: ``FeatureStore.write`` as the extraction calls it, once per shard (``extract_into`` holds a
  shard's items and writes them at once); the chunk-file layout likewise once per 64 items;
- **random**: batches of ``--batch`` random items (streamed training), through the direct path
  (``_ChunkFiles``: local files, no Zarr in the loop) and through Zarr (any other store: an object store);
- **sequential**: every item once in order (``load_all``: in-memory training, k-means and codes passes).

Each figure is the best of ``--repeats`` (the run least slowed by other work on the machine), with its
ratio to the chunk-file layout measured in the same run. Object counts are the keys Zarr lists under the
store (every object, metadata included).

    PYTHONPATH=. python bench/shards.py --items 1024 --sizes 1 32 64 128 256
    PYTHONPATH=. python bench/shards.py --storage /some/folder     # or a store URL (s3://bucket/prefix)
        # once usseg_core/store.py opens such URLs (issue 24, part 1); the stores go under it
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _maps(n: int, dim: int, side: int, seed: int = 0):
    """Item i's map: a pool of 32 random float16 maps rolled by i // 32 channels (every chunk differs)."""
    pool = np.random.default_rng(seed).standard_normal((32, dim, side, side), dtype=np.float32).astype(np.float16)
    return lambda a, b: np.stack([np.roll(pool[i % 32], i // 32, axis=0) for i in range(a, b)])


def _objects(node) -> int:
    """Objects stored under a Zarr group or array (its own metadata included)."""
    from zarr.core.sync import sync

    async def count() -> int:
        prefix = f"{node.path}/" if node.path else ""
        return sum([1 async for _ in node.store.list_prefix(prefix)])

    return sync(count())


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(root: str, size: int, n: int, dim: int, side: int, batch: int, repeats: int) -> dict:
    """Write then read one store of layout ``size`` (1 = chunk files) under ``root``; figures per second."""
    from usseg_core.features import FeatureStore

    path = f"{root.rstrip('/')}/s{size}.zarr"
    maps = _maps(n, dim, side)
    unit = 64 if size == 1 else size  # the chunk-file layout's shards (pooled / done) were 64 items

    def write() -> FeatureStore:
        if "://" not in path:
            shutil.rmtree(path, ignore_errors=True)
        store = FeatureStore.create(path, n, dim, side, side, shard_size=unit, sharded=size > 1)
        for a, b in store.shards():
            dense = maps(a, b)
            store.write(list(range(a, b)), dense, dense.astype(np.float32).mean((2, 3)))
        return store

    item_mb = dim * side * side * 2 / 1e6
    t_write = _best(write, repeats)
    store = FeatureStore(path)
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, n, batch) for _ in range(max(1, n // batch))]

    def random_direct() -> None:
        for idx in batches:
            store.read_batch(idx)

    via_zarr = FeatureStore(path)
    via_zarr._files = None

    def random_zarr() -> None:
        for idx in batches:
            via_zarr.read_batch(idx)

    def sequential() -> None:
        FeatureStore(path).load_all(max_bytes=1 << 62)

    read_items = len(batches) * batch
    out = {"layout": "chunk files" if size == 1 else f"shards of {size}", "size": size,
           "objects_dense": _objects(store.group["dense"]) - 1,  # less its zarr.json
           "objects_total": _objects(store.group),
           "write_items_s": n / t_write, "write_mb_s": n * item_mb / t_write}
    for name, fn, items in (("random_direct", random_direct, read_items), ("random_zarr", random_zarr, read_items),
                            ("sequential", sequential, n)):
        if name == "random_direct" and store._files is None:
            out[f"{name}_items_s"] = out[f"{name}_mb_s"] = None  # not a local store: Zarr only
            continue
        t = _best(fn, repeats)
        out[f"{name}_items_s"], out[f"{name}_mb_s"] = items / t, items * item_mb / t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1024, help="items per store (N)")
    ap.add_argument("--dim", type=int, default=384, help="channels (ViT-S: 384)")
    ap.add_argument("--side", type=int, default=28, help="feature map side (224 / 8 = 28)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 32, 64, 128, 256],
                    help="items per shard; 1 = one chunk file per item (the layout before shards, the baseline)")
    ap.add_argument("--batch", type=int, default=32, help="items per random read (a training batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--storage", default=None, help="folder or store URL to write under (default: a temporary folder)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here too")
    args = ap.parse_args()
    sizes = [1] + [s for s in args.sizes if s != 1]
    tmp = None if args.storage else tempfile.mkdtemp(prefix="usseg-shards-")
    root = args.storage or tmp
    try:
        rows = [measure(root, s, args.items, args.dim, args.side, args.batch, args.repeats) for s in sizes]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    base = rows[0]
    cols = ("write", "random_direct", "random_zarr", "sequential")
    print(f"{args.items} items of {args.dim}x{args.side}x{args.side} float16 "
          f"({args.dim * args.side ** 2 * 2 / 1e6:.2f} MB), store {args.storage or 'a local temporary folder'}; "
          "items/s (MB/s) and x the chunk-file layout")
    print("| layout | dense objects | all objects | " + " | ".join(cols) + " |")
    print("|---|---:|---:|" + "---:|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r[f"{c}_items_s"]
            cells.append("-" if v is None else
                         f"{v:.0f} ({r[f'{c}_mb_s']:.0f}) {v / base[f'{c}_items_s']:.2f}x"
                         if base[f"{c}_items_s"] else f"{v:.0f} ({r[f'{c}_mb_s']:.0f})")
        print(f"| {r['layout']} | {r['objects_dense']} | {r['objects_total']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Sharded feature stores against one chunk file per item: write and read throughput, object counts.

Writes the same N synthetic dense maps (ViT-S/8 at 224: C=384, h=w=28, float16, 0.6 MB an item by
default) into feature stores of each layout (``1``: one chunk file per item, the layout before shards;
``S``: shards of S items), in this one run, then reads them back the ways training and the stages do:

- **write**: ``FeatureStore.write`` as the extraction calls it, once per shard (``extract_into`` holds a
  shard's items and writes them at once); the chunk-file layout likewise once per 64 items;
- **random**: batches of ``--batch`` random items (streamed training), three ways: ``direct``, the local
  files read with ``os.pread`` (``LocalChunkReads``, what a local store uses); ``ranges``, byte ranges through
  the Zarr store's API (``StoreChunkReads``, what any other store uses: an object store); ``zarr``, Zarr's
  own read path (the fallback for any other layout);
- **sequential**: every item once in order (``load_all``: in-memory training), shard by shard through the
  direct reader (what ``load_all`` does) or in one read through Zarr (what it did before shards).

Each figure is the best of ``--repeats`` (the run least slowed by other work on the machine; the layouts
take turns within each repeat), with its ratio to the chunk-file layout measured in the same run. Object counts are the keys Zarr lists under the
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


class Layout:
    """One store of layout ``size`` (1 = chunk files) under ``root``, and its timed operations."""

    def __init__(self, root: str, size: int, n: int, dim: int, side: int, batch: int) -> None:
        self.path, self.size, self.n, self.dim, self.side = f"{root.rstrip('/')}/s{size}.zarr", size, n, dim, side
        self.maps = _maps(n, dim, side)
        rng = np.random.default_rng(1)
        self.batches = [rng.integers(0, n, batch) for _ in range(max(1, n // batch))]

    def write(self) -> None:
        """The extraction's writes: one per shard (the chunk-file layout: per 64 items, its pooled chunks)."""
        from usseg_core.features import FeatureStore

        if "://" not in self.path:
            shutil.rmtree(self.path, ignore_errors=True)
        store = FeatureStore.create(self.path, self.n, self.dim, self.side, self.side,
                                    shard_size=64 if self.size == 1 else self.size, sharded=self.size > 1)
        for a, b in store.shards():
            dense = self.maps(a, b)
            store.write(list(range(a, b)), dense, dense.astype(np.float32).mean((2, 3)))

    def reader(self, how: str):
        from usseg_core.chunk_reads import direct_reader
        from usseg_core.features import FeatureStore

        store = FeatureStore(self.path)
        if how == "zarr":
            store._files = None
        elif how == "ranges":
            store._files = direct_reader(store.dense, Path(self.path) / "dense", store._missing, local=False)
        return store

    def random(self, how: str) -> None:
        store = self.reader(how)
        for idx in self.batches:
            store.read_batch(idx)

    def sequential(self, how: str) -> None:
        self.reader(how).load_all(max_bytes=1 << 62)


OPS = ("write", "random_direct", "random_ranges", "random_zarr", "sequential_direct", "sequential_zarr")


def measure(layouts: list[Layout], repeats: int) -> list[dict]:
    """Best time of each operation on each layout; the layouts take turns within each repeat (so that each
    sees the same load of the machine), writes first."""
    best = {(lay.size, op): float("inf") for lay in layouts for op in OPS}
    for op in OPS:
        for _ in range(repeats):
            for lay in layouts:
                if op.endswith("_direct") and "://" in lay.path:
                    continue  # not a local store: no direct file reads
                kind, _, how = op.partition("_")
                fn = lay.write if op == "write" else (
                    lambda lay=lay, kind=kind, how=how: getattr(lay, kind)(how))
                t0 = time.perf_counter()
                fn()
                best[lay.size, op] = min(best[lay.size, op], time.perf_counter() - t0)
    rows = []
    for lay in layouts:
        from usseg_core.features import FeatureStore

        store = FeatureStore(lay.path)
        item_mb = lay.dim * lay.side ** 2 * 2 / 1e6
        row = {"layout": "chunk files" if lay.size == 1 else f"shards of {lay.size}", "size": lay.size,
               "objects_dense": _objects(store.group["dense"]) - 1,  # less its zarr.json
               "objects_total": _objects(store.group)}
        for op in OPS:
            items = len(lay.batches) * len(lay.batches[0]) if op.startswith("random") else lay.n
            t = best[lay.size, op]
            row[f"{op}_items_s"] = None if t == float("inf") else items / t
            row[f"{op}_mb_s"] = None if t == float("inf") else items * item_mb / t
        rows.append(row)
    return rows


def transfers(layouts: list[Layout], repeats: int) -> list[dict]:
    """Upload and download of each layout's whole store through the test S3 server (SeaweedFS on 127.0.0.1),
    the way a remote store publishes an artifact at finish and a cache hit fetches it into the mirror
    (usseg_core/remote.py: 16 transfer threads). Best of ``repeats``; the layouts take turns."""
    from tests.s3server import S3Server
    from usseg_core.remote import RemoteStore, new_attempt

    work = Path(tempfile.mkdtemp(prefix="usseg-shards-s3-"))
    server = S3Server(work / "s3").start()
    try:
        import os

        os.environ.update(server.env)
        remote = RemoteStore(server.url("bench-shards"))
        best = {}
        for rep in range(repeats):
            for lay in layouts:
                attempt = new_attempt()
                t0 = time.perf_counter()
                n_up, nbytes = remote.upload_folder(Path(lay.path), "features", f"s{lay.size}", attempt)
                up = time.perf_counter() - t0
                target = work / f"down-{lay.size}-{rep}"
                t0 = time.perf_counter()
                n_down, _ = remote.download_attempt("features", f"s{lay.size}", attempt, target)
                down = time.perf_counter() - t0
                shutil.rmtree(target, ignore_errors=True)
                remote.delete_prefix(f"features/s{lay.size}/{attempt}")
                old = best.get(lay.size, {"upload_s": float("inf"), "download_s": float("inf")})
                best[lay.size] = {"objects": n_up, "bytes": nbytes, "upload_s": min(old["upload_s"], up),
                                  "download_s": min(old["download_s"], down)}
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = best[layouts[0].size]
    return [{"layout": "chunk files" if size == 1 else f"shards of {size}", **row,
             "upload_mb_s": row["bytes"] / row["upload_s"] / 1e6, "download_mb_s": row["bytes"] / row["download_s"] / 1e6,
             "upload_x": base["upload_s"] / row["upload_s"], "download_x": base["download_s"] / row["download_s"]}
            for size, row in best.items()]


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
    ap.add_argument("--s3", action="store_true", help="also time publishing and fetching each store through a "
                    "real S3 server (SeaweedFS from the dev extra, started on 127.0.0.1)")
    args = ap.parse_args()
    sizes = [1] + [s for s in args.sizes if s != 1]
    tmp = None if args.storage else tempfile.mkdtemp(prefix="usseg-shards-")
    root = args.storage or tmp
    s3_rows = None
    try:
        layouts = [Layout(root, s, args.items, args.dim, args.side, args.batch) for s in sizes]
        rows = measure(layouts, args.repeats)
        if args.s3:
            s3_rows = transfers(layouts, args.repeats)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "s3": s3_rows}, indent=1))
    base = rows[0]
    cols = OPS
    print(f"{args.items} items of {args.dim}x{args.side}x{args.side} float16 "
          f"({args.dim * args.side ** 2 * 2 / 1e6:.2f} MB), store {args.storage or 'a local temporary folder'}; "
          "items/s (MB/s) and x the chunk-file layout")
    print("| layout | dense objects | all objects | " + " | ".join(cols) + " |")
    print("|---|---:|---:|" + "---:|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r[f"{c}_items_s"]
            ratio = f" {v / base[f'{c}_items_s']:.2f}x" if v and base[f"{c}_items_s"] else ""
            cells.append("-" if v is None else f"{v:.0f} ({r[f'{c}_mb_s']:.0f}){ratio}")
        print(f"| {r['layout']} | {r['objects_dense']} | {r['objects_total']} | " + " | ".join(cells) + " |")
    if s3_rows:
        _print_s3(s3_rows)


def _print_s3(rows: list[dict]) -> None:
    print("\nthrough the S3 server: objects, upload and download MB/s (x the chunk-file layout)")
    print("| layout | objects | upload | download |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layout']} | {r['objects']} | {r['upload_mb_s']:.1f} ({r['upload_x']:.2f}x) | "
              f"{r['download_mb_s']:.1f} ({r['download_x']:.2f}x) |")


if __name__ == "__main__":
    main()


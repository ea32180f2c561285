"""Training at scale: steps/s and peak memory of each head with features held in memory against streamed
from Zarr, as the number of cached crops N grows.

For each N a synthetic feature store in the real format (``FeatureStore``: Zarr v3, one Blosc-zstd chunk
per item, float16) is written to ``--dir`` with ViT-S/8-at-224 dimensions (C=384, h=w=28 by default) for
STEGO and OMH; for PiCIE and HSG a view bank in the real ``ViewBank`` format of N maps as well: N/(2V)
images x V views x (plain, warped), both renderings links to one store of N/2 maps (the disk holds one
size at a time: at most N maps). Every (head, N, mode)
runs in a fresh interpreter so that its peak resident set (``ru_maxrss``) is its own; modes alternate
(in-memory / streamed / in-memory / ...) so that both see the same machine load, the fastest of
``--repeats`` runs is kept (the one least slowed by other work on the machine), and the streamed /
in-memory ratios compare runs of the same invocation. Each run also reports the median time of a batch's
read (in the prefetch thread) and of the step's wait for it (0 = the read was hidden behind the step). In-memory runs only where the features
fit the memory budget (``$USSEG_FEATURE_MEMORY``, default 8 GiB), as training chooses.

Data: standard-normal float16 (Blosc-zstd keeps ~94 % of its bytes), cut from a pool of random maps with a
per-item channel roll, so that every chunk differs and costs a real decode.
PiCIE's per-epoch clustering pass reads every image once per pass (a cost in N by design, not a step); the
bench replaces it with random pseudo-labels of the real shapes and times the training steps only.

    PYTHONPATH=. python bench/scale.py --sizes 2000 8000 32000 --heads stego omh picie hsg --out scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADS = ("stego", "omh", "picie", "hsg")
N_VIEWS = 4  # views per image of the synthetic view bank
N_CLASSES = 27


# --- synthetic data in the real formats ------------------------------------------------------------

def write_store(path: Path, n: int, dim: int, side: int, seed: int = 0) -> float:
    """A complete FeatureStore of ``n`` random float16 maps; returns seconds taken."""
    from usseg_core.features import FeatureStore

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((64, dim, side, side), dtype=np.float32).astype(np.float16)
    store = FeatureStore.create(path, n, dim, side, side)
    for a, b in store.shards():
        dense = np.stack([np.roll(pool[i % len(pool)], i // len(pool), axis=0) for i in range(a, b)])
        store.write(list(range(a, b)), dense, np.zeros((b - a, dim), np.float32))
    return time.perf_counter() - t0


def write_bank(path: Path, store: Path, n_items: int, side: int) -> None:
    """A ViewBank folder of n_items / V images whose plain and warped stores are links to ``store``
    (``n_items`` maps)."""
    from usseg_core.viewbank import DRAWS_FILE, PLAIN, WARPED, ViewBankConfig, draw_views, save_draws
    from usseg_core.views import ViewSpec

    path.mkdir(parents=True)
    for name in (PLAIN, WARPED):
        (path / name).symlink_to(store.resolve(), target_is_directory=True)
    cfg = ViewBankConfig(n_views=N_VIEWS)
    save_draws(path / DRAWS_FILE, [draw_views(cfg, f"img{i}", (8 * side, 8 * side))
                                   for i in range(n_items // N_VIEWS)])
    (path / "meta.json").write_text(json.dumps({"view": ViewSpec("center_crop", 8 * side).params()}))


class GridSegments:
    """Oversegmentations for HSG without storing them: every image is an 8 x 8 grid of regions."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.map = n, (np.arange(size)[:, None] * 8 // size * 8 + np.arange(size)[None] * 8 // size)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return self.map.astype(np.int32)


# --- one measurement, in a fresh interpreter -------------------------------------------------------

def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _method(args, store_path: Path, bank_path: Path):
    import torch

    from usseg_core.features import FeatureStore, choose_read_mode
    from usseg_core.heads import get_head

    dev = torch.device("cpu")
    if args.worker in ("stego", "omh"):
        from usseg_core.heads.omh import OMHLoss
        from usseg_core.heads.stego_train import StegoMethod

        features = FeatureStore(store_path)
        mode = choose_read_mode([features], max_bytes=1 << 62 if args.mode == "in-memory" else 0)
        n = len(features)
        knn = np.concatenate([np.arange(n)[:, None], np.random.default_rng(0).integers(0, n, (n, 30))], axis=1)
        config = get_head(args.worker).config("cocostuff27", {"shifts": [0.3, 0.25, 0.3],
                                                              "batch_size": args.batch_size})
        cfg = config["stego"]
        torch.manual_seed(0)
        aux = OMHLoss(cfg.dim, N_CLASSES, config["omh"]) if args.worker == "omh" else None
        return StegoMethod(features, knn, N_CLASSES, cfg, cfg.shifts, dev, aux), mode
    from usseg_core.viewbank import ViewBank

    bank = ViewBank(bank_path)
    mode = choose_read_mode([bank], max_bytes=1 << 62 if args.mode == "in-memory" else 0)
    if args.worker == "picie":
        cfg = get_head("picie").config("cocostuff27", {"batch_size": args.batch_size})["picie"]
        return _stubbed_picie()([bank], N_CLASSES, cfg, dev), mode
    from usseg_core.heads.hsg_train import HsgMethod

    # HSG reads every view of an image: 2 B / V images per step read as many maps as STEGO's B + B positives
    cfg = get_head("hsg").config("cocostuff27", {"batch_size": max(1, 2 * args.batch_size // N_VIEWS)})["hsg"]
    return HsgMethod([bank], [GridSegments(bank.n_images, 8 * args.side)], cfg, dev), mode


def _stubbed_picie():
    import torch
    import torch.nn.functional as F

    from usseg_core.heads.picie_train import PicieMethod

    class Stubbed(PicieMethod):
        """PiCIE with its per-epoch clustering pass replaced by random centroids and pseudo-labels."""

        def begin_epoch(self, epoch, plan):
            g = torch.Generator().manual_seed(epoch)
            shape = (self.bank.n, *self.bank.shape[1:])
            self.clusterings = [{"lam": float(lam), "k": int(k),
                                 **{f"mu{v}": F.normalize(torch.randn(k, self.config.dim, generator=g), dim=1)
                                    for v in (1, 2)},
                                 **{f"y{v}": torch.randint(0, k, shape, generator=g, dtype=torch.int16)
                                    for v in (1, 2)},
                                 **{f"w{v}": torch.full((k,), 1.0 / k) for v in (1, 2)}}
                                for k, lam in zip(self.ks, self.lams)]
            return None

    return Stubbed


def _worker(args) -> None:
    import torch

    import usseg_core.trainer as trainer
    from usseg_core.trainer import run_training

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    method, mode = _method(args, Path(args.store), Path(args.bank))
    open_s = time.perf_counter() - t0
    rss_ready = _rss_mib()
    waits, reads, stamps = [], [], []
    read, next_ = method.read, trainer.Prefetcher.next

    def timed_read(plan):
        t = time.perf_counter()
        out = read(plan)
        reads.append(time.perf_counter() - t)
        return out

    def timed_next(self):
        t = time.perf_counter()
        out = next_(self)
        waits.append(time.perf_counter() - t)
        return out

    method.read, trainer.Prefetcher.next = timed_read, timed_next
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    steps = args.warmup + args.steps
    run_training(method, {}, steps=steps, checkpoint_every=10**9, log_every=10**9, progress=False,
                 on_step=lambda s, _: stamps.append(time.perf_counter()))
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    measured = stamps[args.warmup:]
    wall = measured[-1] - stamps[args.warmup - 1]
    print(json.dumps({
        "mode": mode.mode, "open_s": open_s, "rss_ready_mib": rss_ready,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps_per_s": len(measured) / wall,
        "cpu_s_per_step": ((usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)) / steps,
        "read_ms": 1e3 * float(np.median(reads[args.warmup:])),
        "wait_ms": 1e3 * float(np.median(waits[args.warmup:])),
        "load_average": os.getloadavg()[0],  # of the machine, at the end: other work on it slows every step
    }))


def _run(head: str, mode: str, store: Path, bank: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", head, "--mode", mode, "--store", str(store), "--bank", str(bank),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--side", str(args.side)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{head} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the table ----------------------------------------------------------------------------------------

def _summaries(rows: list[dict], sizes: list[int]) -> list[dict]:
    out = []
    for head in sorted({r["head"] for r in rows}, key=HEADS.index):
        mine = {(r["n"], r["mode"]): r for r in rows if r["head"] == head}
        for n in sizes:
            s, m = mine.get((n, "streamed")), mine.get((n, "in-memory"))
            if s and m:
                out.append({"head": head, "n": n, "streamed_vs_in_memory_steps": s["steps_per_s"] / m["steps_per_s"]})
        for small, big in zip(sizes, sizes[1:]):
            a, b = mine.get((small, "streamed")), mine.get((big, "streamed"))
            if a and b:
                out.append({"head": head, "n": big, "streamed_rss_growth": b["peak_rss_mib"] / a["peak_rss_mib"],
                            "vs_n": small})
    return out


def _print(rows: list[dict], summaries: list[dict], args) -> None:
    head = (f"{'head':>6} {'N':>6} {'mode':>9} {'steps/s':>8} {'cpu s/st':>8} {'read ms':>8} {'wait ms':>8} "
            f"{'peak MiB':>9} {'ready MiB':>9} {'open s':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['head']:>6} {r['n']:>6} {r['mode']:>9} {r['steps_per_s']:>8.3f} {r['cpu_s_per_step']:>8.2f} "
              f"{r['read_ms']:>8.1f} {r['wait_ms']:>8.1f} {r['peak_rss_mib']:>9.0f} {r['rss_ready_mib']:>9.0f} "
              f"{r['open_s']:>7.1f}")
    for s in summaries:
        if "streamed_vs_in_memory_steps" in s:
            print(f"{s['head']:>6} N={s['n']:>6}: streamed / in-memory steps/s = {s['streamed_vs_in_memory_steps']:.2f}"
                  " (target >= 0.8)")
        else:
            print(f"{s['head']:>6} N={s['vs_n']:>6} -> {s['n']:>6}: streamed peak RSS x{s['streamed_rss_growth']:.3f}"
                  f" for x{s['n'] / s['vs_n']:.0f} N (target <= 1.2)")
    print(f"C={args.dim} h=w={args.side} batch={args.batch_size} threads={args.threads}; load average at the end "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000], help="crops N")
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=HEADS)
    ap.add_argument("--dim", type=int, default=384, help="feature channels C (ViT-S: 384)")
    ap.add_argument("--side", type=int, default=28, help="feature map side (ViT-S/8 at 224: 28)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=16, help="STEGO/PiCIE images per step; HSG: / views")
    ap.add_argument("--repeats", type=int, default=2, help="runs per (head, N, mode); the fastest is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--budget", default=None, help="memory budget for in-memory runs (default: training's)")
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder)")
    ap.add_argument("--out", type=Path, help="write results as JSON here")
    ap.add_argument("--worker", choices=HEADS, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--bank", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    from usseg_core.features import memory_budget

    if args.budget:
        os.environ["USSEG_FEATURE_MEMORY"] = args.budget
    budget = memory_budget()
    root = Path(tempfile.mkdtemp(prefix="usseg-scale-", dir=args.dir))
    rows, runs = [], []  # the best of the repeats per (head, N, mode); every run
    try:
        for n in args.sizes:  # one store on disk at a time
            n -= n % (2 * N_VIEWS)
            size = n * args.dim * args.side ** 2 * 2  # bytes of N float16 maps: the same for every head
            modes = ["in-memory", "streamed"] if size <= budget else ["streamed"]
            for kind in ("bank", "features"):
                heads = [h for h in args.heads if (h in ("picie", "hsg")) == (kind == "bank")]
                if not heads:
                    continue
                store, bank = root / f"{kind}{n}.zarr", root / f"bank{n}"
                seconds = write_store(store, n // 2 if kind == "bank" else n, args.dim, args.side)
                if kind == "bank":
                    write_bank(bank, store, n // 2, args.side)
                print(f"N={n} ({kind}): wrote {size / 2**30 / (2 if kind == 'bank' else 1):.2f} GiB of float16 "
                      f"maps in {seconds:.0f} s ({shutil.disk_usage(root).free / 2**30:.0f} GiB free)", flush=True)
                for head in heads:
                    best: dict[str, dict] = {}
                    for _ in range(args.repeats):  # modes alternate: both see the machine's load
                        for mode in modes:
                            r = _run(head, mode, store, bank, args)
                            runs.append({"head": head, "n": n, **r})
                            if mode not in best or r["steps_per_s"] > best[mode]["steps_per_s"]:
                                best[mode] = r
                    for mode in modes:
                        rows.append({"head": head, "n": n, **best[mode]})
                        r = rows[-1]
                        print(f"  {head:>6} {mode:>9}: {r['steps_per_s']:.3f} steps/s, peak {r['peak_rss_mib']:.0f} "
                              f"MiB, read {r['read_ms']:.0f} ms, wait {r['wait_ms']:.0f} ms", flush=True)
                shutil.rmtree(store)
                shutil.rmtree(bank, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    sizes = [n - n % (2 * N_VIEWS) for n in args.sizes]
    rows.sort(key=lambda r: (HEADS.index(r["head"]), r["n"], r["mode"]))
    summaries = _summaries(rows, sizes)
    _print(rows, summaries, args)
    if args.out:
        args.out.write_text(json.dumps({"dim": args.dim, "side": args.side, "batch_size": args.batch_size,
                                        "threads": args.threads, "budget": budget, "steps": args.steps,
                                        "repeats": args.repeats, "rows": rows, "summaries": summaries,
                                        "runs": runs}, indent=2))


if __name__ == "__main__":
    main()

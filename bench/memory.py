"""Peak memory of evaluation and segmentation on a big image against the same command on small ones.

    .venv/bin/python bench/memory.py [--big 6000x4000] [--small 480x360] [--crf] [--json FILE]

Writes a `directory` dataset into a temporary folder: a labelled `train` split of small scenes (smooth
colour blobs, the label their blob), and two `val` splits, one with the small scenes and one with a single
big one, then measures:

(a) `usseg run stego --dataset directory --train-split train --eval-split val` (short training, the
    linear probe trained on `train`): the evaluation scores every predictor (raw k-means on the 472
    EfficientNet channels, STEGO's cluster probe, k-means, linear probe) at the label's full size;
(b) `usseg segment --model HEAD` of the trained head on a small photo and on the big one.

The evaluation's model input is capped at ``--max-side`` (``$USSEG_FULL_MAX_SIDE``, 480 by default: the
small images' own size), so that both runs feed the backbone the same input and extract the labelled
``train`` split for the linear probe at the same size (the flow extracts it at the evaluation view's
size); what differs is the image the labels, predictions and pictures are computed at.

Each command runs in its own process; its peak is ``ru_maxrss`` from ``os.wait4`` (the largest process
of its tree) and the peak of the summed RSS of the tree polled every 0.1 s (psutil). Without ``--crf``
both commands run with ``--no-crf``; with it, the big image's dense CRF runs on the grid capped at
``$USSEG_CRF_MAX_PIXELS`` (1024 x 1024 by default: usseg_core/crf.py), the small ones' at their own size
(docs/results.md "Memory for big images"). Target: big / small < 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_CLASSES = 8, 4  # 8 centre-cropped scenes: knn.k = 7 neighbours (STEGO draws from 7)


def scene(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 smooth colour blobs and their (H, W) uint8 class labels, drawn at 1/8 size and
    resized (so a 24 MP scene costs no more to make than its own arrays)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sh, sw = max(8, h // 8), max(8, w // 8)
    yy, xx = np.mgrid[0:sh, 0:sw]
    centres = rng.uniform(0, 1, (6, 2)) * (sh, sw)
    dist = np.stack([np.hypot(yy - cy, xx - cx) for cy, cx in centres])  # (6, sh, sw)
    blob = dist.argmin(0)
    classes = rng.permutation(np.arange(6) % N_CLASSES)[blob].astype(np.uint8)
    palette = np.array([[200, 60, 50], [60, 170, 70], [60, 90, 200], [220, 210, 80]], np.float32)
    colour = palette[classes] + rng.normal(0, 12, (sh, sw, 3)).astype(np.float32)
    img = Image.fromarray(colour.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    lab = Image.fromarray(classes).resize((w, h), Image.NEAREST)
    return np.asarray(img), np.asarray(lab)


def write_split(root: Path, split: str, size: tuple[int, int], n: int, seed: int) -> list[Path]:
    from PIL import Image

    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "labels").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img, lab = scene(*size, seed + i)
        Image.fromarray(img).save(root / split / "images" / f"s{i:02d}.png", compress_level=1)
        Image.fromarray(lab).save(root / split / "labels" / f"s{i:02d}.png")
        paths.append(root / split / "images" / f"s{i:02d}.png")
    return paths


def measure(args: list[str], env: dict) -> dict:
    """Run ``usseg ARGS``; its exit code, seconds, ru_maxrss (MB) and polled peak tree RSS (MB)."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "commands.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    peak, done = [0], threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(output[-4000:], file=sys.stderr)
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
            "maxrss_mb": round(usage.ru_maxrss / 1024), "tree_peak_mb": round(peak[0] / 2 ** 20), "output": output}


def size_arg(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return h, w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big", type=size_arg, default=(4000, 6000), help="W x H of the big image (6000x4000)")
    ap.add_argument("--small", type=size_arg, default=(360, 480), help="W x H of the small images (480x360)")
    ap.add_argument("--crf", action="store_true", help="keep the dense CRF on (default: --no-crf)")
    ap.add_argument("--steps", type=int, default=5, help="STEGO training steps")
    ap.add_argument("--max-side", type=int, default=480,
                    help="$USSEG_FULL_MAX_SIDE: the long side of the evaluation's model input (default 480, the "
                         "small images' own: both runs feed the model the same input size)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data, stores and outputs")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="usseg-memory-"))
    try:
        rows = run_all(args, tmp)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(args, rows)


def run_all(args, tmp: Path) -> list[dict]:
    """Write the data, run both commands on both sizes; one row per run."""
    root = tmp / "data"
    write_split(root, "train", args.small, N_TRAIN, seed=0)
    write_split(root, "val", args.small, 2, seed=100)
    write_split(root, "valbig", args.big, 1, seed=200)
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(N_CLASSES)))
    photo_small, photo_big = root / "val" / "images" / "s00.png", root / "valbig" / "images" / "s00.png"

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "USSEG_STORAGE", "USSEG_STATE")}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp / "prefect-home"), HF_HUB_OFFLINE="1",
               PREFECT_LOGGING_LEVEL="WARNING", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               USSEG_FULL_MAX_SIDE=str(args.max_side))
    crf = [] if args.crf else ["--no-crf"]
    rows = []
    for case, split in (("small", "val"), ("big", "valbig")):
        storage = tmp / f"storage-{case}"  # separate stores: the big run computes everything it needs
        run = measure(["run", "stego", "--dataset", "directory", "--data-root", str(root), "--train-split", "train",
                       "--eval-split", split, "--storage", str(storage), "--set", f"steps={args.steps}",
                       "--set", "batch_size=4", "--set", "knn.k=7", *crf], env)
        rows.append({"command": "usseg run stego (evaluation)", "case": case, **run})
        if run["rc"] != 0:
            break
    heads = list((tmp / "storage-small" / "head").glob("*/_COMPLETE"))
    if heads:
        storage, head = tmp / "storage-small", heads[0].parent.name
        for case, photo in (("small", photo_small), ("big", photo_big)):
            seg = measure(["segment", "--model", head, str(photo), "--out", str(tmp / f"out-{case}"),
                           "--storage", str(storage), *crf], env)
            rows.append({"command": "usseg segment", "case": case, **seg})
    return rows


def report(args, rows: list[dict]) -> None:
    big_hw, small_hw = args.big, args.small
    print(f"\npeak memory, big {big_hw[1]}x{big_hw[0]} vs small {small_hw[1]}x{small_hw[0]} "
          f"({'CRF on' if args.crf else '--no-crf'}), model input long side {args.max_side}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print("| command | case | rc | seconds | ru_maxrss MB | tree peak MB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['case']} | {r['rc']} | {r['seconds']} | {r['maxrss_mb']} | {r['tree_peak_mb']} |")
    for command in dict.fromkeys(r["command"] for r in rows):
        pair = {r["case"]: r for r in rows if r["command"] == command}
        if {"small", "big"} <= set(pair):
            ratio = pair["big"]["maxrss_mb"] / pair["small"]["maxrss_mb"]
            tree = pair["big"]["tree_peak_mb"] / max(1, pair["small"]["tree_peak_mb"])
            print(f"{command}: big / small = {ratio:.2f} (ru_maxrss), {tree:.2f} (tree peak); target < 2")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "output"} for r in rows],
                                              indent=1))


if __name__ == "__main__":
    main()

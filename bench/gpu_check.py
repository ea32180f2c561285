"""The GPU check: one table of what runs on the accelerator, and CUDA-equals-CPU checks on small inputs.

Run on a GPU machine with ``bench/gpu_check.sh`` (about 5 minutes on one H200); ``--smoke`` runs the same
code at toy sizes on whatever device there is (the test suite runs it on CPU). Sections:

1. extraction: ViT-S/8 (``vit_small_patch8_224.dino``, random weights: DINO's compute) at 224, img/s in
   bf16 and fp32 on the same batches, and the bf16-vs-fp32 feature difference (max abs, relative L2).
2. knn: ``mine_knn`` at N = 250k pooled features (dim 384, k 30) on the device, with the method it chose.
3. pipeline: ``compare`` of every head (seed 0, short training) on synthetic scenes with ViT-S/8 at 224
   on the device: training steps/s per head (the head artifact's s/step) and evaluation img/s (the
   evaluation artifact's), i.e. the real flow, tasks and stores.
4. equal: the same inputs on CUDA and on CPU: backbone features (fp32), head codes, exact KNN ids,
   k-means centroids from one init, cluster-probe / k-means labels, linear-probe logits, each against a
   stated tolerance; a failure exits 1.
5. two-workers (needs 2 GPUs; skipped with one line otherwise): the same five-crop extraction on a local
   Dask cluster of one worker (``--runner dask:1``) and of two workers pinned one per GPU (``dask:2``),
   after a warm-up extraction that starts the workers and builds the backbone in each: img/s of each and
   the speed-up, the devices the features' metadata names (two different GPUs, or it exits 1), and the
   two runs' features against each other.

    bash bench/gpu_check.sh            # = python bench/gpu_check.py --out gpu_check.json
    bash bench/gpu_check.sh out.json --sections two-workers   # one section
    python bench/gpu_check.py --smoke  # toy sizes, any device
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import quiet_prefect, write_json  # noqa: E402
from orchestration.runner import SettingTaskRunner  # noqa: E402
from prefect import flow  # noqa: E402

VIT8 = "vit_small_patch8_224.dino"
# name -> (check, tolerance): relative L2 error unless the name says agreement (a fraction, >= tolerance)
TOLERANCES = {
    "features fp32 rel L2": 1e-3,  # TF32 is off for the check; reduction order differs
    "head codes rel L2": 1e-4,
    "knn exact id agreement": 0.999,  # ties between equal similarities may swap
    "k-means centroids rel L2": 1e-4,
    "cluster-probe label agreement": 0.999,
    "k-means label agreement": 0.999,
    "linear-probe logits rel L2": 1e-4,
}
SECTIONS = ("extraction", "knn", "pipeline", "equal", "two-workers")
TWO_WORKERS_TOLERANCE = 1e-3  # rel L2 of one worker's features against two workers': same GPU model, same batches


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extraction(device, batches: int, batch: int, side: int) -> dict:
    """img/s of the backbone in bf16 and fp32 on the same batches, and the bf16 vs fp32 difference."""
    import torch

    from tasks.backbone import BackboneRef, load_backbone
    from usseg_core.features import embed

    backbone = load_backbone(BackboneRef(VIT8, random_weights=True, device=str(device)))
    images = torch.rand(batches, batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    out, feats = {}, {}
    for precision in ("bf16", "fp32"):
        embed(backbone, images[0], precision)  # warm-up (kernels, autotuning)
        _sync(device)
        start = time.perf_counter()
        for b in range(batches):
            dense, _ = embed(backbone, images[b], precision)
        _sync(device)
        out[f"{precision} img/s"] = round(batches * batch / (time.perf_counter() - start), 1)
        feats[precision] = dense
    out["bf16 vs fp32 max abs"] = round(float(np.abs(feats["bf16"] - feats["fp32"]).max()), 4)
    out["bf16 vs fp32 rel L2"] = round(_rel(feats["bf16"], feats["fp32"]), 4)
    out["bf16 speed-up"] = round(out["bf16 img/s"] / out["fp32 img/s"], 2)
    return out


def knn(device, n: int) -> dict:
    from usseg_core.knn import mine_knn

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(n // 500, 2), 384)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, 384)).astype(np.float32)
    start = time.perf_counter()
    mine_knn(x, 30, device=str(device))
    return {"N": n, "seconds": round(time.perf_counter() - start, 2)}


def pipeline(device, storage: Path, data: Path, smoke: bool) -> dict:
    """Every head through the real compare flow on the device; per head its s/step and evaluation img/s."""
    from flows.compare import compare
    from usseg_core.datasets.synthetic import ensure_synthetic
    from usseg_core.spec import CompareSpec
    from usseg_core.store import ArtifactStore

    n_train, n_val = (8, 3) if smoke else (40, 12)
    root = ensure_synthetic(data, n_train=n_train, n_val=n_val)
    overrides = {"stego.steps": 4 if smoke else 100, "picie.epochs": 1, "hsg.epochs": 1}
    backbone = "vit_small_patch16_224.dino" if smoke else VIT8
    result = compare(CompareSpec(dataset="synthetic", data_root=str(root), seeds=[0], backbone=backbone,
                                 random_weights=True, storage=str(storage), overrides=overrides,
                                 resolution=64 if smoke else 224, run_crf=False, device=str(device)))
    store, rows = ArtifactStore(storage), {}
    for r in json.loads((Path(result["path"]) / "runs.json").read_text()):
        head, ev = store.find(r["head_key"]).meta, store.find(r["evaluation_key"]).meta
        rows[r["head"]] = {"train steps/s": round(1 / head["seconds_per_step"], 2) if head.get("seconds_per_step")
                           else None, "eval img/s": ev.get("images_per_s"), "steps": head.get("steps")}
    return {"backbone": backbone, "heads": rows, "storage": str(storage), "head_keys": {
        r["head"]: r["head_key"] for r in json.loads((Path(result["path"]) / "runs.json").read_text())}}


def equal(device, storage: Path, head_keys: dict) -> dict:
    """CUDA vs CPU on the same small inputs; each value against TOLERANCES."""
    import torch

    from tasks.backbone import BackboneRef, load_backbone
    from usseg_core.cluster import cluster_logits, spherical_kmeans
    from usseg_core.features import embed
    from usseg_core.heads import load_head
    from usseg_core.heads.probes import LinearProbe
    from usseg_core.knn import mine_knn
    from usseg_core.store import ArtifactStore

    cpu = torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    got = {}
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ref = BackboneRef(VIT8, random_weights=True)
    on = {d: embed(load_backbone(BackboneRef(ref.name, random_weights=True, device=str(d))), images, "fp32")[0]
          for d in (cpu, device)}
    got["features fp32 rel L2"] = _rel(on[device], on[cpu])
    feats = torch.from_numpy(on[cpu])  # (2, 384, 28, 28)

    store = ArtifactStore(storage)
    stego = load_head(store.find(head_keys["stego"]).path)
    heads = {d: load_head(store.find(head_keys["stego"]).path, d) for d in (cpu, device)}
    with torch.no_grad():
        codes = {d: heads[d].codes(torch.randn(2, stego.in_dim, 28, 28, generator=torch.Generator().manual_seed(2))
                                   .to(d)) for d in (cpu, device)}
        got["head codes rel L2"] = _rel(codes[device].cpu(), codes[cpu])
        labels = {d: heads[d].cluster_logits(codes[cpu].to(d)).argmax(1).cpu() for d in (cpu, device)}
        got["cluster-probe label agreement"] = float((labels[device] == labels[cpu]).float().mean())

    x = np.random.default_rng(3).standard_normal((5000, 384)).astype(np.float32)
    ids = {d: mine_knn(x, 30, device=str(d)) for d in (cpu, device)}
    got["knn exact id agreement"] = float(np.mean([len(set(a) & set(b)) / len(a)
                                                   for a, b in zip(ids[device][:, 1:8], ids[cpu][:, 1:8])]))

    pixels = feats.permute(0, 2, 3, 1).reshape(-1, 384).numpy()
    init = pixels[:: len(pixels) // 8][:8]
    cents = {d: spherical_kmeans(lambda: (pixels[a:a + 256] for a in range(0, len(pixels), 256)), 8,
                                 init_centroids=init, device=str(d)) for d in (cpu, device)}
    got["k-means centroids rel L2"] = _rel(cents[device], cents[cpu])
    km = {d: cluster_logits(feats.to(d), torch.from_numpy(cents[cpu]), alpha=2.0).argmax(1).cpu() for d in (cpu, device)}
    got["k-means label agreement"] = float((km[device] == km[cpu]).float().mean())

    probe = LinearProbe(384, 5)
    with torch.no_grad():
        logits = {d: probe.to(d)(feats.to(d)).cpu() for d in (cpu, device)}
    got["linear-probe logits rel L2"] = _rel(logits[device], logits[cpu])

    out = {}
    for name, value in got.items():
        tol = TOLERANCES[name]
        ok = value >= tol if "agreement" in name else value <= tol
        out[name] = {"value": float(f"{value:.3g}"), "tolerance": tol, "ok": bool(ok)}
    return out


@flow(name="gpu-check-two-workers", task_runner=SettingTaskRunner(parameter="task_runner"))
def timed_extraction(task_runner: str, storage: str, root: str, backbone: str, side: int, shard_size: int,
                     batch_size: int) -> dict:
    """A warm-up extraction (starts the workers, builds the backbone in each), then the timed five-crop
    extraction of the same images on the same cluster."""
    from tasks.backbone import BackboneRef
    from tasks.extract import ensure_features
    from tasks.manifest import DataRef
    from usseg_core.views import ViewSpec

    data, ref = DataRef("synthetic", root, "train"), BackboneRef(backbone, random_weights=True)
    ensure_features(storage, data, ref, ViewSpec("center_crop", side // 2), shard_size=shard_size,
                    batch_size=batch_size)
    start = time.perf_counter()
    feats = ensure_features(storage, data, ref, ViewSpec("five_crop", side), shard_size=shard_size,
                            batch_size=batch_size)
    return {"seconds": time.perf_counter() - start, "n": feats.n, "path": feats.path, "workers": list(feats.workers)}


def two_workers(storage: Path, data: Path, smoke: bool) -> dict:
    """One worker against two pinned one per GPU, on the same extraction (section 5 of the docstring)."""
    import zarr

    from usseg_core.datasets.synthetic import ensure_synthetic
    from usseg_core.device import gpu_ids

    gpus = gpu_ids()
    if len(gpus) < 2:
        return {"skipped": f"needs 2 GPUs, this machine has {len(gpus)}"}
    n_images, shard = (8, 4) if smoke else (256, 64)  # shard = batch, in items: 2 / 4 warm-up shards, 10 / 20 timed
    backbone, side = ("vit_small_patch16_224.dino", 64) if smoke else (VIT8, 224)
    root = ensure_synthetic(data / "two-workers", n_train=n_images, n_val=1)
    runs = {n: timed_extraction(f"dask:{n}", str(storage / f"dask{n}"), str(root), backbone, side, shard, shard)
            for n in (1, 2)}
    out = {"gpus": gpus, "backbone": backbone, "side": side, "items": runs[1]["n"]}
    for n, run in runs.items():
        out[f"dask:{n} img/s"] = round(run["n"] / run["seconds"], 1)
    out["speed-up"] = round(out["dask:2 img/s"] / out["dask:1 img/s"], 2)
    out["dask:2 workers"] = runs[2]["workers"]
    pinned = {w.split(" ", 1)[1] for w in runs[2]["workers"]}  # "host:pid <device>": the device parts
    out["two GPUs used"] = len(pinned) == 2
    a, b = (zarr.open_group(runs[n]["path"], mode="r")["dense"] for n in (1, 2))
    num = den = 0.0
    for i in range(0, a.shape[0], 64):  # a block at a time: the full-size stores hold ~1.5 GB each
        x, y = (np.asarray(z[i:i + 64], dtype=np.float64) for z in (a, b))
        num, den = num + float(((x - y) ** 2).sum()), den + float((y ** 2).sum())
    out["features rel L2"] = float(f"{(num / max(den, 1e-24)) ** 0.5:.3g}")
    out["ok"] = out["two GPUs used"] and out["features rel L2"] <= TWO_WORKERS_TOLERANCE
    return out


def _two_worker_lines(row: dict) -> list[str]:
    if "skipped" in row:
        return [f"| two workers | skipped | {row['skipped']} |"]
    where = f"two workers ({row['backbone']} @{row['side']}, {row['items']} five-crop items)"
    return [f"| {where} | dask:1 img/s | {row['dask:1 img/s']} |",
            f"| {where} | dask:2 img/s | {row['dask:2 img/s']} |",
            f"| {where} | speed-up | {row['speed-up']} |",
            f"| {where} | devices of dask:2 | {'; '.join(row['dask:2 workers'])} |",
            f"| {where} | features rel L2 dask:1 vs dask:2 (tol {TWO_WORKERS_TOLERANCE}) | {row['features rel L2']} "
            f"{'ok' if row['ok'] else 'FAIL'} |"]


def _table(result: dict) -> str:
    lines = ["| section | measure | value |", "|---|---|---|"]
    for k, v in result.get("extraction", {}).items():
        lines.append(f"| extraction ViT-S/8 @{result['side']}, batch {result['batch']} | {k} | {v} |")
    if "knn" in result:
        lines.append(f"| knn | N = {result['knn']['N']}, dim 384, k 30 | {result['knn']['seconds']} s |")
    for head, row in result.get("pipeline", {}).get("heads", {}).items():
        lines.append(f"| pipeline ({result['pipeline']['backbone']}) | {head}: train steps/s | {row['train steps/s']} |")
        lines.append(f"| pipeline ({result['pipeline']['backbone']}) | {head}: eval img/s | {row['eval img/s']} |")
    for name, row in result.get("equal", {}).items():
        lines.append(f"| {result['device']} = cpu | {name} (tol {row['tolerance']}) | {row['value']} {'ok' if row['ok'] else 'FAIL'} |")
    if "two_workers" in result:
        lines += _two_worker_lines(result["two_workers"])
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on any device (tests)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)} "
                    "(equal needs pipeline)")
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or ("equal" in sections and "pipeline" not in sections):
        ap.error(f"--sections {args.sections}: " + (f"unknown {unknown[0]!r}" if unknown else "equal needs pipeline"))
    quiet_prefect()
    import torch

    from usseg_core.device import resolve_device

    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="usseg-gpucheck-"))
    os.environ.setdefault("USSEG_STORAGE", str(tmp / "storage"))
    batch, side = (2, 64) if args.smoke else (64, 224)
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "batch": batch, "side": side}
    t0 = time.perf_counter()
    if "extraction" in sections:
        result["extraction"] = extraction(device, 2 if args.smoke else 8, batch, side)
    if "knn" in sections:
        result["knn"] = knn(device, 3000 if args.smoke else 250_000)
    if "pipeline" in sections:
        result["pipeline"] = pipeline(device, tmp / "storage", tmp / "data", args.smoke)
    if "equal" in sections and (device.type == "cuda" or args.smoke):  # smoke on CPU: CPU against CPU
        result["equal"] = equal(device, tmp / "storage", result["pipeline"]["head_keys"])
    if "equal" in sections and device.type != "cuda":
        result["equal_note"] = "no CUDA device: the CUDA = CPU checks compared CPU with CPU"
    if "two-workers" in sections:
        result["two_workers"] = two_workers(tmp / "two-workers", tmp / "data", args.smoke)
        if "skipped" in result["two_workers"]:
            print(f"two workers: skipped: {result['two_workers']['skipped']}", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(_table(result))
    write_json(args.out, result)
    if any(not row["ok"] for row in result.get("equal", {}).values()) or not result.get("two_workers", {}).get(
            "ok", True):
        sys.exit(1)


if __name__ == "__main__":
    main()

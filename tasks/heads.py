"""KNN mining and head training tasks (every registered head)."""
from __future__ import annotations

import functools
import shutil
import threading

import numpy as np
import torch
import torch.nn.functional as F

from tasks.stage import ArtifactRef, FeaturesRef, HeadRef, Work, declare, logger, run_stage, stage_task, worker_id
from usseg_core.device import GPU_TAG, resolve_device, to_device
from usseg_core.errors import ConfigError
from usseg_core.features import ConcatFeatures, FeatureStore
from usseg_core.knn import KnnSettings
from usseg_core.store import ArtifactStore, artifact_key

KNN_VERSION = 2  # 2: the search method and its parameters in the key (knn.*), what ran in meta
HEAD_VERSION = 2  # 2: registry head.pt (format 2), config by section, inputs as upstream
# One training at a time per process. Heads draw their initialisation and dropout from torch's global RNG
# (and a linear probe's fork_rng restores it), so two trainings in threads of one process would interleave
# their draws and neither would reproduce. Loading a trained head draws from it too (its modules are
# initialised before the checkpoint overwrites them): a k-means task loading the head just trained, beside
# the next training, would move that training's dropout masks. So a load outside a training takes the slot,
# and a training loads its own head before it lets go (the k-means after it finds it in the cache).
# Reentrant: a load inside a training holds it already. Trainings run in parallel across processes.
_TRAINING = threading.RLock()
KNN = declare("knn", KNN_VERSION, "usseg_core.knn.search_knn", keyed_as={"settings": "*"})
HEAD = declare("head", HEAD_VERSION, "HeadSpec.train",
               unkeyed={"checkpoint_path": "where training resumes from (the artifact's own checkpoint)",
                        "device": "where it runs: part of no key (docs/architecture.md, Devices)",
                        "progress": "a progress bar"})


def training_slot() -> threading.RLock:
    """The process's training lock (a function, not the global itself, in the task: Dask pickles tasks by
    value, and a lock does not pickle)."""
    return _TRAINING


def open_features(infos: list[FeaturesRef]) -> ConcatFeatures:
    return ConcatFeatures([FeatureStore(i["path"]) for i in infos])


def _feature_upstream(infos: list[FeaturesRef]) -> dict:
    return head_inputs_upstream({"features": infos})


@stage_task("mine-knn")
def ensure_knn(storage: str, feature_infos: list[FeaturesRef], settings: KnnSettings | None = None) -> ArtifactRef:
    """Cosine top-k over the pooled, L2-normalised features of the crop set (column 0 = self).

    The key covers every feature artifact (hence backbone fingerprint, resolution and crop set), k
    (``settings.k``) and the requested search (``settings.key_params()``: the method and the parameters it reads); they are also
    written out in the metadata: no key part is silently ignored (unlike STEGO's ``nns_*_224.npz``, whose
    name ignores the configured resolution). What ran (the method auto chose, effective nprobe / efSearch,
    the recall of ranks 1..7 measured on a sample, a fallback to exact) is the metadata's ``search``.
    """
    from usseg_core.knn import search_knn

    settings = settings or KnnSettings()
    k = settings.k
    params = {"k": k, **settings.key_params()}

    def prepare() -> None:  # before the folder is begun: a refused table leaves nothing behind
        counts = [ref.get("n") for ref in feature_infos]
        rows = sum(int(n) for n in counts if n is not None)
        if None not in counts and rows < k + 1:
            raise ConfigError(knn_rows_problem(k, rows, f"the training features hold {rows} items"))

    def body(work: Work) -> dict:
        result = work.core(search_knn, open_features(feature_infos).pooled_all(), k=k, settings=settings)
        np.save(work.art.file("knn.npy"), result.table)
        if result.meta.get("fallback"):
            logger().warning("knn/%s: %s search missed recall floor %.3f; fell back to %s", work.art.key,
                             result.meta["method"], settings.recall_floor, result.meta["fallback"])
        logger().info("mined knn/%s: %d items, top-%d, %s, recall@7 %.4f, %.1f s", work.art.key,
                      result.table.shape[0], k, result.meta["method"], result.meta["recall_at_7"],
                      result.meta["seconds"])
        return {"n_items": int(result.table.shape[0]), "k": k, "search": result.meta}

    return run_stage(storage, KNN, params, _feature_upstream(feature_infos), body,
                     lambda art, hit: ArtifactRef.of(art, str(art.file("knn.npy")), hit), inputs=feature_infos,
                     info={"views": [r.get("view") for r in feature_infos]}, prepare=prepare)


def knn_rows_problem(k: int, rows: int, what: str) -> str:
    """The one line of a KNN table too large for its data: each row needs ``k`` neighbours besides itself."""
    fix = (f"pass --set knn.k=K with K <= {rows - 1} (and STEGO's/OMH's num_neighbors <= K)" if rows >= 2
           else "add images")
    return f"{what}, but knn.k={k} keeps {k} neighbours of each, which needs at least {k + 1}; {fix}"


def check_knn_rows(run) -> None:
    """Refuse, before any work, a run whose KNN table cannot be mined: fewer training items than
    ``knn.k + 1``. Counts the training splits' listed images (no file is read) times the images each
    gives in the five-crop training view (5 for five-crops, 1 for a centre crop): an upper bound of what
    the manifests keep, so it never refuses a run that would have worked. ``run`` is a resolved
    :class:`~usseg_core.spec.RunSpec` (its data root set)."""
    from tasks.manifest import DataRef
    from usseg_core.heads import get_head

    if "knn" not in get_head(run.head).needs:
        return
    k = run.knn_config().k
    images = rows = 0
    for split in run.splits:
        ds = DataRef(run.dataset, run.data_root, split, run.dataset_options, run.on_error).dataset()
        per_image = run.crops_config().view(ds, run.resolution).per_image
        images += len(ds)
        rows += len(ds) * per_image
    if rows < k + 1:
        splits = ", ".join(run.splits)
        what = (f"dataset {run.dataset} ({splits}) has {images} images, {rows} training items "
                f"({rows // max(images, 1)} per image)")
        raise ConfigError(knn_rows_problem(k, rows, what))


def head_inputs_upstream(inputs: dict) -> dict:
    """Upstream keys of a head artifact: every cached input it was trained on (lists get an index)."""
    upstream = {}
    for name in sorted(inputs):
        ref = inputs[name]
        if isinstance(ref, list):
            upstream.update({f"{name}{i}": r["key"] for i, r in enumerate(ref)})
        else:
            upstream[name] = ref["key"]
    return upstream


def head_key(method: str, n_classes: int, config: dict, inputs: dict) -> tuple[str, dict, dict]:
    params = {"method": method, "n_classes": n_classes, "config": config}
    upstream = head_inputs_upstream(inputs)
    return artifact_key("head", HEAD_VERSION, params, upstream), params, upstream


def open_head_inputs(inputs: dict, n_classes: int):
    """The core's HeadInputs from the task references. Dense features (five-crop features, view banks) are
    held in memory when together they fit the memory budget ($USSEG_FEATURE_MEMORY, default 8G), else
    streamed from Zarr batch by batch; the same batches either way (usseg_core.features.choose_read_mode)."""
    from usseg_core.features import choose_read_mode
    from usseg_core.heads import HeadInputs

    out = HeadInputs(n_classes=n_classes)
    if "features" in inputs:
        out.features = open_features(inputs["features"])
    if "knn" in inputs:
        out.knn = np.load(inputs["knn"]["path"])
    if "views" in inputs:
        from usseg_core.viewbank import ViewBank

        out.views = [ViewBank(ref["path"]) for ref in inputs["views"]]
    if "clusterbook" in inputs:
        out.clusterbook = np.load(inputs["clusterbook"]["path"])
    dense = ([out.features] if out.features is not None else []) + list(out.views or [])
    if dense:
        logger().info("head inputs: features %s", choose_read_mode(dense))
    if "oversegment" in inputs:  # one SegmentFolder per split, in its manifest's order = its view bank's
        from usseg_core.datasets.manifest import Manifest
        from usseg_core.overseg import SegmentFolder

        out.segments = [SegmentFolder(ref["path"], Manifest.from_json(ref["manifest"]["path"]).ids)
                        for ref in inputs["oversegment"]]
        for folder in out.segments:
            folder.load_all()
        for v, o in zip(inputs.get("views", []), inputs["oversegment"]):
            if v["manifest"]["hash"] != o["manifest"]["hash"]:
                raise ConfigError(f"view bank {v['key']} and oversegmentation {o['key']} were built on "
                                  "different manifests: their images would not line up")
    return out


def head_artifact_key(method: str, dataset: str, n_classes: int, inputs: dict,
                      overrides: dict | None = None) -> tuple[str, dict, dict]:
    """(key, params, upstream) of the head artifact :func:`ensure_head` writes for these arguments."""
    from usseg_core.heads import config_to_dict, get_head

    return head_key(method, n_classes, config_to_dict(get_head(method).config(dataset, overrides)), inputs)


def _steps(params: dict, primary: str) -> int | None:
    """``steps`` of the head's primary config section, None when it has none."""
    section = params["config"].get(primary)
    steps = section.get("steps") if isinstance(section, dict) else None
    return int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else None


def _without_steps(params: dict, primary: str) -> dict:
    config = dict(params["config"])
    config[primary] = {k: v for k, v in config[primary].items() if k != "steps"}
    return {**params, "config": config}


def _shorter_run(store: ArtifactStore, params: dict, upstream: dict, primary: str):
    """The longest finished head whose params and upstream equal these except a smaller ``steps``.

    Its final checkpoint is where this run would be after that many steps: ``steps`` is a resumable
    field of every trainer (usseg_core.trainer.RESUMABLE_FIELDS), resume is bit-identical, and nothing a
    step does depends on the total length (constant learning rates; tests/core/test_train.py pins the
    equality for STEGO). So a length curve 250 / 500 / 1000 / ... costs the longest run's steps once.
    """
    steps = _steps(params, primary)
    if steps is None:
        return None
    want, best, best_steps = _without_steps(params, primary), None, 0
    for art in store.iter_artifacts("head"):
        p = art.meta.get("params")
        if not art.complete or not isinstance(p, dict) or art.meta.get("upstream") != upstream:
            continue
        try:
            s = _steps(p, primary)
            same = s is not None and best_steps < s < steps and _without_steps(p, primary) == want
        except (KeyError, AttributeError, TypeError):
            continue
        if same and art.file("checkpoint.pt").exists():
            best, best_steps = art, s
    return best


@stage_task("train-head", tags=[GPU_TAG])
def ensure_head(storage: str, method: str, dataset: str, n_classes: int, inputs: dict,
                overrides: dict | None = None, device: str = "auto") -> HeadRef:
    """Train (or find) a registered head on its cached inputs; resumes from its checkpoint after a crash.

    ``inputs`` maps the head's declared inputs to task references: ``features`` (list of five-crop
    feature refs), ``knn``, ``views`` (list of view-bank refs, one per training split), ``oversegment``
    (list of oversegment refs, one per training split, as ``views``). Each becomes an upstream key.
    """
    from usseg_core.heads import get_head, save_head

    spec = get_head(method)
    config = spec.config(dataset, overrides)
    key, params, upstream = head_artifact_key(method, dataset, n_classes, inputs, overrides)
    first = inputs.get("features", inputs.get("views"))[0]

    def train(head_inputs, *, config, checkpoint_path, device, progress):
        return spec.train(head_inputs, config, checkpoint_path=checkpoint_path, device=device, progress=progress)

    def body(work: Work) -> dict:
        store, art = work.store, work.art
        ckpt, continued = art.file("checkpoint.pt"), art.meta.get("continued_from")
        if not ckpt.exists():
            shorter = _shorter_run(store, params, upstream, spec.primary)
            if shorter is not None:  # a longer run of a finished one: continue from its last checkpoint
                logger().info("head/%s continues head/%s from step %s (same config and inputs, %d steps)",
                              art.key, shorter.key, shorter.meta.get("steps"), _steps(params, spec.primary))
                shutil.copyfile(shorter.file("checkpoint.pt"), ckpt)
                continued = shorter.key
                art.update_meta(continued_from=continued)
        with training_slot():
            trained = work.core(train, open_head_inputs(inputs, n_classes), config=config, checkpoint_path=ckpt,
                                device=device, progress=True)
            save_head(art.file("head.pt"), method, n_classes, config, trained.payload)
            load_head(str(art.file("head.pt")), str(resolve_device(device)))  # into the cache, inside the slot
        return {**trained.meta, "history": trained.history[-20:], "steps": trained.steps_done,
                "seconds_per_step": trained.seconds_per_step, "worker": worker_id(device), "continued_from": continued}

    def ref(art, hit: bool) -> HeadRef:
        return HeadRef.of(art, str(art.file("head.pt")), hit, method=method)

    return run_stage(storage, HEAD, params, upstream, body, ref, inputs=[first],
                     info={"dataset": dataset, "method": method}, hit_note=lambda art: f"({method})")


@functools.lru_cache(maxsize=8)
def load_head(path: str | None, device: str = "cpu"):
    """The trained head of a head artifact on ``device`` (cached per process and device); None -> the
    raw-feature baseline."""
    from usseg_core.heads import RawHead
    from usseg_core.heads import load_head as load

    if path is None:
        return RawHead().eval()
    with training_slot():  # its modules' initialisation draws from the global RNG (see _TRAINING)
        return load(path, device)


@torch.no_grad()
def image_codes(head_path: str | None, feats: FeatureStore, flips: FeatureStore | None, i: int,
                size: tuple[int, int], device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Flip-averaged codes of item i on ``device``, bilinearly upsampled to ``size`` -> (1, D, H, W).

    The one way codes of a feature item are computed: by the evaluation (with ``flips``) and by the
    segment memory (without: HSG's ``prototype.py`` uses no flip-TTA there)."""
    head = load_head(head_path, str(device))
    codes = head.codes(to_device(feats[i].astype(np.float32)[None], device))
    if flips is not None:  # flip-TTA: average with the mirrored-back codes of the mirrored image
        codes = (codes + head.codes(to_device(flips[i].astype(np.float32)[None], device)).flip(-1)) / 2
    return F.interpolate(codes, size=size, mode="bilinear", align_corners=False)

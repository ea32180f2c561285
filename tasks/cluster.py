"""Clustering stages: cosine mini-batch k-means over codes, and the linear probe (labels, eval only)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from tasks.manifest import DataRef, load_manifest
from tasks.stage import ArtifactRef, FeaturesRef, Work, declare, logger, run_stage, stage_task, worker_id
from tasks.heads import load_head, open_features
from usseg_core.device import GPU_TAG, resolve_device, to_device
from usseg_core.views import ViewSpec, prepare_label

CPU = torch.device("cpu")
KMEANS_VERSION = 1
PROBE_VERSION = 1
WHERE = "where it runs: part of no key (docs/architecture.md, Devices)"
KMEANS = declare("kmeans", KMEANS_VERSION, "usseg_core.cluster.spherical_kmeans", unkeyed={"device": WHERE})
PROBE = declare("linear-probe", PROBE_VERSION, "usseg_core.heads.probes.train_linear_probe",
                unkeyed={"device": WHERE})


@torch.no_grad()
def code_batches(head_path: str | None, feats, batch: int = 16, device: torch.device = CPU) -> Iterator[torch.Tensor]:
    """Codes ``(B, D, h, w)`` of every item of ``feats`` on ``device``, streamed in batches."""
    head = load_head(head_path, str(device))
    for a in range(0, len(feats), batch):
        x = np.stack([feats[i] for i in range(a, min(a + batch, len(feats)))]).astype(np.float32)
        yield head.codes(to_device(x, device))


def _pixels(codes: torch.Tensor) -> torch.Tensor:
    return codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])  # (B*h*w, D), on the codes' device


@stage_task("kmeans", tags=[GPU_TAG])
def ensure_kmeans(storage: str, head: ArtifactRef | None, feature_infos: list[FeaturesRef], k: int,
                  seed: int = 0, n_epochs: int = 2, device: str = "auto") -> ArtifactRef:
    """Cosine mini-batch k-means over the codes of the training set, streamed from the store.

    Codes and k-means run on ``device`` (resolved here, where the task runs; not part of the key).

    ``head`` None clusters the raw backbone features (the baseline). K may exceed the number of classes
    (over-clustering); evaluation then keeps every pixel (see metrics.hungarian_scores).
    """
    from usseg_core.cluster import spherical_kmeans

    upstream = {f"features{i}": f["key"] for i, f in enumerate(feature_infos)}
    upstream["head"] = head["key"] if head else "raw"
    params = {"k": k, "seed": seed, "n_epochs": n_epochs, "metric": "cosine"}

    def body(work: Work) -> dict:
        feats = open_features(feature_infos)
        head_path, dev = head["path"] if head else None, resolve_device(device)
        centroids = work.core(spherical_kmeans,
                              lambda: (_pixels(c) for c in code_batches(head_path, feats, device=dev)),
                              k=k, n_epochs=n_epochs, seed=seed, device=str(dev))
        np.save(work.art.file("centroids.npy"), centroids.astype(np.float32))
        logger().info("k-means/%s: K=%d over %d items", work.art.key, k, len(feats))
        return {"k": k, "worker": worker_id(str(dev))}

    return run_stage(storage, KMEANS, params, upstream, body,
                     lambda art, hit: ArtifactRef.of(art, str(art.file("centroids.npy")), hit),
                     inputs=feature_infos)


def labelled_code_batches(head_path: str | None, feature_info: dict, data: DataRef, view: ViewSpec,
                          batch: int = 4, device: torch.device = CPU) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(codes at feature resolution (B, D, h, w), labels (B, H, W) int16) of a labelled split.

    The probe's loss upsamples its K-channel logits to the label's size band by band
    (``LinearProbe.loss``): the same as upsampling the D-channel codes, up to float rounding, without a
    (B, D, H, W) map (6.7 GB an image at 24 MP and 70 channels). Full-frame views keep each label at its
    own size, so a folder of mixed image sizes gives labels of different shapes: a batch holds up to
    ``batch`` consecutive items of one label shape.
    """
    feats = open_features([feature_info])
    ids = load_manifest(feature_info["manifest"]).ids
    ds = data.dataset()
    head = load_head(head_path, str(device))

    def emit(idx: list[int], labels: list[np.ndarray]):
        with torch.no_grad():
            codes = head.codes(to_device(np.stack([feats[i] for i in idx]).astype(np.float32), device))
        return codes, to_device(np.stack(labels), device)

    idx, labels = [], []
    for i in range(len(ids)):
        label = prepare_label(ds.load_label(ids[i]), view).astype(np.int16)  # class ids < 2**15; -1 = ignore
        if labels and (len(idx) == batch or label.shape != labels[0].shape):
            yield emit(idx, labels)
            idx, labels = [], []
        idx.append(i)
        labels.append(label)
    if idx:
        yield emit(idx, labels)


@stage_task("linear-probe", tags=[GPU_TAG])
def ensure_linear_probe(storage: str, head: ArtifactRef | None, feature_info: FeaturesRef, data: DataRef,
                        view: dict, n_classes: int, epochs: int = 3, seed: int = 0,
                        device: str = "auto") -> ArtifactRef:
    """A 1x1 conv on detached codes trained with cross-entropy on ground-truth labels.

    Labels are used here and only here, to report the linear-probe metric (STEGO's protocol); the head
    never sees them.
    """
    from usseg_core.heads.probes import train_linear_probe

    params = {"epochs": epochs, "seed": seed, "n_classes": n_classes, "lr": 5e-3}
    upstream = {"features": feature_info["key"], "head": head["key"] if head else "raw"}

    def body(work: Work) -> dict:
        vs, dev = ViewSpec.from_params(view), resolve_device(device)
        probe = work.core(
            train_linear_probe,
            lambda: labelled_code_batches(head["path"] if head else None, feature_info, data, vs, device=dev),
            n_classes=n_classes, epochs=epochs, lr=params["lr"], seed=seed, device=dev)
        torch.save({k: v.cpu() for k, v in probe.state_dict().items()}, work.art.file("probe.pt"))
        return {"worker": worker_id(str(dev))}

    return run_stage(storage, PROBE, params, upstream, body,
                     lambda art, hit: ArtifactRef.of(art, str(art.file("probe.pt")), hit),
                     inputs=[feature_info], info={"dataset": data.name, "split": data.split})

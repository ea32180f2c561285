"""KNN mining and head training tasks (STEGO, and OMH on top of it)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common import logger
from usseg_core.features import ConcatFeatures, FeatureStore
from usseg_core.store import ArtifactStore, artifact_key

KNN_VERSION = 1
HEAD_VERSION = 1
METHODS = ("stego", "omh")


def open_features(infos: list[dict]) -> ConcatFeatures:
    return ConcatFeatures([FeatureStore(i["path"]) for i in infos])


def _feature_upstream(infos: list[dict]) -> dict:
    return {f"features{i}": info["key"] for i, info in enumerate(infos)}


@task(name="mine-knn", cache_policy=NO_CACHE)
def ensure_knn(storage: str, feature_infos: list[dict], k: int = 30) -> dict:
    """Cosine top-k over the pooled, L2-normalised features of the crop set (column 0 = self).

    The key covers every feature artifact (hence backbone fingerprint, resolution and crop set) and k;
    they are also written out in the metadata: no key part is silently ignored (unlike STEGO's
    ``nns_*_224.npz``, whose name ignores the configured resolution).
    """
    from usseg_core.knn import mine_knn

    store = ArtifactStore(storage)
    upstream = _feature_upstream(feature_infos)
    key = artifact_key("knn", KNN_VERSION, {"k": k}, upstream)
    art = store.get("knn", key)
    if art is None:
        feats = open_features(feature_infos)
        metas = [store.find(i["key"]).meta for i in feature_infos]
        art = store.begin("knn", key, version=KNN_VERSION, params={"k": k}, upstream=upstream,
                          dataset=metas[0].get("dataset"), backbone=metas[0].get("backbone"),
                          backbone_fingerprint=metas[0].get("backbone_fingerprint"),
                          views=[m.get("view") for m in metas])
        knn = mine_knn(feats.pooled_all(), k)
        np.save(art.file("knn.npy"), knn)
        store.finish(art, n_items=int(knn.shape[0]), k=k)
        logger().info("mined knn/%s: %d items, top-%d", key, knn.shape[0], k)
    else:
        logger().info("cache hit: knn/%s", key)
    return {"key": key, "path": str(art.file("knn.npy"))}


def head_key(method: str, n_classes: int, config: dict, feature_infos: list[dict], knn: dict,
             aux_config: dict | None) -> tuple[str, dict, dict]:
    params = {"method": method, "n_classes": n_classes, "config": config, "aux": aux_config}
    upstream = {**_feature_upstream(feature_infos), "knn": knn["key"]}
    return artifact_key("head", HEAD_VERSION, params, upstream), params, upstream


@task(name="train-head", cache_policy=NO_CACHE)
def ensure_head(storage: str, method: str, dataset: str, n_classes: int, feature_infos: list[dict],
                knn: dict, overrides: dict | None = None, device: str = "auto") -> dict:
    """Train (or find) a head on cached features; resumes from its checkpoint after a crash."""
    from usseg_core.heads.stego import stego_config_for
    from usseg_core.train import train_stego

    overrides = dict(overrides or {})
    aux_over = {k[4:]: overrides.pop(k) for k in list(overrides) if k.startswith("omh.")}
    config = stego_config_for(dataset, **overrides)
    aux_config = None
    if method == "omh":
        from usseg_core.heads.omh import OMHConfig

        aux_config = OMHConfig(**aux_over).__dict__
    elif method != "stego":
        raise ValueError(f"unknown head method {method!r}; known: {', '.join(METHODS)}")
    key, params, upstream = head_key(method, n_classes, config.to_dict(), feature_infos, knn, aux_config)
    store = ArtifactStore(storage)
    art = store.get("head", key)
    if art is not None:
        logger().info("cache hit: head/%s (%s)", key, method)
        return {"key": key, "path": str(art.file("head.pt")), "method": method}
    meta0 = store.find(feature_infos[0]["key"]).meta
    art = store.begin("head", key, version=HEAD_VERSION, params=params, upstream=upstream,
                      dataset=dataset, backbone=meta0.get("backbone"),
                      backbone_fingerprint=meta0.get("backbone_fingerprint"), method=method)
    feats = open_features(feature_infos)
    feats.load_all()
    knn_table = np.load(knn["path"])
    aux = None
    if method == "omh":
        from usseg_core.heads.omh import OMHConfig, OMHLoss

        aux = OMHLoss(config.dim, n_classes, OMHConfig(**aux_config))
    result = train_stego(feats, knn_table, n_classes, config, checkpoint_path=art.file("checkpoint.pt"),
                         device=device, progress=True, aux=aux)
    torch.save({"method": method, "in_dim": int(feats.shape[1]), "code_dim": config.dim,
                "n_classes": n_classes, "config": config.to_dict(), "head": result.head_state,
                "cluster": result.cluster_state}, art.file("head.pt"))
    store.finish(art, shifts=list(result.shifts), correlation_stats=result.correlation_stats,
                 history=result.history[-20:], steps=result.steps_done,
                 seconds_per_step=getattr(result, "seconds_per_step", None))
    return {"key": key, "path": str(art.file("head.pt")), "method": method}


class RawHead(torch.nn.Module):
    """The identity 'head': raw backbone features as codes (the k-means baseline)."""

    def codes(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


@functools.lru_cache(maxsize=8)
def load_head(path: str | None) -> tuple[torch.nn.Module, dict]:
    """(module with .codes(feats), checkpoint dict) of a head artifact; None -> the raw baseline."""
    if path is None:
        return RawHead().eval(), {"method": "raw"}
    from usseg_core.heads.probes import ClusterProbe
    from usseg_core.heads.stego import StegoHead

    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    head = StegoHead(ckpt["in_dim"], ckpt["code_dim"], ckpt["config"].get("dropout", 0.1))
    head.load_state_dict(ckpt["head"])
    probe = ClusterProbe(ckpt["code_dim"], ckpt["n_classes"])
    probe.load_state_dict(ckpt["cluster"])
    ckpt["cluster_probe"] = probe.eval()
    return head.eval(), ckpt

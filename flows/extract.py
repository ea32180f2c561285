"""Flow ``extract-features``: manifest -> backbone fingerprint -> sharded extraction into Zarr."""
from __future__ import annotations

from prefect import flow

from flows.publish import publish_run
from flows.runner import SettingTaskRunner
from flows.settings import data_root as resolve_data_root
from flows.settings import storage_root
from tasks.common import BackboneRef, DataRef
from tasks.extract import ensure_features
from usseg_core.views import ViewSpec

DEFAULT_BACKBONE = "tf_efficientnet_lite0"  # the one pretrained backbone available offline


@flow(name="extract-features", task_runner=SettingTaskRunner())
def extract_features(dataset: str, data_root: str | None = None, split: str = "train",
                     backbone: str = DEFAULT_BACKBONE,
                     weights: str | None = None, random_weights: bool = False,
                     policy: str = "center_crop", resolution: int | None = 224, flip: bool = False,
                     storage: str | None = None, batch_size: int = 8, shard_size: int = 64,
                     on_error: str = "raise", precision: str = "auto", device: str = "auto",
                     dataset_options: dict | None = None, task_runner: str = "threads") -> dict:
    """Extract (or find cached) dense + pooled features of one dataset split.

    ``data_root``/``storage`` None: resolved by flows/settings.py; ``task_runner``: flows/runner.py.
    """
    storage = str(storage_root(storage))
    data = DataRef(dataset, resolve_data_root(dataset, data_root, storage), split, dataset_options or {}, on_error)
    ref = BackboneRef(backbone, weights, random_weights, device=device)
    view = ViewSpec(policy=policy, resolution=resolution, flip=flip)
    out = ensure_features(storage, data, ref, view, batch_size=batch_size, precision=precision,
                          shard_size=shard_size)
    publish_run(storage, "extract-features", out)
    return out

"""Flow ``extract-features``: manifest -> backbone fingerprint -> sharded extraction into Zarr."""
from __future__ import annotations

from prefect import flow

from orchestration.publish import publish_run
from orchestration.runner import SettingTaskRunner
from orchestration.refs import backbone_ref, data_ref, resolved
from tasks.extract import ensure_features
from usseg_core.spec import ExtractSpec
from usseg_core.views import ViewSpec


@flow(name="extract-features", task_runner=SettingTaskRunner())
def extract_features(spec: ExtractSpec) -> dict:
    """Extract (or find cached) dense + pooled features of one dataset split.

    ``spec.data_root`` / ``spec.storage`` None: resolved by orchestration/settings.py; ``spec.task_runner``:
    orchestration/runner.py.
    """
    spec = resolved(spec)
    view = ViewSpec(policy=spec.policy, resolution=spec.resolution, flip=spec.flip)
    out = ensure_features(spec.storage, data_ref(spec, spec.split), backbone_ref(spec), view,
                          batch_size=spec.batch_size, precision=spec.precision, shard_size=spec.shard_size)
    publish_run(spec.storage, "extract-features", out)
    return out

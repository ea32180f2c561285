"""From a run spec to the references tasks take: which data, which backbone, and where (paths resolved)."""
from __future__ import annotations

from typing import TypeVar

from orchestration.settings import data_root as resolve_data_root
from orchestration.settings import storage_root
from tasks.backbone import BackboneRef
from tasks.manifest import DataRef
from usseg_core.spec import DataSpec, Where

S = TypeVar("S", bound=Where)


def backbone_ref(run: DataSpec) -> BackboneRef:
    return BackboneRef(run.backbone, run.weights, run.random_weights, device=run.device)


def data_ref(run: Where, split: str) -> DataRef:
    return DataRef(run.dataset, run.data_root, split, run.dataset_options, run.on_error)


def resolved(spec: S) -> S:
    """``spec`` with its storage and data root resolved (flag -> environment -> Prefect variable -> default)."""
    storage = str(storage_root(spec.storage))
    root = str(resolve_data_root(spec.dataset, spec.data_root, storage))
    if (storage, root) == (spec.storage, spec.data_root):
        return spec  # already resolved (the CLI resolves both): no second validation of the whole spec
    return spec.changed(storage=storage, data_root=root)

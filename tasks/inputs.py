"""The head input stages, as a table: how each cached input a head can declare (``HeadSpec.needs``, a
subset of ``usseg_core.heads.registry.INPUTS``) is ensured.

``flows/train.py`` ``train_inputs`` loops over :data:`INPUT_STAGES` in its order and runs the rows the
head needs (with the rows they require), so a new input stage is one row here and one name in ``INPUTS``
(``tests/flows/test_registry_pipeline.py`` checks that every declared input has a row). The order is a
contract: five-crop features before the KNN table that mines them, and the oversegmentation before the
view bank (a detector that cannot be built fails before any backbone work).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tasks.backbone import BackboneRef
from tasks.clusterbook import ensure_clusterbook
from tasks.manifest import DataRef
from tasks.extract import ensure_features
from tasks.heads import ensure_knn
from tasks.oversegment import ensure_oversegmentation
from tasks.views import ensure_views


@dataclass
class InputContext:
    """What an input row reads: the run spec (``usseg_core.spec.RunSpec``), its storage, backbone, one
    data reference per training split, the first split's dataset, and the inputs ensured so far."""

    run: Any
    storage: str
    backbone: BackboneRef
    datas: list[DataRef]
    dataset: Any
    inputs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class InputStage:
    """One row: the declared input ``name``, the head-input field it fills (``slot``), the rows it
    requires, and ``ensure(ctx) -> (references, features k-means is fitted on or None)``."""

    name: str
    slot: str
    ensure: Callable[[InputContext], tuple[Any, list | None]]
    requires: tuple[str, ...] = ()


def _five_crop(ctx: InputContext):
    crops = ctx.run.crops_config().view(ctx.dataset, ctx.run.resolution)  # the dataset's view, or --set crops.*
    feats = [ensure_features(ctx.storage, d, ctx.backbone, crops) for d in ctx.datas]
    return feats, feats  # k-means (codes and raw) is fitted on the five-crop features


def _knn(ctx: InputContext):
    return ensure_knn(ctx.storage, ctx.inputs["features"], settings=ctx.run.knn_config()), None


def _oversegment(ctx: InputContext):
    ocfg = ctx.run.overseg_config()  # same DataRefs, hence same manifests and image order, as the views
    return [ensure_oversegmentation(ctx.storage, d, ocfg.detector, ocfg.weights, ocfg.schedule(ctx.run.dataset))
            for d in ctx.datas], None


def _views(ctx: InputContext):
    base, vcfg = ctx.dataset.protocol.eval_view(ctx.run.resolution), ctx.run.views_config()  # the eval frame
    frames = [ensure_features(ctx.storage, d, ctx.backbone, base) for d in ctx.datas]  # un-augmented frames
    return [ensure_views(ctx.storage, d, ctx.backbone, base, vcfg, manifest=b["manifest"])
            for d, b in zip(ctx.datas, frames)], frames  # k-means is fitted on the plain frames


def _clusterbook(ctx: InputContext):
    from usseg_core.heads import get_head

    settings = get_head(ctx.run.head).config(ctx.run.dataset, ctx.run.head_settings())["clusterbook"]
    return ensure_clusterbook(ctx.storage, ctx.inputs["features"], ctx.datas, settings), None


INPUT_STAGES: tuple[InputStage, ...] = (
    InputStage("five_crop", "features", _five_crop),
    InputStage("knn", "knn", _knn, requires=("five_crop",)),
    InputStage("oversegment", "oversegment", _oversegment),  # before the views: a bad detector fails early
    InputStage("views", "views", _views),
    InputStage("clusterbook", "clusterbook", _clusterbook, requires=("five_crop",)),  # CAUSE's mediator
)


def stages_for(needs) -> list[InputStage]:
    """The rows a head with these ``needs`` runs, in table order (required rows included)."""
    wanted = set(needs)
    for row in reversed(INPUT_STAGES):  # a row requires only rows above it
        if row.name in wanted:
            wanted |= set(row.requires)
    return [row for row in INPUT_STAGES if row.name in wanted]


def ensure_inputs(ctx: InputContext, needs) -> list | None:
    """Fill ``ctx.inputs`` with every input the head needs; returns the features k-means is fitted on
    (the last row that names them), or None when no row does."""
    cluster_on = None
    for row in stages_for(needs):
        refs, fitted = row.ensure(ctx)
        ctx.inputs[row.slot] = refs
        if fitted is not None:
            cluster_on = fitted
    return cluster_on

"""Predictors: what turns a group's codes into a label map, and the one builder every evaluation uses.

A :class:`Predictor` names the artifact it reads (``key`` and ``path``: the head for its own clusterer,
k-means centroids, a linear probe, a segment memory) and how its outputs are scored (``kind``; ``n_pred``
outputs). :func:`predictors_for` builds a group's predictors from the head's registration
(``HeadSpec.predictor_kinds``, ``HeadSpec.clusterer``) and the artifacts a run has: training
(``flows/train.py``), ``evaluate-model``, ``compare`` and segment retrieval (``tasks/retrieval.py``) all
go through it, so a predictor has the same name, label and key fields wherever it is evaluated.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tasks.stage import FieldMapping
from usseg_core.retrieval import K_DEFAULT, KMEANS_ITERS, VOTE_DEFAULT, check_options

RAW_KINDS = ("kmeans",)  # the raw-feature baseline: k-means on the backbone's features (+ retrieval)


@dataclass(frozen=True, kw_only=True)
class Predictor(FieldMapping):
    """One predictor of an evaluation group.

    ``name`` is unique over an evaluation (its confusion matrices are keyed by it); ``label`` is the
    results table's ``clusterer`` column (the kind when None); the retrieval fields are None for the other
    kinds. Reads as a read-only mapping of its set fields (``p["kind"]``), as the evaluation's parameters
    (:meth:`params`) and the results table do.
    """

    name: str
    kind: str
    n_pred: int
    key: str
    path: str | None
    label: str | None = None
    n_classes: int | None = None
    pool_to: list | None = None
    grid: list | None = None
    iters: int | None = None
    k: int | None = None
    vote: str | None = None

    def params(self) -> dict:
        """What the evaluation key covers of it: every set field but the file location (``key`` stands
        for it)."""
        return {n: v for n, v in self._items().items() if n != "path"}

    @property
    def row_label(self) -> str:
        return self.label or self.kind

    def _items(self) -> dict:
        """The set fields only (a retrieval field is None for the other kinds)."""
        return {n: v for n, v in super()._items().items() if v is not None}


def retrieval_predictor(memory: Mapping, n_classes: int, grid, iters: int = KMEANS_ITERS, k: int = K_DEFAULT,
                        vote: str = VOTE_DEFAULT, name: str = "retrieval") -> Predictor:
    """kNN label transfer from a segment memory (HSG's protocol; its outputs are classes)."""
    check_options(k, vote)
    label = f"retrieval-k{k}" if vote == VOTE_DEFAULT else f"retrieval-k{k}-{vote}"
    return Predictor(name=name, kind="retrieval", label=label, n_pred=n_classes, n_classes=n_classes,
                     key=memory["key"], path=memory["path"], pool_to=list(memory["pool_to"]),
                     grid=[int(g) for g in grid], iters=int(iters), k=int(k), vote=vote)


def predictors_for(head, *, n_classes: int, head_ref: Mapping | None = None, kmeans: Mapping | None = None,
                   k: int | None = None, probe: Mapping | None = None, head_classes: int | None = None,
                   kmeans_name: str = "kmeans") -> list[Predictor]:
    """A group's predictors, in the table order of ``head.predictor_kinds`` (``head`` None: the raw-feature
    baseline, k-means only); a kind whose artifact is not given (no labelled split for a probe, no k-means
    for an imported head) is left out. Retrieval is appended by :func:`tasks.retrieval.add_retrieval`,
    which builds the memory of each group first.

    Args:
        head: the head's registration (``usseg_core.heads.HeadSpec``), or None for raw features.
        head_ref: the head artifact (its own clusterer reads it).
        kmeans, k: the k-means artifact over the group's codes and its K.
        probe: the linear probe artifact.
        head_classes: clusters of the head's own clusterer (an imported head may hold more than the
            dataset's classes); default ``n_classes``.
    """
    kinds = head.predictor_kinds if head is not None else RAW_KINDS
    out = []
    for kind in kinds:
        if kind == "own" and head_ref is not None:
            out.append(Predictor(name=head.clusterer, kind="own", label=head.clusterer,
                                 n_pred=int(head_classes or n_classes), key=head_ref["key"], path=head_ref["path"]))
        elif kind == "kmeans" and kmeans is not None:
            out.append(Predictor(name=kmeans_name, kind="kmeans", n_pred=int(k), key=kmeans["key"],
                                 path=kmeans["path"]))
        elif kind == "linear" and probe is not None:
            out.append(Predictor(name="linear", kind="linear", n_pred=n_classes, n_classes=n_classes,
                                 key=probe["key"], path=probe["path"]))
    return out

"""The head registry: one entry per method, one factory (timm's ``create_model`` pattern, for heads).

An entry (:class:`HeadSpec`) declares everything the rest of usseg needs to know about a method:

- its configuration *sections* (dataclasses whose defaults are the paper's values, each field citing
  its source) and per-dataset presets;
- which cached inputs it trains on (:data:`INPUTS`): five-crop features, the KNN table, the view bank,
  oversegmentations, CAUSE's concept clusterbook. The pipeline computes exactly those;
- how to train it (a function of :class:`HeadInputs` and the resolved config, built on the shared
  resumable loop in ``usseg_core.trainer``);
- how its checkpoint payload loads into a :class:`TrainedHead`, a module with ``codes(features)`` and,
  where the method has one, its own cluster assignment (``cluster_logits``).

Tasks, flows, the CLI, deployments and the backbone watcher list heads with :func:`list_heads`; nothing
outside ``usseg_core/heads/`` switches on a head's name. A new head = its module + its
:func:`register_head` call (in ``usseg_core/heads/__init__.py``) + its tests.

Configuration overrides are namespaced by section: ``omh.w_match=0.1`` sets a field of OMH's section,
``picie.k_over=100`` one of PiCIE's; bare names (``steps=2000``) set the head's first ("primary") section,
which is the part shared with related heads (OMH's primary section is STEGO's config).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from usseg_core.config import keyed_asdict
from usseg_core.device import resolve_device
from usseg_core.errors import ConfigError, InputError
from usseg_core.registry import Registry

# Cached inputs a head may declare (each is an upstream stage of the pipeline).
INPUTS = ("five_crop", "knn", "views", "oversegment", "clusterbook")
HEAD_FORMAT = 2  # version of head.pt written by usseg_core.heads.save_head


@dataclass
class HeadInputs:
    """The cached inputs a head trains on; only those its spec declares are filled in.

    Attributes:
        n_classes: K, clusters of the method's own assignment (= number of classes).
        features: five-crop training features, indexable ``features[i] -> (C, h, w)`` ("five_crop").
        knn: (N, k) neighbour table over ``features``, column 0 = self ("knn").
        views: a ``usseg_core.viewbank.ViewBank`` of recorded augmented views ("views").
        base: un-augmented features of the same images as ``views`` (the frame the views are drawn in).
        segments: oversegmentations ("oversegment"): one sequence per training split, aligned with ``views``
            (``len(segments[s]) == views[s].n_images``); ``segments[s][i]`` is image i's (H, W) int32 region
            map at the original image size (``usseg_core.overseg.SegmentFolder``).
        clusterbook: (K, C) float32 concept vectors fitted on ``features`` ("clusterbook", CAUSE's mediator:
            ``tasks/clusterbook.py``).
    """

    n_classes: int
    features: Sequence | None = None
    knn: np.ndarray | None = None
    views: Any = None
    base: Sequence | None = None
    segments: Any = None
    clusterbook: np.ndarray | None = None


@dataclass
class TrainedState:
    """What a head's ``train`` returns: the checkpoint payload and a JSON-able summary for metadata."""

    payload: dict  # tensors and JSON-able values: the head-specific part of head.pt
    meta: dict = field(default_factory=dict)  # shifts, history tail, ... (artifact meta.json)
    steps_done: int = 0
    seconds_per_step: float | None = None
    history: list[dict] = field(default_factory=list)


class TrainedHead(nn.Module):
    """A trained head at inference: ``codes(features)`` and, optionally, its own cluster assignment.

    Subclasses set ``method``, ``in_dim``, ``code_dim``, ``n_classes`` and implement :meth:`codes`;
    heads with their own clusterer (STEGO's cluster probe, PiCIE's centroids) implement
    :meth:`cluster_logits` and set ``clusterer`` to the name results tables show.
    """

    method: str = "head"
    clusterer: str | None = None

    def __init__(self, in_dim: int, code_dim: int, n_classes: int) -> None:
        super().__init__()
        self.in_dim, self.code_dim, self.n_classes = in_dim, code_dim, n_classes

    def codes(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) frozen features -> (B, D, h, w) codes (eval mode, no dropout)."""
        raise NotImplementedError

    def cluster_logits(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) codes -> (B, K, h, w) logits of the method's own assignment."""
        raise ConfigError(f"head {self.method!r} has no cluster assignment of its own; use k-means")

    def assign(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) codes -> (B, h, w) cluster index of the method's own assignment."""
        return self.cluster_logits(codes).argmax(dim=1)


class RawHead(TrainedHead):
    """The identity 'head': raw backbone features as codes (the k-means baseline)."""

    method = "raw"

    def __init__(self) -> None:
        super().__init__(0, 0, 0)

    def codes(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


@dataclass(frozen=True)
class HeadSpec:
    """A registered head.

    Attributes:
        name: registry name (also in flow names ``train-<name>``, deployment names and metadata).
        summary: one line for ``--help`` and docs.
        sections: ((section name, config dataclass), ...); the first is the primary section.
        presets: dataset registry name -> {section: {field: value}} (per-dataset defaults).
        needs: the cached inputs it trains on, a subset of :data:`INPUTS`.
        train: ``train(inputs: HeadInputs, config: dict[str, dataclass], *, checkpoint_path, device,
            progress, on_step) -> TrainedState``.
        load: ``load(ckpt: dict) -> TrainedHead`` from the dict :func:`save_head` wrote.
        clusterer: name of the method's own cluster assignment in results tables, or None (then k-means on
            its codes is its unsupervised predictor).
        retrieval: evaluate with segment retrieval (HSG's kNN label transfer) by default, beside the shared
            Hungarian protocol (``usseg run --retrieval/--no-retrieval`` overrides it for any head).
        hierarchy: its trained head has ``levels(codes)``, a coarse-to-fine hierarchy of per-image groups
            (HSG): evaluation examples and ``usseg segment`` write one map per level.
        demo: namespaced ``--set`` overrides of a test-sized training (``usseg demo``, synthetic deployments),
            e.g. ``{"stego.steps": 200}``; checked against the sections like any override.
    """

    name: str
    summary: str
    sections: tuple[tuple[str, type], ...]
    presets: Callable[[str], dict[str, dict]]
    needs: frozenset[str]
    train: Callable[..., TrainedState]
    load: Callable[[dict], TrainedHead]
    clusterer: str | None = None
    retrieval: bool = False
    hierarchy: bool = False
    demo: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.needs) - set(INPUTS))
        if unknown:
            raise ConfigError(f"head {self.name!r}: unknown inputs {unknown}; known: {list(INPUTS)}")
        if not self.sections:
            raise ConfigError(f"head {self.name!r} needs at least one config section")
        for key in self.demo:
            self.split_key(key)  # a demo override names a real section and field

    @property
    def primary(self) -> str:
        return self.sections[0][0]

    @property
    def predictor_kinds(self) -> tuple[str, ...]:
        """The predictors a run evaluates by default, in table order: the head's own clusterer (``"own"``)
        where it has one, k-means on its codes, the linear probe (labelled splits), and segment retrieval
        where the method uses it."""
        return (("own",) if self.clusterer else ()) + ("kmeans", "linear") + (("retrieval",) if self.retrieval else ())

    def config(self, dataset: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Resolved config sections for ``dataset``: defaults < dataset preset < ``overrides``."""
        values = {name: dict(v) for name, v in self.presets(dataset).items()}
        for key, value in (overrides or {}).items():
            section, fld = self.split_key(key)
            values.setdefault(section, {})[fld] = value
        out = {}
        for name, cls in self.sections:
            try:
                out[name] = cls(**values.get(name, {}))
            except (TypeError, ValueError) as exc:  # a value of the wrong type (fields are checked above)
                raise ConfigError(f"head {self.name!r}, section {name!r}: {exc}") from exc
        return out

    def split_key(self, key: str) -> tuple[str, str]:
        """``"omh.w_match"`` -> ("omh", "w_match"); a bare name -> (primary, name). Validates both."""
        sections = dict(self.sections)
        section, _, fld = key.rpartition(".")
        section = section or self.primary
        if section not in sections:
            raise ConfigError(f"--set {key}: head {self.name!r} has no config section {section!r}; "
                              f"its sections: {', '.join(sections)} (bare names set {self.primary!r})")
        names = [f.name for f in dataclasses.fields(sections[section])]
        if fld not in names:
            others = [f"{s}.{f.name}" for s, c in self.sections[1:] for f in dataclasses.fields(c)]
            hint = f"; namespaced: {', '.join(others)}" if others else ""
            raise ConfigError(f"--set {key}: unknown field {fld!r} of head {self.name!r} section {section!r}; "
                              f"valid: {', '.join(names)}{hint}")
        return section, fld


def dataset_preset(table: Mapping[str, Mapping[str, Any]], head: str, dataset: str) -> dict[str, Any]:
    """A copy of ``dataset``'s row in a head's per-dataset preset table.

    Every registered dataset has a row in every built-in head's table (an empty row: the paper's defaults),
    so a missing row is a forgotten declaration, reported instead of silently taking the defaults.

    Raises:
        ConfigError: naming the head, the dataset and the datasets the table has rows for.
    """
    try:
        return dict(table[dataset])
    except KeyError:
        raise ConfigError(f"head {head!r} has no preset for dataset {dataset!r}; add a row (an empty one keeps "
                          f"the head's defaults) to its preset table, which has: {', '.join(table)}") from None


HEADS: Registry[HeadSpec] = Registry("head")


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add ``spec`` to the registry (a name can be registered once)."""
    return HEADS.register(spec.name, spec)


def unregister_head(name: str) -> None:
    """Remove a head (tests that register toy heads clean up with this)."""
    HEADS.unregister(name)


def get_head(name: str) -> HeadSpec:
    """The registered head ``name``; an unknown name fails with the list of heads."""
    return HEADS.get(name)


def list_heads() -> list[str]:
    """Registered head names, in registration order."""
    return HEADS.names()


def demo_overrides(heads: Sequence[str]) -> dict[str, Any]:
    """The test-sized lengths these heads declare (:attr:`HeadSpec.demo`), namespaced by section, so that a
    comparison routes each to the heads that have it (``usseg demo``, the synthetic deployments)."""
    return {k: v for h in heads for k, v in get_head(h).demo.items()}


def config_to_dict(config: Mapping[str, Any]) -> dict[str, dict]:
    """JSON-able form of resolved config sections (tuples become lists; fields marked
    :data:`~usseg_core.config.KEYED_WHEN_SET` left out at their defaults)."""
    out = {}
    for name, section in config.items():
        d = section.to_dict() if hasattr(section, "to_dict") else keyed_asdict(section)
        out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
    return out


def save_head(path: str | Path, method: str, n_classes: int, config: Mapping[str, Any], payload: dict) -> None:
    """Write head.pt: common fields + the head's payload (which holds ``in_dim``); ``weights_only`` loadable."""
    torch.save({"format": HEAD_FORMAT, "method": method, "n_classes": int(n_classes),
                "config": config_to_dict(config), **payload}, Path(path))


def load_head(path: str | Path, device: str | torch.device = "cpu") -> TrainedHead:
    """A trained head from its artifact folder (``storage/head/<key>``) or its ``head.pt``; no Prefect.

    Example (a notebook)::

        from usseg_core.heads import load_head
        head = load_head("storage/head/<key>")      # .codes(feats), .assign(codes), .method
    """
    path = Path(path)
    if path.is_dir():
        path = path / "head.pt"
    if not path.exists():
        raise InputError(path, "no head checkpoint here (expected a head artifact folder or its head.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unreadable file is the same user problem
        raise InputError(path, f"unreadable head checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "method" not in ckpt:
        raise InputError(path, "not a usseg head checkpoint (no 'method' field)")
    if ckpt.get("format") != HEAD_FORMAT:
        raise InputError(path, f"head checkpoint format {ckpt.get('format')} != {HEAD_FORMAT}; "
                               "re-run training to rewrite it")
    head = get_head(ckpt["method"]).load(ckpt)
    return head.to(resolve_device(device)).eval()

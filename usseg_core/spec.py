"""The run specs: one typed, validated model per kind of run, from the command line to the artifact key.

``usseg run`` builds a :class:`RunSpec`, ``usseg compare`` / ``usseg demo`` a :class:`CompareSpec`,
``usseg extract`` an :class:`ExtractSpec`, each once, from its options; the spec is then the **only**
parameter of the flow it starts (``pipeline``, ``train-<head>``, ``evaluate-<head>``, ``compare``,
``extract-features``), so a deployment can set every field a command line can (Prefect builds the
deployment's parameter form from the model), and every default is written here and nowhere else.

Everything is checked when a spec is built, before any server starts or any work is done: registry
names (head, dataset, backbone, edge detector), ``--set`` keys and values of every section, modes,
paths, and rules across fields (STEGO's ``num_neighbors`` against the KNN table's ``knn.k``). A bad value
raises :class:`~usseg_core.errors.ConfigError` (or :class:`~usseg_core.errors.InputError` for a missing
file) with one line that names the field and the valid choices; :func:`build` turns pydantic's own
type errors into the same kind of line.

This module imports pydantic only; the registries are imported by the checks, so that a command's
``--help`` stays free of torch.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from usseg_core.errors import ConfigError, InputError
from usseg_core.overseg import DEFAULT_DETECTOR

DEFAULT_BACKBONE = "tf_efficientnet_lite0"  # the one pretrained backbone available offline
DEFAULT_RESOLUTION = 224  # training resolution: STEGO's five-crops, the view bank's frame
DEFAULT_SEEDS = (0, 1, 2)  # a comparison's seeds
RETRIEVAL_K = 20  # twke18/HSG hsg/models/predictions/segsort.py: top_k_ranking(..., 20)
# Namespaces of --set keys that configure a shared input stage rather than the head.
VIEWS_PREFIX, OVERSEG_PREFIX, KNN_PREFIX, CROPS_PREFIX = "views.", "overseg.", "knn.", "crops."
STAGE_PREFIXES = (VIEWS_PREFIX, OVERSEG_PREFIX, KNN_PREFIX, CROPS_PREFIX)
# --set keys that are run fields, not configuration (kept for the command lines users already type);
# ``seed`` is one too, for a single run (RunSpec): a comparison sets its seeds with --seeds.
RUN_FIELD_SETS = ("n_clusters", "dataset_options")

OnError = Literal["raise", "skip"]
Overcluster = Literal["unmatched-wrong", "majority", "reference-drop"]  # see usseg_core.metrics.hungarian_scores
OVERCLUSTER_MODES = get_args(Overcluster)
DEFAULT_OVERCLUSTER = OVERCLUSTER_MODES[0]  # ours: unmatched clusters count as errors
Vote = Literal["majority", "weighted"]  # majority: twke18/HSG utils/segsort/eval.py; weighted: ours
RetrievalLabels = Literal["valid-majority", "reference"]  # usseg_core.datasets.protocol.RETRIEVAL_LABELS
RETRIEVAL_VOTES = get_args(Vote)
Policy = Literal["center_crop", "five_crop", "full"]
Precision = Literal["auto", "fp32", "bf16"]

_RUNNER = re.compile(r"^(threads(:[1-9]\d*)?|dask(:[1-9]\d*)?|(tcp|tls)://\S+)$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class _Spec(BaseModel):
    """Frozen (a spec is a value: it keys work) and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def changed(self, **updates: Any):
        """A validated copy with ``updates`` (``model_copy`` would skip validation)."""
        return type(self).model_validate({**self.model_dump(), **updates})


class Where(_Spec):
    """Which images, where the artifacts go, and how the work is run."""

    dataset: str = Field(description="Dataset registry name (cocostuff27, cityscapes27, potsdam3, camvid11, "
                                     "directory, synthetic).")
    data_root: str | None = Field(None, description="Dataset root folder; None: $USSEG_DATA_ROOT/<dataset "
                                                    "folder>, the Prefect variable usseg_data_root, or (synthetic) "
                                                    "generated scenes.")
    dataset_options: dict[str, Any] = Field(default_factory=dict, description="Dataset-specific options "
                                            "(e.g. {\"curated\": false} for cocostuff27).")
    on_error: OnError = Field("raise", description="Invalid image/label files: raise (stop at the first) | "
                                                   "skip (leave them out, listed in the manifest artifact).")
    storage: str | None = Field(None, description="Artifact root; None: $USSEG_STORAGE, the Prefect variable "
                                                  "usseg_storage, else ./storage.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    task_runner: str = Field("threads", description="threads[:N] | dask[:N] (local cluster) | tcp://host:port.")

    @field_validator("on_error", mode="before")
    @classmethod
    def _fail_is_raise(cls, value: Any) -> Any:
        return "raise" if value == "fail" else value  # --on-error fail|skip on the command line

    @field_validator("dataset_options", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _check_where(self):
        from usseg_core.datasets.registry import dataset_class

        dataset_class(self.dataset)  # "unknown dataset 'x'; known: ..."
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise ConfigError(f"--data-root {self.data_root}: no such folder")
        self._check_splits()
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if not _RUNNER.match(self.task_runner):
            raise ConfigError(f"task runner {self.task_runner!r}: use threads[:N], dask[:N] or tcp://host:port")
        return self


    def _check_splits(self) -> None:
        """A split that leaves the data root ('..', absolute) is refused naming the option that gave it."""
        from usseg_core.datasets.base import check_split_name

        for name, option in SPLIT_OPTIONS.items():
            value = getattr(self, name, None)
            for split in [value] if isinstance(value, str) else value or []:
                check_split_name(split, self.data_root or "(--data-root)", option)


# The spec fields that name splits, and the command-line option of each (named in their errors).
SPLIT_OPTIONS = {"split": "--split", "train_split": "--train-split", "eval_split": "--eval-split"}


class DataSpec(Where):
    """:class:`Where`, and the backbone whose features every stage below reads."""

    backbone: str = Field(DEFAULT_BACKBONE, description="Backbone registry name.")
    weights: str | None = Field(None, description="Local backbone weights file (.pth/.safetensors).")
    random_weights: bool = Field(False, description="A seeded random backbone (tests).")

    @model_validator(mode="after")
    def _check_backbone(self):
        from usseg_core.backbones.specs import backbone_spec  # the torch-free table

        backbone_spec(self.backbone)  # "unknown backbone 'x'; known: ..."
        if self.random_weights and self.weights is not None:
            raise ConfigError(f"backbone {self.backbone!r}: give either weights={self.weights!r} or "
                              "random_weights, not both")
        if self.weights is not None and not Path(self.weights).expanduser().is_file():
            raise InputError(self.weights, "no such backbone weights file")
        return self


class OversegmentSpec(Where):
    """``usseg oversegment`` / flow ``oversegment``: edges, OWT-UCM and HSG's schedule of one split."""

    split: str = Field("train", description="Split to oversegment.")
    detector: str = Field(DEFAULT_DETECTOR, description="Edge-detector registry name.")
    weights: str | None = Field(None, description="The detector's weights file (learned detectors).")
    t0: float | None = Field(None, ge=0, le=1, description="Initial UCM threshold (None: the dataset's schedule).")
    max_regions: int | None = Field(None, ge=2, description="Region cap (None: the dataset's schedule).")

    @model_validator(mode="after")
    def _check_overseg(self):
        self.settings().schedule(self.dataset)  # an unknown detector or a missing weights file, now
        return self

    def settings(self):
        from usseg_core.overseg import OversegSettings

        return OversegSettings(self.detector, self.weights, self.t0, self.max_regions)


class EvaluateModelSpec(Where):
    """``usseg evaluate --model`` / flow ``evaluate-model``: an existing head, with its own backbone."""

    model: str = Field(description="Head artifact key (a unique prefix is enough).")
    eval_split: str = Field("val", description="Labelled split to evaluate on.")
    eval_resolution: int | None = Field(None, ge=8, description="Override the evaluation protocol's size.")
    run_crf: bool = Field(True, description="Dense CRF refinement rows.")


class ExtractSpec(DataSpec):
    """``usseg extract`` / flow ``extract-features``: dense + pooled features of one split."""

    split: str = Field("train", description="Split to extract.")
    policy: Policy = Field("center_crop", description="center_crop | five_crop | full.")
    resolution: int | None = Field(DEFAULT_RESOLUTION, ge=8, description="Input side (None: full frames "
                                                                         "at their own size).")
    flip: bool = Field(False, description="Horizontally flipped images.")
    batch_size: int = Field(8, ge=1, description="Images per backbone batch.")
    shard_size: int = Field(128, ge=1, description="Items per task and per stored shard (fan-out unit; "
                                                  "usseg_core.features.SHARD_SIZE, docs/results.md "
                                                  "\"Sharded feature stores\").")
    precision: Precision = Field("auto", description="auto (bf16 on CUDA) | fp32 | bf16.")


class RunSettings(DataSpec):
    """What a training + evaluation run and a comparison share."""

    train_split: list[str] = Field(default_factory=lambda: ["train"], description="Training split(s) "
                                   "(labels unused); \"train,val\" is accepted.")
    eval_split: str | None = Field("val", description="Labelled split to evaluate on (None: train only).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="--set key=value: the head's config "
                                      "(bare names: its main section; SECTION.field another) and the input "
                                      "stages' (views.*, overseg.*, knn.*, crops.*).")
    resolution: int = Field(DEFAULT_RESOLUTION, ge=8, description="Training resolution (five-crops, "
                                                                  "view-bank frame).")
    eval_resolution: int | None = Field(None, ge=8, description="Override the evaluation protocol's size.")
    run_crf: bool = Field(True, description="Dense CRF refinement rows.")
    n_clusters: int | None = Field(None, ge=2, description="k-means K (None: the number of classes; more "
                                                           "over-clusters).")
    retrieval_k: int = Field(RETRIEVAL_K, ge=1, description="Segment retrieval: memory segments voting per "
                                                            "test segment (twke18/HSG: 20).")
    retrieval_vote: Vote = Field(RETRIEVAL_VOTES[0], description="Segment retrieval vote: majority (twke18/HSG) | "
                                                         "weighted.")
    retrieval_labels: RetrievalLabels | None = Field(None, description="Segment retrieval's memory labels: "
                                                     "valid-majority (ours) | reference (twke18/HSG); None: the "
                                                     "dataset's protocol (reference on cocostuff27, "
                                                     "cityscapes27, potsdam3).")
    overcluster: Overcluster = Field(DEFAULT_OVERCLUSTER, description="With more clusters than classes: "
                                     "unmatched-wrong | majority | reference-drop (STEGO's).")

    @field_validator("train_split", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("train_split")
    @classmethod
    def _some_split(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one training split")
        return value

    @model_validator(mode="before")
    @classmethod
    def _run_fields_from_sets(cls, data: Any) -> Any:
        """``--set n_clusters=K`` / ``dataset_options=...`` / ``seed=S`` are run fields (the documented
        spellings); they move out of ``overrides``. ``--set on_error`` points to its option."""
        if not isinstance(data, dict) or not isinstance(data.get("overrides"), dict):
            return data
        data, sets = dict(data), dict(data["overrides"])
        if "on_error" in sets:
            raise ConfigError(f"--set on_error={sets['on_error']}: not a config setting; invalid files are "
                              f"handled by the option --on-error fail|skip of every command that reads images "
                              f"(here: --on-error {sets['on_error']})")
        for name in RUN_FIELD_SETS:
            if name in sets:
                _move(data, name, sets.pop(name), cls.model_fields[name].annotation)
        data["overrides"] = sets
        return data

    def data_overrides(self, prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in self.overrides.items() if k.startswith(prefix)}


class RunSpec(RunSettings):
    """One head trained (and evaluated when ``eval_split`` is set): ``usseg run``, flows ``pipeline``,
    ``train-<head>``, ``evaluate-<head>``."""

    head: str = Field("stego", description="Head registry name.")
    seed: int = Field(0, ge=0, description="The run's seed: the head, both k-means, the linear probe.")
    retrieval: bool | None = Field(None, description="Segment-retrieval rows (None: the head's default, on "
                                                     "for hsg).")

    @model_validator(mode="before")
    @classmethod
    def _seed_from_sets(cls, data: Any) -> Any:
        """``--set seed=S`` (or ``<primary section>.seed``) is the run's seed."""
        if not isinstance(data, dict) or not isinstance(data.get("overrides"), dict):
            return data
        sets = dict(data["overrides"])
        keys = [k for k in sets if k == "seed" or (k.count(".") == 1 and k.endswith(".seed")
                                                    and not k.startswith(STAGE_PREFIXES))]
        if not keys:
            return data
        data = dict(data)
        for k in keys:
            _move(data, "seed", sets.pop(k), int, key=k)
        data["overrides"] = sets
        return data

    @model_validator(mode="after")
    def _check_run(self):
        check_run(self)
        return self

    @property
    def splits(self) -> list[str]:
        return list(self.train_split)

    def head_overrides(self) -> dict:
        """The ``--set`` keys of the head's configuration (not those of the input stages)."""
        return {k: v for k, v in self.overrides.items() if not k.startswith(STAGE_PREFIXES)}

    def head_settings(self) -> dict:
        """What the head is built with: :meth:`head_overrides` and the run's seed in its primary section
        (when that section has a seed)."""
        from usseg_core.heads import get_head

        spec = get_head(self.head)
        out = self.head_overrides()
        if "seed" in getattr(dict(spec.sections)[spec.primary], "__dataclass_fields__", {}):
            out[f"{spec.primary}.seed"] = self.seed
        return out

    def views_config(self):
        from usseg_core.viewbank import ViewBankConfig

        return _section(self.data_overrides(VIEWS_PREFIX), VIEWS_PREFIX, ViewBankConfig, "view-bank")

    def overseg_config(self):
        from usseg_core.overseg import OversegSettings

        return _section(self.data_overrides(OVERSEG_PREFIX), OVERSEG_PREFIX, OversegSettings, "oversegmentation")

    def knn_config(self):
        from usseg_core.knn import KnnSettings

        return _section(self.data_overrides(KNN_PREFIX), KNN_PREFIX, KnnSettings, "KNN search")

    def crops_config(self):
        from usseg_core.views import CropSettings

        return _section(self.data_overrides(CROPS_PREFIX), CROPS_PREFIX, CropSettings, "training-crop")


class CompareSpec(RunSettings):
    """Every head x seed under one protocol: ``usseg compare``, ``usseg demo``, flow ``compare``."""

    heads: list[str] = Field(default_factory=list, description="Heads to compare (empty: every registered "
                                                               "head).")
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS), description="Seeds of every head.")
    retrieval: bool = Field(False, description="Segment-retrieval rows for every head (and the raw "
                                               "features), or for none.")

    @model_validator(mode="after")
    def _check_compare(self):
        heads = self.head_names()
        if len(set(heads)) != len(heads) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"heads {heads} and seeds {list(self.seeds)} must not repeat")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        self.runs()  # every head and every routed --set, each run checked as a RunSpec
        return self

    def head_names(self) -> list[str]:
        from usseg_core.heads import get_head, list_heads

        for h in self.heads:
            get_head(h)
        return list(self.heads) or list_heads()

    def runs(self) -> list[RunSpec]:
        """One RunSpec per head x seed, head by head (``--set`` keys routed to the heads that take them)."""
        heads = self.head_names()
        per_head = route_overrides(heads, self.overrides)
        common = self.model_dump(exclude={"heads", "seeds", "overrides"})
        return [RunSpec(**common, head=h, seed=int(s), overrides=per_head[h]) for h in heads for s in self.seeds]


S = TypeVar("S", bound=_Spec)


def build(cls: type[S], **fields: Any) -> S:
    """``cls(**fields)``, with pydantic's type errors turned into one :class:`ConfigError` line."""
    try:
        return cls(**fields)
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """One line for pydantic's first error: the field and what it should be."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "spec"
    return f"{where}={err.get('input')!r}: {err['msg']}"


def route_overrides(heads: list[str], overrides: dict | None) -> dict[str, dict]:
    """Per head, the ``--set`` keys that apply to it.

    ``views.*`` / ``overseg.*`` / ``knn.*`` / ``crops.*`` go to every head (heads that do not use the stage
    ignore them); ``SECTION.field`` to the heads with that section (``stego.steps`` sets STEGO's and OMH's
    length, OMH's primary section being STEGO's); a bare field to the heads whose primary section has it.
    A key that no compared head takes fails before any work, and so does ``seed`` (the comparison sets
    it per run).
    """
    from usseg_core.heads import get_head

    out: dict[str, dict] = {h: {} for h in heads}
    for key, value in (overrides or {}).items():
        if key.startswith(STAGE_PREFIXES):
            for h in heads:
                out[h][key] = value
            continue
        if key.rpartition(".")[2] == "seed":
            raise ConfigError(f"--set {key}: the comparison sets every run's seed; use --seeds")
        takers = []
        for h in heads:
            try:
                get_head(h).split_key(key)
            except ConfigError:
                continue
            takers.append(h)
        if not takers:
            sections = {h: [s for s, _ in get_head(h).sections] for h in heads}
            raise ConfigError(f"--set {key}: no compared head has this field; namespace it by config section "
                              "(e.g. stego.steps, picie.epochs, hsg.epochs); sections: "
                              + "; ".join(f"{h}: {', '.join(s)}" for h, s in sections.items()))
        for h in takers:
            out[h][key] = value
    return out


def check_run(run: RunSpec) -> None:
    """Every registry name, ``--set`` key and cross-field rule of a run (the heavy part of validation)."""
    from usseg_core.datasets.registry import dataset_class
    from usseg_core.heads import get_head

    spec = get_head(run.head)  # "unknown head 'x'; known: ..."
    sections = dict(spec.sections)
    for key, value in run.head_overrides().items():
        section, name = spec.split_key(key)
        check_set_value(key, value, sections[section], name,
                        f"field {name!r} of head {run.head!r} section {section!r}")
    config = spec.config(run.dataset, run.head_settings())
    run.views_config()
    run.overseg_config().schedule(run.dataset)
    knn = run.knn_config()
    run.crops_config().view(dataset_class(run.dataset), run.resolution)
    if "knn" in spec.needs:
        for section, values in config.items():
            wanted = getattr(values, "num_neighbors", None)
            if wanted is not None and wanted > knn.k:
                raise ConfigError(f"--set {section}.num_neighbors={wanted}: positives are drawn from KNN ranks "
                                  f"1..num_neighbors, but the KNN table keeps {knn.k} neighbours (knn.k); use "
                                  f"num_neighbors <= {knn.k} or --set knn.k={wanted}")


def _section(fields: dict, prefix: str, cls: type, what: str):
    """``cls`` built from the ``prefix``-ed overrides; an unknown field fails with the valid names."""
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"--set {prefix}{unknown[0]}: unknown {what} field; valid: "
                          f"{', '.join(prefix + k for k in sorted(known))}")
    for name, value in fields.items():
        check_set_value(prefix + name, value, cls, name)
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--set {prefix}*: {exc}") from exc


def _move(data: dict, name: str, value: Any, hint: Any, key: str | None = None) -> None:
    """Set run field ``name`` from a ``--set`` key (of type ``hint``); a value of another type, or one
    conflicting with an explicit value, is an error naming the key."""
    wanted = _expected(value, hint)
    if wanted is not None:
        shown = value if isinstance(value, str) else json.dumps(value)
        raise ConfigError(f"--set {key or name}={shown}: expected {wanted}")
    given = data.get(name)
    if given is not None and given != value and not (name == "seed" and given == 0):
        raise ConfigError(f"--set {name}={value!r} conflicts with {name}={given!r}")
    data[name] = value


def check_set_value(key: str, value: Any, cls: type, name: str, where: str = "") -> None:
    """Refuse a ``--set`` value whose type does not fit field ``name`` of config dataclass ``cls``, naming the
    key as typed: ``--set steps=abc: expected an integer (field 'steps' of head 'stego' section 'stego')``.

    Values come from the command line parsed as JSON where they parse (``usseg_core.config.parse_set_options``),
    so ``steps=abc`` arrives as the string 'abc'; the field's own checks then only see values of its type."""
    import typing

    hint = typing.get_type_hints(cls).get(name)
    wanted = _expected(value, hint) if hint is not None else None
    if wanted is not None:
        shown = value if isinstance(value, str) else json.dumps(value)
        raise ConfigError(f"--set {key}={shown}: expected {wanted}" + (f" ({where})" if where else ""))


def _expected(value: Any, hint: Any) -> str | None:
    """None when ``value`` (as JSON gives it) fits the type ``hint``, else what was expected, in words."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        wanted = [_expected(value, a) for a in args if a is not type(None)]
        if value is None and type(None) in args or any(w is None for w in wanted):
            return None
        return " or ".join(wanted)
    if origin is Literal:
        return None if value in args else "one of " + ", ".join(map(str, args))
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return _WORDS_OF_LISTS(args)
        items = args[:1] if (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else args
        if origin is tuple and items is args and len(value) != len(args):
            return _WORDS_OF_LISTS(args)
        bad = [v for i, v in enumerate(value) if _expected(v, items[min(i, len(items) - 1)]) is not None]
        return _WORDS_OF_LISTS(args) if bad else None
    checks = {bool: (lambda v: isinstance(v, bool), "true or false"),
              int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
              float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")}
    if hint in checks:
        fits, words = checks[hint]
        return None if fits(value) else words
    return None  # str and other types: the field's own check decides


def _WORDS_OF_LISTS(args: tuple) -> str:
    """``[a,b,c]`` in words: "a list of 3 numbers, e.g. [0.3,0.25,0.3]"."""
    noun = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
    if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
        return f"a list of {noun.get(args[0], 'values')}, e.g. [1,2]"
    kinds = {noun.get(a, "values") for a in args}
    return f"a list of {len(args)} {kinds.pop() if len(kinds) == 1 else 'values'}"

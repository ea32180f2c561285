"""Import published STEGO checkpoints (PyTorch-Lightning ``.ckpt``, e.g. ``cocostuff27_vit_base_5.ckpt``).

A STEGO checkpoint is a ``LitUnsupervisedSegmenter`` ([code:STEGO] ``train_segmentation.py``) saved by
Lightning: ``state_dict`` holds

* ``net.model.*`` — the frozen DINO ViT (``modules.DinoFeaturizer.model``, DINO's own key layout, which is
  timm's: ``blocks.0.attn.qkv.weight``, ...);
* ``net.cluster1.0.*`` — the linear branch of the code head (1x1 conv C -> D), and ``net.cluster2.{0,2}.*``
  — the nonlinear branch (1x1 conv C -> C, ReLU, 1x1 conv C -> D), present when ``projection_type`` is
  ``nonlinear``. The head lives inside ``net`` (the featurizer);
* ``cluster_probe.clusters`` — (n_classes + extra_clusters, D) centroids of the cluster probe;
* ``linear_probe.{weight,bias}`` — the supervised 1x1 conv D -> n_classes;
* training-only tensors we drop: ``train_cluster_probe``, ``decoder``, loss modules.

``hyper_parameters`` = ``{"n_classes": ..., "cfg": <OmegaConf DictConfig>}``. It is read with
``torch.load(weights_only=True)``; classes the file names that torch does not allow (OmegaConf containers
and nodes, Lightning callback classes, ``typing.Any``) are replaced by an inert stand-in
(:class:`Opaque`) that only records the state pickle hands it. No class of the file is ever imported or
instantiated, so loading runs no code from the checkpoint.

Mapping onto usseg (``usseg_core.heads.stego.StegoHead`` and ``heads.probes``):
``cluster1.0`` -> ``linear``, ``cluster2.0`` / ``cluster2.2`` -> ``nonlinear.0`` / ``nonlinear.2``,
``cluster_probe.clusters`` -> ``ClusterProbe.centroids``, ``linear_probe`` -> ``LinearProbe.conv``.
Codes are identical: both compute ``cluster1(f) + cluster2(f)`` in eval mode (Dropout2d off), the cluster
probe is the arg-max of cosine similarity to normalised centroids, and the CRF unary is
``log_softmax(2 cos)`` in both. Differences, all outside the head:

* ``projection_type: linear`` checkpoints (no ``cluster2``) get a nonlinear branch whose last conv is all
  zeros, so it adds exactly 0;
* ``dino_feat_type: KK`` (attention keys as features) is not supported: usseg's ViT gives the last block's
  tokens after the final LayerNorm, which is the reference's ``feat`` (its default);
* positional embeddings at a non-square or non-224 input are resampled by timm (bicubic to the exact
  grid) where DINO interpolates with a ``+0.1`` scale-factor trick: features agree exactly at 224x224,
  and up to interpolation rounding elsewhere; timm's fused attention differs from DINO's explicit softmax
  by float rounding only;
* usseg evaluates codes of *cached* features: stored as float16, extracted in bf16 on CUDA by default
  (``precision`` auto), where the reference runs the ViT and head in fp32 per batch — rounding-level
  differences in codes;
* the reference's feature normalisation and ``pointwise`` centering belong to the training loss only
  (``ContrastiveCorrelationLoss``), as in usseg: they do not touch codes, so an imported head needs neither.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from usseg_core.errors import InputError
from usseg_core.store import file_sha256

BACKBONE_PREFIX = "net.model."  # DinoFeaturizer.model
# StegoHead key <- reference key
HEAD_KEYS = {
    "linear.weight": "net.cluster1.0.weight",
    "linear.bias": "net.cluster1.0.bias",
    "nonlinear.0.weight": "net.cluster2.0.weight",
    "nonlinear.0.bias": "net.cluster2.0.bias",
    "nonlinear.2.weight": "net.cluster2.2.weight",
    "nonlinear.2.bias": "net.cluster2.2.bias",
}
CLUSTERS_KEY = "cluster_probe.clusters"
LINEAR_KEYS = {"conv.weight": "linear_probe.weight", "conv.bias": "linear_probe.bias"}
# ViT width -> the reference's model_type (DinoFeaturizer: 384 for vit_small, else 768)
MODEL_TYPES = {384: "vit_small", 768: "vit_base"}
# the reference's dataset_name -> usseg's dataset registry name
DATASETS = {"cocostuff27": "cocostuff27", "cityscapes": "cityscapes27", "potsdam": "potsdam3",
            "potsdamraw": "potsdam3"}
_DINO_IGNORED = ("head.weight", "head.bias")  # a classifier (num_classes=0 in the reference: absent)


class Opaque:
    """Inert stand-in for a class a checkpoint names but torch's safe loader does not allow.

    It stores what pickle passes (constructor arguments, then the state) and does nothing else, so a
    checkpoint's hyper-parameters can be read without importing OmegaConf or Lightning.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stand_in(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (Opaque,), {"qualname": qualname})


@dataclass
class StegoCheckpoint:
    """A STEGO checkpoint converted to usseg's layouts (all tensors float32 on CPU).

    Attributes:
        path, sha256: the file and its content hash (the imported artifacts' identity).
        backbone: usseg backbone registry name, e.g. ``vit_base_patch8_224.dino``.
        backbone_state: the DINO ViT state dict in timm/DINO layout (what ``--weights`` loads).
        head_state: ``StegoHead`` state dict; in_dim C, code_dim D.
        centroids: (K, D) cluster-probe centroids, K = n_classes + extra_clusters.
        linear_state: ``LinearProbe`` state dict (conv (n_classes, D, 1, 1) + bias), None if absent.
        n_classes: classes of the linear probe (= the dataset's).
        projection: ``nonlinear`` or ``linear`` (the reference's projection_type).
        hparams: the reference's ``cfg`` as plain JSON-able values ({} when the file has none).
        dataset: usseg dataset name of cfg.dataset_name (None when unknown).
        global_step: training step of the checkpoint, when recorded.
    """

    path: Path
    sha256: str
    backbone: str
    backbone_state: dict[str, Tensor]
    head_state: dict[str, Tensor]
    centroids: Tensor
    linear_state: dict[str, Tensor] | None
    in_dim: int
    code_dim: int
    n_classes: int
    projection: str
    hparams: dict = field(default_factory=dict)
    dataset: str | None = None
    global_step: int | None = None

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])


def read_lightning_checkpoint(path: str | Path) -> dict:
    """The checkpoint's top-level dict, loaded with ``torch.load(weights_only=True)`` only.

    Globals torch refuses are listed first (``get_unsafe_globals_in_checkpoint``, which reads the pickle
    without running it) and each is mapped onto an :class:`Opaque` stand-in; modules torch blocks outright
    (``os``, ``sys``, ...) still fail.

    Raises:
        InputError: naming the file, when it is missing or cannot be read this way.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - not a zip checkpoint, truncated file, ...
        raise InputError(path, f"not a torch zip checkpoint ({_first_line(exc)})") from exc
    allowed: list = [argparse.Namespace]
    for name in unsafe:
        # Lightning's AttributeDict (hparams, a dict subclass) is filled by SETITEMS, which torch's loader
        # allows on plain dicts only: it is read as a plain dict
        allowed.append((dict, name) if name.rsplit(".", 1)[-1] == "AttributeDict" else (_stand_in(name), name))
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, ...
        raise InputError(path, f"refused or unreadable by torch.load(weights_only=True): {_first_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise InputError(path, f"holds a {type(obj).__name__}, not a Lightning checkpoint dict")
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plain(obj: Any, _depth: int = 0) -> Any:
    """JSON-able form of loaded hyper-parameters: OmegaConf containers/nodes (as :class:`Opaque`) become
    dicts, lists and their values; other stand-ins become their class name."""
    if _depth > 50:
        return None
    if isinstance(obj, Opaque):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:  # DictConfig / ListConfig
            return plain(state["_content"], _depth + 1)
        if "_val" in state:  # a ValueNode
            return plain(state["_val"], _depth + 1)
        return obj.qualname
    if isinstance(obj, dict):
        return {str(k if not isinstance(k, Opaque) else k.qualname): plain(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, _depth + 1) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist() if obj.numel() == 1 else f"tensor{tuple(obj.shape)}"
    if isinstance(obj, type) and issubclass(obj, Opaque):
        return obj.qualname
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":
        return plain(vars(obj), _depth + 1)
    return str(obj)


def _hparams(ckpt: dict) -> tuple[dict, int | None]:
    """(cfg as plain dict, hyper_parameters.n_classes) — empty / None when the file has no hyper-parameters."""
    hp = plain(ckpt.get("hyper_parameters") or {})
    if not isinstance(hp, dict):
        return {}, None
    cfg = hp.get("cfg") if isinstance(hp.get("cfg"), dict) else {}
    n = hp.get("n_classes")
    return cfg, n if isinstance(n, int) and not isinstance(n, bool) else None


def _tensor(sd: dict, key: str, path: Path) -> Tensor:
    t = sd.get(key)
    if not isinstance(t, Tensor):
        raise InputError(path, f"not a STEGO checkpoint: state_dict has no tensor {key!r}")
    return t.detach().to("cpu", torch.float32).contiguous()


def _check_shape(t: Tensor, shape: tuple, key: str, path: Path) -> None:
    if tuple(t.shape) != tuple(shape):
        raise InputError(path, f"shape mismatch: {key} is {tuple(t.shape)}, expected {tuple(shape)}")


def parse_stego_checkpoint(path: str | Path, sha256: str | None = None) -> StegoCheckpoint:
    """Read, validate and convert a STEGO Lightning checkpoint (``sha256``: the file's, when already known).

    Raises:
        InputError: one line naming the file and the problem (not a STEGO checkpoint, a missing key, a
            shape mismatch, an unsupported configuration).
        WeightsError: one line naming the file, when the ``net.model.*`` tensors do not fit the DINO ViT.
    """
    path = Path(path)
    ckpt = read_lightning_checkpoint(path)
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict) or not any(isinstance(k, str) and k.startswith(BACKBONE_PREFIX) for k in sd):
        raise InputError(path, "not a STEGO checkpoint: no 'state_dict' with DINO featurizer keys 'net.model.*' "
                               "(expected a LitUnsupervisedSegmenter .ckpt of mhamilton723/STEGO)")
    cfg, hp_classes = _hparams(ckpt)
    if cfg.get("arch", "dino") != "dino":
        raise InputError(path, f"unsupported STEGO arch {cfg.get('arch')!r}: only 'dino' featurizers import")
    if cfg.get("dino_feat_type", "feat") != "feat":
        raise InputError(path, f"unsupported dino_feat_type {cfg.get('dino_feat_type')!r}: usseg's ViT gives "
                               "'feat' (last-block tokens after the final LayerNorm)")
    backbone_state = {k[len(BACKBONE_PREFIX):]: v.detach().to("cpu", torch.float32).contiguous()
                      for k, v in sd.items() if isinstance(k, str) and k.startswith(BACKBONE_PREFIX)
                      and isinstance(v, Tensor) and k[len(BACKBONE_PREFIX):] not in _DINO_IGNORED}
    backbone = _backbone_name(backbone_state, cfg, path)
    _check_backbone_fits(backbone, backbone_state, path)

    w1 = _tensor(sd, HEAD_KEYS["linear.weight"], path)  # (D, C, 1, 1)
    if w1.ndim != 4 or w1.shape[2:] != (1, 1):
        raise InputError(path, f"shape mismatch: {HEAD_KEYS['linear.weight']} is {tuple(w1.shape)}, "
                               "expected a 1x1 conv (D, C, 1, 1)")
    code_dim, in_dim = int(w1.shape[0]), int(w1.shape[1])
    width = int(backbone_state["patch_embed.proj.weight"].shape[0])
    if in_dim != width:
        raise InputError(path, f"shape mismatch: code head takes {in_dim} channels but the ViT gives {width}")
    has_nonlinear = any(k.startswith("net.cluster2.") for k in sd)
    projection = "nonlinear" if has_nonlinear else "linear"
    if cfg.get("projection_type", projection) not in (projection,):
        raise InputError(path, f"projection_type {cfg.get('projection_type')!r} in hyper_parameters but the "
                               f"state_dict holds a {projection} head")
    shapes = {"linear.weight": (code_dim, in_dim, 1, 1), "linear.bias": (code_dim,),
              "nonlinear.0.weight": (in_dim, in_dim, 1, 1), "nonlinear.0.bias": (in_dim,),
              "nonlinear.2.weight": (code_dim, in_dim, 1, 1), "nonlinear.2.bias": (code_dim,)}
    head_state = {}
    for ours, shape in shapes.items():
        if ours.startswith("nonlinear") and not has_nonlinear:
            head_state[ours] = torch.zeros(shape)  # projection_type linear: a branch that adds exactly 0
            continue
        t = _tensor(sd, HEAD_KEYS[ours], path)
        _check_shape(t, shape, HEAD_KEYS[ours], path)
        head_state[ours] = t

    centroids = _tensor(sd, CLUSTERS_KEY, path)
    if centroids.ndim != 2 or centroids.shape[1] != code_dim:
        raise InputError(path, f"shape mismatch: {CLUSTERS_KEY} is {tuple(centroids.shape)}, expected (K, {code_dim})")
    linear_state, n_classes = None, hp_classes
    if all(k in sd for k in LINEAR_KEYS.values()):
        lw, lb = (_tensor(sd, LINEAR_KEYS[k], path) for k in ("conv.weight", "conv.bias"))
        if lw.ndim != 4 or tuple(lw.shape[1:]) != (code_dim, 1, 1) or tuple(lb.shape) != (lw.shape[0],):
            raise InputError(path, f"shape mismatch: linear_probe.weight/bias are {tuple(lw.shape)}/{tuple(lb.shape)},"
                                   f" expected (n_classes, {code_dim}, 1, 1)/(n_classes,)")
        linear_state, n_classes = {"conv.weight": lw, "conv.bias": lb}, int(lw.shape[0])
    if n_classes is None:
        n_classes = centroids.shape[0] - int(cfg.get("extra_clusters", 0) or 0)
    if hp_classes is not None and hp_classes != n_classes:
        raise InputError(path, f"shape mismatch: hyper_parameters n_classes {hp_classes} but linear_probe has "
                               f"{n_classes} classes")
    extra = cfg.get("extra_clusters")
    if isinstance(extra, int) and centroids.shape[0] != n_classes + extra:
        raise InputError(path, f"shape mismatch: {CLUSTERS_KEY} has {centroids.shape[0]} rows, expected "
                               f"n_classes + extra_clusters = {n_classes + extra}")
    step = ckpt.get("global_step")
    return StegoCheckpoint(
        path=path, sha256=sha256 or file_sha256(path), backbone=backbone, backbone_state=backbone_state,
        head_state=head_state, centroids=centroids, linear_state=linear_state, in_dim=in_dim,
        code_dim=code_dim, n_classes=int(n_classes), projection=projection, hparams=cfg,
        dataset=DATASETS.get(str(cfg.get("dataset_name"))),
        global_step=int(step) if isinstance(step, int) and not isinstance(step, bool) else None)


def _check_backbone_fits(name: str, state: dict[str, Tensor], path: Path) -> None:
    """Raise WeightsError naming ``path`` unless the ViT tensors fit ``name`` exactly (as ``--weights`` will)."""
    import timm

    from usseg_core.backbones.vit import adapt_vit_state_dict
    from usseg_core.backbones.weights import check_state_dict_fits

    with torch.device("meta"):  # shapes only: no init, no memory
        model = timm.create_model(name, pretrained=False, dynamic_img_size=True, num_classes=0)
    check_state_dict_fits(model, adapt_vit_state_dict(state, model), f"{path} (net.model.*)", name)


def _backbone_name(state: dict[str, Tensor], cfg: dict, path: Path) -> str:
    """``vit_<small|base>_patch<p>_224.dino`` from the ViT's shapes, checked against the hyper-parameters."""
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 4 or proj.shape[2] != proj.shape[3]:
        raise InputError(path, "not a STEGO checkpoint: no square patch embedding net.model.patch_embed.proj.weight")
    width, patch = int(proj.shape[0]), int(proj.shape[2])
    model_type = MODEL_TYPES.get(width)
    if model_type is None:
        raise InputError(path, f"unsupported ViT width {width}: expected 384 (vit_small) or 768 (vit_base)")
    for key, found in (("model_type", model_type), ("dino_patch_size", patch)):
        if key in cfg and cfg[key] != found:
            raise InputError(path, f"shape mismatch: hyper_parameters {key}={cfg[key]!r} but the weights are "
                                   f"{model_type} with patch {patch}")
    if patch not in (8, 16):
        raise InputError(path, f"unsupported DINO patch size {patch}: expected 8 or 16")
    pos = state.get("pos_embed")
    if pos is not None and int(round(math.sqrt(pos.shape[1] - 1))) ** 2 != pos.shape[1] - 1:
        raise InputError(path, f"shape mismatch: net.model.pos_embed {tuple(pos.shape)} is not a square grid + CLS")
    return f"{model_type}_patch{patch}_224.dino"


# StegoConfig field <- the reference's cfg key (train_config.yml): how the imported head was trained
_CONFIG_KEYS = {"lr": "lr", "batch_size": "batch_size", "steps": "max_steps", "feature_samples": "feature_samples",
                "neg_samples": "neg_samples", "num_neighbors": "num_neighbors", "pointwise": "pointwise",
                "zero_clamp": "zero_clamp"}


def stego_config(ck: StegoCheckpoint):
    """The ``StegoConfig`` the checkpoint was trained with, as far as its hyper-parameters say (code dim from
    the weights; loss weights and shifts in (self, knn, random) = (pos_intra, pos_inter, neg_inter) order);
    fields the file lacks, or holds in a form StegoConfig refuses, keep their defaults."""
    from usseg_core.errors import ConfigError
    from usseg_core.heads.stego import StegoConfig

    cfg = ck.hparams
    values: dict[str, Any] = {k: cfg[r] for k, r in _CONFIG_KEYS.items() if r in cfg}
    for ours, suffix in (("weights", "weight"), ("shifts", "shift")):
        triple = [cfg.get(f"{t}_{suffix}") for t in ("pos_intra", "pos_inter", "neg_inter")]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in triple):
            values[ours] = tuple(float(v) for v in triple)
    try:
        return StegoConfig(dim=ck.code_dim, **values)
    except (ConfigError, TypeError, ValueError):
        return StegoConfig(dim=ck.code_dim)

"""Reading, unwrapping, fingerprinting and strictly loading backbone weights.

Weights never go through a full pickle: ``.pth/.pt/.bin`` files are read with
``torch.load(weights_only=True)`` and ``.safetensors`` with safetensors, so a checkpoint cannot run
code on load (docs/architecture.md, Contracts/Backbone). Every problem raises :class:`WeightsError`
naming the file, so the message alone tells the user what to fix.
"""
from __future__ import annotations

import argparse
import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

from usseg_core.errors import WeightsError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"

# Containers that training scripts wrap state dicts in, tried in this order. DINO checkpoints hold
# both "teacher" and "student"; DINO's own evaluation code reads the teacher
# (eval_linear.py `--checkpoint_key teacher`), so the teacher wins.
CONTAINER_KEYS = ("state_dict", "model", "teacher", "student")
# Prefixes left by DistributedDataParallel ("module.") and by DINO's MultiCropWrapper ("backbone.").
DDP_PREFIX = "module."
BACKBONE_PREFIX = "backbone."

_MAX_LISTED = 12  # keys listed per category in error messages; the count is always given


def fingerprint_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex digest of a state dict, independent of key order and device.

    Hashes, for each key in sorted order: the key, the dtype, the shape and the raw bytes of the
    tensor (contiguous, on CPU). Two state dicts share a fingerprint iff they hold bit-identical
    tensors under the same names.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(key.encode("utf-8"))
        digest.update(str(tensor.dtype).encode("ascii"))
        digest.update(str(tuple(tensor.shape)).encode("ascii"))
        # view as bytes: works for every dtype (bfloat16 included, which numpy lacks)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` state dict on CPU.

    ``.safetensors`` is read with safetensors; ``.pth/.pt/.bin/.ckpt`` with
    ``torch.load(weights_only=True, map_location="cpu")`` (``argparse.Namespace`` is allowed so
    that DINO training checkpoints, which store their ``args``, can be read; every other
    non-tensor object is refused). Common containers (``state_dict``, ``model``, ``teacher``,
    ``student``) are unwrapped and ``module.``/``backbone.`` prefixes stripped; when some keys
    carry ``backbone.`` (a DINO teacher also holds its projection ``head.*``), only those are kept.

    Raises:
        WeightsError: naming the file, when it is missing, of an unknown type, unreadable, refused
            by the safe loader, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        raw = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        raw = _read_torch_pickle(path)
    else:
        raise WeightsError(
            f"{path}: unknown weights file type {suffix!r}; expected {SAFETENSORS_SUFFIX} or one of "
            f"{', '.join(PICKLE_SUFFIXES)}"
        )
    return _strip_prefixes(_unwrap(raw, path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path}: cannot read safetensors file ({exc})") from exc


def _read_torch_pickle(path: Path) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: refused or unreadable by torch.load(weights_only=True): {first_line}. "
            "Only tensors and plain containers are accepted; re-save the file as a plain state "
            "dict (torch.save(model.state_dict(), ...)) or as .safetensors"
        ) from exc


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Descend through container dicts until a flat ``{str: Tensor}`` mapping is reached."""
    while isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            if not all(isinstance(k, str) for k in obj):
                raise WeightsError(f"{path}: state dict has non-string keys")
            return dict(obj)
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            non_tensor = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise WeightsError(
                f"{path}: no state dict found: expected a mapping of tensors or one of the "
                f"containers {list(CONTAINER_KEYS)}; non-tensor entries: {non_tensor[:_MAX_LISTED]}"
            )
        obj = obj[inner]
    raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state_dict = {k.removeprefix(DDP_PREFIX): v for k, v in state_dict.items()}
    if any(k.startswith(BACKBONE_PREFIX) for k in state_dict):
        state_dict = {
            k.removeprefix(BACKBONE_PREFIX): v
            for k, v in state_dict.items()
            if k.startswith(BACKBONE_PREFIX)
        }
    return state_dict


def check_state_dict_fits(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path, name: str
) -> None:
    """Raise WeightsError listing missing/unexpected keys and shape mismatches, if any.

    Args:
        model: the module the weights are meant for.
        state_dict: weights already adapted to the model's key layout.
        source: file (or hub name) the weights came from, named in the message.
        name: registry name of the backbone, named in the message.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:_MAX_LISTED]) + (", ..." if len(items) > _MAX_LISTED else "")
            problems.append(f"{len(items)} {label}: [{shown}]")
    if problems:
        raise WeightsError(f"{source}: weights do not fit backbone {name!r}: " + "; ".join(problems))


def load_strict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path, name: str
) -> None:
    """Check that ``state_dict`` fits ``model`` exactly, then load it.

    ``model`` may live on the meta device (built without paying for a random init that the load
    overwrites anyway): its tensors are then replaced by the file's, cast to the model's dtypes.
    """
    check_state_dict_fits(model, state_dict, source, name)
    expected = model.state_dict()
    on_meta = any(t.is_meta for t in expected.values())
    if not on_meta:
        model.load_state_dict(dict(state_dict), strict=True)  # copy_ casts to the model's dtypes
        return
    cast = {k: v.to(dtype=expected[k].dtype).contiguous() for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    _compute_nonpersistent_buffers(model, source, name)


def _compute_nonpersistent_buffers(model: torch.nn.Module, source: str | Path, name: str) -> None:
    """Materialise the buffers a state dict does not hold (DINOv3's RoPE periods) by re-running their
    module's ``reset_parameters`` — only on modules without parameters, so no loaded weight is reset."""
    owners = {}
    for full, tensor in model.named_buffers():
        if tensor.is_meta:
            path, _, buffer = full.rpartition(".")
            owners.setdefault(path, []).append(buffer)
    for path, buffers in owners.items():
        module = model.get_submodule(path)
        if next(module.parameters(recurse=False), None) is not None or not hasattr(module, "reset_parameters"):
            raise RuntimeError(f"{name}: buffers {buffers} of {path or 'the model'} left unmaterialised after "
                               f"loading {source}")
        for buffer in buffers:
            meta = getattr(module, buffer)
            module.register_buffer(buffer, torch.empty(meta.shape, dtype=meta.dtype), persistent=False)
        module.reset_parameters()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:  # a tensor the state dict cannot fill: a bug in the builder, not the file
        raise RuntimeError(f"{name}: tensors left unmaterialised after loading {source}: {leftover}")


def map_state_dict_by_order(
    source_sd: Mapping[str, torch.Tensor],
    target_sd: Mapping[str, torch.Tensor],
    source: str | Path,
    name: str,
) -> dict[str, torch.Tensor]:
    """Rename ``source_sd`` onto ``target_sd``'s keys by position, checking every shape.

    For checkpoints whose layout matches a model one-to-one in order but under other names
    (e.g. the ``_conv_stem/_blocks`` EfficientNet family onto timm's ``conv_stem/blocks``).

    Raises:
        WeightsError: naming the file when the counts differ or any pair's shapes differ.
    """
    if len(source_sd) != len(target_sd):
        raise WeightsError(
            f"{source}: {len(source_sd)} tensors, but backbone {name!r} has {len(target_sd)}; "
            "cannot map the layout by order"
        )
    mapped: dict[str, torch.Tensor] = {}
    bad = []
    for (src_key, tensor), (dst_key, ref) in zip(source_sd.items(), target_sd.items()):
        if tensor.shape != ref.shape:
            bad.append(f"{src_key} {tuple(tensor.shape)} -> {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    if bad:
        shown = ", ".join(bad[:_MAX_LISTED]) + (", ..." if len(bad) > _MAX_LISTED else "")
        raise WeightsError(
            f"{source}: layout does not map by order onto backbone {name!r}: "
            f"{len(bad)} shape mismatches: [{shown}]"
        )
    return mapped

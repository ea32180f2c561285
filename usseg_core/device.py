"""One device and precision policy for every stage (docs/architecture.md, "Devices and precision").

``resolve_device`` turns the user's device string into a validated ``torch.device`` and
``resolve_precision`` turns the user's precision into the one the work will run at. Both are called
once, where the work is planned (the flow host), and their *resolved* values travel to the artifact
key and to every shard or task. A worker never re-resolves ``"auto"`` precision: a shard runs at the
precision its key names, whatever device the worker found, so a key always names the precision that
produced its values (a CPU flow host with GPU Dask workers stores fp32 features under an fp32 key;
pass ``--precision bf16`` to get bf16 there).

It also says which GPUs a local Dask cluster pins its workers to (:func:`gpu_ids`), how work that needs
a GPU is marked (:data:`GPU_TAG`, :data:`GPU_RESOURCE`) and how an artifact's metadata names the device
that computed it (:func:`device_label`); docs/architecture.md, "Orchestration".
"""
from __future__ import annotations

import contextlib
import os
import re

import torch

from usseg_core.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
# Work that needs a GPU (extraction, view bank, head training, codes, evaluation forward) carries this
# Prefect tag on its task; a Dask runner whose workers offer the resource GPU_RESOURCE runs it only there.
GPU_TAG = "gpu"
GPU_RESOURCE = "GPU"
GPUS_ENV = "USSEG_GPUS"
_GPU_ID = re.compile(r"^[A-Za-z0-9_/-]+$")  # an index, GPU-<uuid> or MIG-<uuid>, as CUDA_VISIBLE_DEVICES takes


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; otherwise the named device, validated.

    ``"cuda:1"``-style indices are kept and checked against the visible device count.

    Raises:
        ConfigError: for an unparseable string, or a CUDA device this machine does not have.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device {device!r}: not a valid torch device ({exc})") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            pinned = (f" (CUDA_VISIBLE_DEVICES={visible}: on a Dask worker pinned to one GPU, use 'cuda' or 'auto')"
                      if visible is not None else "")
            raise ConfigError(f"device {str(device)!r}: this process sees {torch.cuda.device_count()} CUDA "
                              f"device(s){pinned}")
    elif resolved.type not in ("cpu", "mps"):
        raise ConfigError(f"device {str(device)!r}: usseg runs on cpu or cuda devices")
    return resolved


def resolve_precision(precision: str, device: str | torch.device = "auto") -> str:
    """The precision the backbone runs at: ``"auto"`` -> bf16 on a CUDA device, fp32 elsewhere.

    ``device`` is resolved with :func:`resolve_device` (so ``"cuda:1"`` counts as CUDA). An explicit
    ``"fp32"`` / ``"bf16"`` is returned as is, on any device.
    """
    if precision == "auto":
        return "bf16" if resolve_device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} unknown; choose auto, fp32 or bf16")
    return precision


def host_batch(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An empty float32 CPU batch to read into: in pinned memory when the work runs on CUDA."""
    return torch.empty(shape, dtype=torch.float32, pin_memory=device.type == "cuda")


def pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` in pinned memory when the work runs on CUDA (and ``t`` is not already), else ``t``."""
    return t.pin_memory() if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned() else t


def to_device(x, device: torch.device) -> torch.Tensor:
    """A host array or tensor on ``device``: from pinned memory with a non-blocking copy on CUDA (a
    no-op for a CPU tensor on the CPU)."""
    t = torch.from_numpy(x) if not isinstance(x, torch.Tensor) else x
    return pinned(t, device).to(device, non_blocking=True)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved (or ``"auto"``) precision on ``device``."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def visible_devices() -> list[str]:
    """The entries of ``$CUDA_VISIBLE_DEVICES`` in this process ([] when it is unset or empty)."""
    return [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]


def gpu_ids() -> list[str]:
    """The GPUs a local Dask cluster (``--runner dask[:N]``) pins its workers to, one each, as ids that
    ``CUDA_VISIBLE_DEVICES`` takes.

    ``$USSEG_GPUS`` when set: a comma-separated list of ids (``0,1``, ``GPU-<uuid>``), or ``none`` (no
    pinning: the workers of a CPU machine). Otherwise this process's CUDA devices: the entries of its
    ``$CUDA_VISIBLE_DEVICES`` when set, else ``0 .. count-1``; none without CUDA.

    Raises:
        ConfigError: for a malformed or repeated id, or an index this machine does not have.
    """
    raw = os.environ.get(GPUS_ENV, "").strip()
    if not raw:
        if not torch.cuda.is_available():
            return []
        count = torch.cuda.device_count()
        return visible_devices()[:count] or [str(i) for i in range(count)]
    if raw.lower() == "none":
        return []
    ids = [v.strip() for v in raw.split(",")]
    bad = [v for v in ids if not _GPU_ID.match(v)]
    if bad or len(set(ids)) != len(ids):
        raise ConfigError(f"${GPUS_ENV}={raw!r}: " + (f"{bad[0]!r} is not a GPU id" if bad else "a GPU is named twice")
                          + "; use ids as CUDA_VISIBLE_DEVICES takes them (0,1 or GPU-<uuid>), or 'none'")
    if torch.cuda.is_available() and "CUDA_VISIBLE_DEVICES" not in os.environ:
        count = torch.cuda.device_count()
        missing = [v for v in ids if v.isdigit() and int(v) >= count]
        if missing:
            raise ConfigError(f"${GPUS_ENV}={raw!r}: GPU {missing[0]} does not exist; this machine has {count}")
    return ids


def device_label(device: torch.device) -> str:
    """The device that computed something, as an artifact's metadata records it: ``cpu``,
    ``cuda:0 (NVIDIA H100 80GB HBM3)``, and where ``$CUDA_VISIBLE_DEVICES`` renumbers the GPUs (a Dask
    worker pinned to one) the machine's GPU too: ``cuda:0 = GPU 3 (...)``. A CPU device in a pinned
    process names its pinning: ``cpu (CUDA_VISIBLE_DEVICES=3)``."""
    visible = visible_devices()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        physical = f" = GPU {visible[index]}" if index < len(visible) else ""
        return f"cuda:{index}{physical} ({torch.cuda.get_device_name(index)})"
    return f"{device.type} (CUDA_VISIBLE_DEVICES={','.join(visible)})" if visible else device.type

"""One device and precision policy for every stage (docs/architecture.md, "Devices and precision").

``resolve_device`` turns the user's device string into a validated ``torch.device`` and
``resolve_precision`` turns the user's precision into the one the work will run at. Both are called
once, where the work is planned (the flow host), and their *resolved* values travel to the artifact
key and to every shard or task. A worker never re-resolves ``"auto"`` precision: a shard runs at the
precision its key names, whatever device the worker found, so a key always names the precision that
produced its values (a CPU flow host with GPU Dask workers stores fp32 features under an fp32 key;
pass ``--precision bf16`` to get bf16 there).
"""
from __future__ import annotations

import contextlib

import torch

from usseg_core.errors import ConfigError

PRECISIONS = ("fp32", "bf16")


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
            raise ConfigError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
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

"""Pretrained weights from the timm / Hugging Face hub, failing fast and clearly when offline.

Used only when no local weights file is given (docs/architecture.md, Contracts/Backbone). Without
network, huggingface_hub retries for about a minute before giving up; a DNS look-up tells us in
milliseconds that the hub cannot be reached, so we then read only the local hub cache.
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import timm
import torch

from usseg_core.errors import WeightsError

HUB_HOST = "huggingface.co"
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def create_pretrained(name: str, **timm_kwargs: object) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=True, **timm_kwargs)``, or WeightsError with guidance.

    Offline (``HF_HUB_OFFLINE=1`` or the hub host does not resolve) only the local hub cache is
    consulted, so the failure is immediate instead of a minute of retries.
    """
    offline = _offline_requested() or not _hub_resolves()
    try:
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=True, **timm_kwargs)
    except Exception as exc:  # noqa: BLE001 - hub/IO errors come in many types
        where = "offline: not in the local hub cache" if offline else f"download failed: {exc}"
        raise WeightsError(
            f"backbone {name!r}: no weights file given and hub weights unavailable ({where}). "
            f"Provide a local checkpoint with --weights FILE (.pth/.pt/.bin/.safetensors; the key "
            f"layout of its published release, or timm's), or pass --random-weights to run with randomly initialised "
            f"weights (for tests only; features will be meaningless)"
        ) from exc


def _offline_requested() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_resolves() -> bool:
    """True when a proxy is configured or the hub's host name resolves."""
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return True
    try:
        socket.getaddrinfo(HUB_HOST, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Temporarily switch huggingface_hub's offline mode (it reads the env var at import)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous

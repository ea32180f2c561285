"""One device and precision policy (usseg_core/device.py), and the feature key naming the precision used."""
from __future__ import annotations

import contextlib

import pytest
import torch

from usseg_core import device as policy
from usseg_core.errors import ConfigError


@pytest.fixture()
def two_gpus(monkeypatch):
    """A machine that reports two CUDA devices (the device query is mocked; nothing runs on them)."""
    monkeypatch.setattr(policy.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(policy.torch.cuda, "device_count", lambda: 2)


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(policy.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(policy.torch.cuda, "device_count", lambda: 0)


def test_devices_resolve_and_validate(two_gpus):
    assert policy.resolve_device("auto") == torch.device("cuda")
    assert policy.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert policy.resolve_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert policy.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="2 CUDA device"):
        policy.resolve_device("cuda:3")
    with pytest.raises(ConfigError, match="not a valid torch device"):
        policy.resolve_device("gpu0")


def test_cuda_without_cuda_is_a_config_error(no_gpu):
    assert policy.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        policy.resolve_device("cuda:0")


def test_auto_precision_follows_the_resolved_device(two_gpus):
    # "cuda:1" is a CUDA device: the old string test (device == "cuda") called it fp32 while shards ran bf16
    assert policy.resolve_precision("auto", "cuda:1") == "bf16"
    assert policy.resolve_precision("auto", "auto") == "bf16"
    assert policy.resolve_precision("auto", "cpu") == "fp32"
    assert policy.resolve_precision("fp32", "cuda:1") == "fp32"  # explicit wins on any device
    assert policy.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ConfigError, match="choose auto, fp32 or bf16"):
        policy.resolve_precision("fp16", "cpu")


def test_a_resolved_precision_is_what_a_gpu_worker_runs(two_gpus):
    # A CPU flow host resolves "auto" to fp32 and passes "fp32" to its shards: a GPU worker then runs
    # without autocast, so the fp32 key is true; "bf16" turns autocast on, on CPU as on GPU.
    assert isinstance(policy.autocast_for(torch.device("cuda", 1), "fp32"), contextlib.nullcontext)
    bf16 = policy.autocast_for(torch.device("cpu"), "bf16")
    assert isinstance(bf16, torch.autocast) and bf16.fast_dtype == torch.bfloat16


def test_the_feature_key_takes_the_precision_resolved_on_the_host(tmp_path, prefect_harness, no_gpu, monkeypatch):
    """Mixed host/worker: the host (no GPU) plans fp32; every shard receives "fp32", never "auto"."""
    import json

    import tasks.extract as extract_tasks
    from flows.extract import extract_features
    from tests.flows.test_extract_flow import BACKBONE, _images

    seen = []
    real = extract_tasks.extract_into

    def recording(*args, precision, **kwargs):
        seen.append(precision)
        return real(*args, precision=precision, **kwargs)

    monkeypatch.setattr(extract_tasks, "extract_into", recording)
    from usseg_core.spec import ExtractSpec

    out = extract_features(ExtractSpec(dataset="directory", data_root=str(_images(tmp_path, 3)), split="all",
                                       backbone=BACKBONE, random_weights=True, resolution=32,
                                       storage=str(tmp_path / "s"), precision="auto", device="auto"))
    meta = json.loads((tmp_path / "s" / "features" / out["key"] / "meta.json").read_text())
    assert meta["params"]["precision"] == "fp32" and seen and set(seen) == {"fp32"}
    with pytest.raises(ValueError, match="resolved precision"):
        extract_tasks.feature_params(None, None, "auto")

"""Weights files: safe loading, container unwrapping, fingerprints, strict fit checks."""
from __future__ import annotations

import argparse
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file

from usseg_core.backbones import fingerprint_state_dict, load_weights_file
from usseg_core.backbones.weights import check_state_dict_fits, map_state_dict_by_order
from usseg_core.errors import WeightsError


class Payload:
    """An arbitrary object: a safe loader must refuse to unpickle it."""

    def __init__(self) -> None:
        self.value = 1


@pytest.fixture
def sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "cls_token": torch.randn(1, 1, 4, generator=g),
        "blocks.0.norm1.weight": torch.randn(4, generator=g),
        "norm.bias": torch.randn(4, generator=g),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- fingerprint ---------------------------------------------------------------------------------

def test_fingerprint_is_sha256_hex_and_order_independent(sd):
    fp = fingerprint_state_dict(sd)
    assert len(fp) == 64 and int(fp, 16) >= 0
    reversed_sd = OrderedDict(reversed(list(sd.items())))
    assert fingerprint_state_dict(reversed_sd) == fp
    # non-contiguous views hash by value
    transposed = {k: v.t().contiguous().t() if v.ndim == 2 else v for k, v in sd.items()}
    assert fingerprint_state_dict(transposed) == fp


def test_fingerprint_changes_with_one_value_dtype_shape_or_name(sd):
    fp = fingerprint_state_dict(sd)
    one_value = {k: v.clone() for k, v in sd.items()}
    one_value["norm.bias"][2] += 1e-6
    assert fingerprint_state_dict(one_value) != fp
    assert fingerprint_state_dict({**sd, "norm.bias": sd["norm.bias"].double()}) != fp
    assert fingerprint_state_dict({**sd, "norm.bias": sd["norm.bias"].view(2, 2)}) != fp
    renamed = {("norm.weight" if k == "norm.bias" else k): v for k, v in sd.items()}
    assert fingerprint_state_dict(renamed) != fp


def test_fingerprint_handles_bfloat16_and_scalars():
    a = {"w": torch.ones(3, dtype=torch.bfloat16), "n": torch.tensor(5)}
    b = {"w": torch.ones(3, dtype=torch.bfloat16), "n": torch.tensor(6)}
    assert fingerprint_state_dict(a) != fingerprint_state_dict(b)


# ---- load_weights_file ---------------------------------------------------------------------------

def test_pth_and_safetensors_round_trip(sd, tmp_path):
    torch.save(sd, tmp_path / "w.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    assert _same(load_weights_file(tmp_path / "w.pth"), sd)
    assert _same(load_weights_file(tmp_path / "w.safetensors"), sd)


@pytest.mark.parametrize("wrap", [
    lambda s: {"state_dict": s},
    lambda s: {"model": s, "epoch": 3},
    lambda s: {"model": {"module." + k: v for k, v in s.items()}},
    # DINO training checkpoint: teacher and student with "backbone." (and the projection head),
    # args as an argparse.Namespace
    lambda s: {
        "student": {"module.backbone." + k: v + 1 for k, v in s.items()},
        "teacher": {**{"backbone." + k: v for k, v in s.items()}, "head.last_layer.weight": torch.ones(2, 2)},
        "args": argparse.Namespace(arch="vit_small", patch_size=16, lr=[5e-4], out_dim=65536),
        "epoch": 100,
    },
], ids=["state_dict", "model", "ddp", "dino-full"])
def test_containers_and_prefixes_are_unwrapped(sd, tmp_path, wrap):
    torch.save(wrap(sd), tmp_path / "ckpt.pth")
    assert _same(load_weights_file(tmp_path / "ckpt.pth"), sd)


def test_arbitrary_pickled_object_is_refused(sd, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "payload": Payload()}, path)
    with pytest.raises(WeightsError, match="evil.pth.*weights_only"):
        load_weights_file(path)


@pytest.mark.parametrize("name,content,match", [
    ("missing.pth", None, "not found"),
    ("w.npz", b"x", "unknown weights file type"),
    ("corrupt.safetensors", b"\x00garbage", "cannot read safetensors"),
    ("corrupt.pth", b"not a zip", "unreadable"),
])
def test_bad_files_raise_weights_error_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=match) as info:
        load_weights_file(path)
    assert name in str(info.value)


def test_file_without_state_dict_is_rejected(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(WeightsError, match="meta.pth.*no state dict"):
        load_weights_file(tmp_path / "meta.pth")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="list.pth.*not a state dict"):
        load_weights_file(tmp_path / "list.pth")


# ---- fit checks ----------------------------------------------------------------------------------

def test_fit_check_lists_missing_unexpected_and_mismatched():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    weights = {"0.weight": torch.zeros(2, 4), "0.bias": torch.zeros(2), "extra": torch.zeros(1)}
    with pytest.raises(WeightsError) as info:
        check_state_dict_fits(model, weights, "/x/ckpt.pth", "toy")
    msg = str(info.value)
    assert "/x/ckpt.pth" in msg and "'toy'" in msg
    assert "2 missing keys: [1.weight, 1.bias]" in msg
    assert "1 unexpected keys: [extra]" in msg
    assert "0.weight: file (2, 4) vs model (2, 3)" in msg
    check_state_dict_fits(model, model.state_dict(), "ok.pth", "toy")  # a perfect fit passes


def test_map_by_order_renames_and_checks_shapes():
    src = {"_a.weight": torch.ones(2, 3), "_a.bias": torch.zeros(2)}
    dst = {"a.weight": torch.empty(2, 3), "a.bias": torch.empty(2)}
    mapped = map_state_dict_by_order(src, dst, "f.pth", "toy")
    assert list(mapped) == ["a.weight", "a.bias"] and torch.equal(mapped["a.weight"], src["_a.weight"])
    with pytest.raises(WeightsError, match=r"f.pth.*_a.bias \(3,\) -> a.bias \(2,\)"):
        map_state_dict_by_order({**src, "_a.bias": torch.zeros(3)}, dst, "f.pth", "toy")
    with pytest.raises(WeightsError, match="f.pth: 1 tensors"):
        map_state_dict_by_order({"_a.weight": src["_a.weight"]}, dst, "f.pth", "toy")

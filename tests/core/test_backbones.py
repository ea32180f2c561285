"""Backbone registry: dense output shapes, weight layouts, random init, offline hub, EfficientNet weights."""
from __future__ import annotations

import argparse
import functools

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from usseg_core.backbones import (
    Backbone,
    fingerprint_state_dict,
    get_backbone,
    list_backbones,
    resolve_device,
)
from usseg_core.errors import ConfigError, WeightsError

VIT_S16 = "vit_small_patch16_224.dino"
EFFNET = "tf_efficientnet_lite0"
EXPECTED = {  # name: (stride, dim, input_multiple)
    "vit_small_patch8_224.dino": (8, 384, 8),
    "vit_small_patch16_224.dino": (16, 384, 16),
    "vit_base_patch8_224.dino": (8, 768, 8),
    "vit_base_patch16_224.dino": (16, 768, 16),
    "vit_small_patch14_dinov2.lvd142m": (14, 384, 14),
    "vit_base_patch14_dinov2.lvd142m": (14, 768, 14),
    "tf_efficientnet_lite0": (8, 40 + 112 + 320, 32),
}


@functools.lru_cache(maxsize=None)
def _random_small(name: str) -> Backbone:
    """Seed-0 random small backbones, built once per session (ViT-B are built per test, not kept)."""
    return get_backbone(name, random_weights=True, device="cpu", seed=0)


def _random(name: str) -> Backbone:
    if "base" in name:
        return get_backbone(name, random_weights=True, device="cpu")
    return _random_small(name)


@pytest.fixture(scope="module")
def vit_s16() -> Backbone:
    return _random_small(VIT_S16)


@pytest.fixture(scope="module")
def effnet() -> Backbone:
    return get_backbone(EFFNET, device="cpu")


class Payload:
    """An arbitrary picklable object: the safe loader must refuse it."""


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _dense(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return backbone(x)


# ---- registry ------------------------------------------------------------------------------------

def test_registry_lists_every_required_backbone():
    from tests.core.test_backbone_specs import ADDED  # the rows added by the spec table, tested there

    assert sorted([*EXPECTED, *ADDED]) == list_backbones()


def test_unknown_name_is_a_config_error_listing_names():
    with pytest.raises(ConfigError, match="unknown backbone 'vit_huge'.*vit_small_patch8_224.dino"):
        get_backbone("vit_huge", random_weights=True)


def test_weights_and_random_weights_together_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="either"):
        get_backbone(VIT_S16, weights=tmp_path / "w.pth", random_weights=True)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'potato'"):
        resolve_device("potato")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


# ---- dense output shapes -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dense_output_shape_at_two_sizes(name):
    stride, dim, multiple = EXPECTED[name]
    bb = _random(name)
    assert (bb.name, bb.stride, bb.dim, bb.input_multiple) == (name, stride, dim, multiple)
    assert not bb.training and not any(p.requires_grad for p in bb.parameters())
    assert bb.weights_source == "random-init" and bb.fingerprint.startswith("random-init-seed0-")
    # small square and non-square inputs keep every entry (ViT-B/8 included) fast on CPU
    for h, w in [(4 * multiple, 4 * multiple), (3 * multiple, 5 * multiple)]:
        out = _dense(bb, bb.normalize(_images(1, h, w)))
        assert out.shape == (1, dim, h // stride, w // stride)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name,size", [(VIT_S16, (224, 224)), (VIT_S16, (240, 320)), (EFFNET, (224, 320))])
def test_dense_output_shape_at_evaluation_sizes(name, size):
    stride, dim, _ = EXPECTED[name]
    out = _dense(_random(name), _images(1, *size))
    assert out.shape == (1, dim, size[0] // stride, size[1] // stride)


def test_input_not_a_multiple_is_rejected(vit_s16):
    with pytest.raises(ConfigError, match="100x96 is not a multiple of 16"):
        vit_s16(torch.zeros(1, 3, 100, 96))


@pytest.mark.parametrize("name", [VIT_S16, "vit_small_patch14_dinov2.lvd142m"])
def test_vit_dense_equals_normed_last_block_patch_tokens(name):
    """Cross-check against timm's own intermediate-feature path (final norm, prefix tokens dropped)."""
    bb = _random_small(name)
    x = bb.normalize(_images(2, 3 * bb.stride, 5 * bb.stride))
    with torch.inference_mode():
        ref = bb.model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        out = bb(x)
    assert ref.shape == out.shape == (2, bb.dim, 3, 5)
    torch.testing.assert_close(out, ref)


def test_normalize_uses_backbone_statistics(vit_s16, effnet):
    img = torch.full((1, 3, 2, 2), 0.75)
    torch.testing.assert_close(effnet.normalize(img), torch.full((1, 3, 2, 2), 0.5))  # (0.75-0.5)/0.5
    expected = torch.tensor([(0.75 - 0.485) / 0.229, (0.75 - 0.456) / 0.224, (0.75 - 0.406) / 0.225])
    torch.testing.assert_close(vit_s16.normalize(img)[0, :, 1, 1], expected)


# ---- random init ---------------------------------------------------------------------------------

def test_random_init_fingerprint_says_so(vit_s16):
    digest = fingerprint_state_dict(vit_s16.model.state_dict())
    assert vit_s16.fingerprint == f"random-init-seed0-{digest}" and vit_s16.weights_source == "random-init"


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    # EfficientNet-Lite0 is the cheapest architecture to build; ViTs share the same seeded builder
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = get_backbone(EFFNET, random_weights=True, device="cpu", seed=0)
    assert torch.equal(torch.rand(3), before)  # the build did not consume the caller's RNG
    again = get_backbone(EFFNET, random_weights=True, device="cpu", seed=0)
    other = get_backbone(EFFNET, random_weights=True, device="cpu", seed=1)
    assert first.fingerprint == again.fingerprint
    assert other.fingerprint.startswith("random-init-seed1-") and other.fingerprint != first.fingerprint
    x = first.normalize(_images(1, 32, 32))
    torch.testing.assert_close(_dense(first, x), _dense(again, x), rtol=0, atol=0)


# ---- ViT weights files ---------------------------------------------------------------------------

def _layouts(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    """The same ViT-S/16 weights as DINO and timm would store them."""
    return {
        # dino_deitsmall16_pretrain.pth: a plain backbone state dict
        "dino_plain.pth": sd,
        # DINO training checkpoint: teacher/student behind MultiCropWrapper, projection head, args
        "dino_full.pth": {
            "teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                        "head.mlp.0.weight": torch.zeros(8, 384),
                        "head.last_layer.weight_g": torch.ones(8, 1)},
            "student": {f"module.backbone.{k}": v * 0 for k, v in sd.items()},
            "args": argparse.Namespace(arch="vit_small", patch_size=16),
            "epoch": 100,
        },
        # timm layout with a classifier head (ignored: dense features come before it)
        "timm.safetensors": {**sd, "head.weight": torch.zeros(1000, 384), "head.bias": torch.zeros(1000)},
    }


def test_dino_and_timm_layouts_load_identically(vit_s16, tmp_path):
    sd = {k: v.clone() for k, v in vit_s16.model.state_dict().items()}
    x = vit_s16.normalize(_images(2, 48, 64))
    expected = _dense(vit_s16, x)
    for fname, content in _layouts(sd).items():
        path = tmp_path / fname
        save_file(content, str(path)) if fname.endswith(".safetensors") else torch.save(content, path)
        bb = get_backbone(VIT_S16, weights=path, device="cpu")
        assert bb.weights_source == str(path)
        assert bb.fingerprint == fingerprint_state_dict(sd), fname  # sha of the weights, not "random-init"
        assert not any(p.requires_grad for p in bb.parameters()) and not bb.training
        torch.testing.assert_close(_dense(bb, x), expected, rtol=0, atol=0)


def test_wrong_architecture_weights_name_file_and_keys(vit_s16, tmp_path):
    path = tmp_path / "vits16.pth"
    torch.save(vit_s16.model.state_dict(), path)
    # ViT-S/16 weights into ViT-S/8: the patch embedding kernel differs; no silent resampling
    with pytest.raises(WeightsError, match=r"vits16.pth.*patch_embed.proj.weight: file \(384, 3, 16, 16\)"):
        get_backbone("vit_small_patch8_224.dino", weights=path, device="cpu")
    # into ViT-B/16: every width differs
    with pytest.raises(WeightsError, match="vits16.pth.*shape mismatches"):
        get_backbone("vit_base_patch16_224.dino", weights=path, device="cpu")


def test_missing_and_unexpected_keys_name_file_and_keys(vit_s16, tmp_path):
    sd = dict(vit_s16.model.state_dict())
    del sd["norm.weight"]
    sd["blocks.12.norm1.weight"] = torch.ones(384)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError) as info:
        get_backbone(VIT_S16, weights=path, device="cpu")
    msg = str(info.value)
    assert "broken.safetensors" in msg and "1 missing keys: [norm.weight]" in msg
    assert "1 unexpected keys: [blocks.12.norm1.weight]" in msg


def test_pos_embed_of_another_grid_is_resampled(vit_s16, tmp_path):
    sd = dict(vit_s16.model.state_dict())
    small = torch.randn(1, 1 + 7 * 7, 384, generator=torch.Generator().manual_seed(0))  # a 7x7 grid
    path = tmp_path / "grid7.pth"
    torch.save({**sd, "pos_embed": small}, path)
    bb = get_backbone(VIT_S16, weights=path, device="cpu")
    expected = resample_abs_pos_embed(small, new_size=[14, 14], old_size=[7, 7], num_prefix_tokens=1)
    assert bb.model.pos_embed.shape == (1, 197, 384)
    torch.testing.assert_close(bb.model.pos_embed.detach(), expected)
    torch.testing.assert_close(bb.model.pos_embed[:, 0].detach(), small[:, 0])  # CLS position kept
    # a token count that is no square grid cannot be resampled: reported, not guessed
    torch.save({**sd, "pos_embed": torch.zeros(1, 1 + 50, 384)}, path)
    with pytest.raises(WeightsError, match=r"grid7.pth.*pos_embed: file \(1, 51, 384\)"):
        get_backbone(VIT_S16, weights=path, device="cpu")


def test_pickle_with_arbitrary_object_is_refused_by_get_backbone(vit_s16, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": vit_s16.model.state_dict(), "hook": Payload()}, path)
    with pytest.raises(WeightsError, match="evil.pth"):
        get_backbone(VIT_S16, weights=path, device="cpu")


def test_offline_without_file_fails_fast_with_guidance(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    offline_before = huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # an empty hub cache, so a developer's cached download cannot make this pass by accident
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as info:
        get_backbone(VIT_S16, device="cpu")
    msg = str(info.value)
    assert VIT_S16 in msg and "--weights FILE" in msg and "--random-weights" in msg
    assert huggingface_hub.constants.HF_HUB_OFFLINE == offline_before  # offline switch restored


# ---- EfficientNet-Lite0 --------------------------------------------------------------------------

def test_effnet_package_weights_map_fully(effnet):
    from usseg_core.backbones.efficientnet import package_weights_path
    from usseg_core.backbones.weights import load_weights_file

    package_sd = load_weights_file(package_weights_path())
    model_sd = effnet.model.state_dict()
    assert len(package_sd) == len(model_sd) == 296  # every tensor, classifier included
    for (src, a), (dst, b) in zip(package_sd.items(), model_sd.items()):
        assert torch.equal(a, b), (src, dst)
    assert effnet.weights_source == str(package_weights_path())
    assert effnet.fingerprint == fingerprint_state_dict(model_sd) and len(effnet.fingerprint) == 64


# expected ImageNet classes per skimage image; one batch keeps this to a single CPU forward
SKIMAGE_CLASSES = {
    "chelsea": set(range(281, 286)),  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    "coffee": {967, 968, 504},  # espresso / cup / coffee mug
    "rocket": {657, 744, 812},  # missile / projectile / space shuttle
}


def test_effnet_classifies_skimage_images(effnet):
    import skimage.data
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    # timm's own eval preprocessing for this model, with bilinear resizing (mean = std = 0.5)
    config = {**resolve_data_config({}, model=effnet.model), "interpolation": "bilinear"}
    assert config["mean"] == effnet.mean and config["std"] == effnet.std
    transform = create_transform(**config)
    x = torch.stack([transform(Image.fromarray(getattr(skimage.data, n)())) for n in SKIMAGE_CLASSES])
    with torch.inference_mode():
        top1 = effnet.classify(x).argmax(1).tolist()  # (3,)
    for (image, classes), predicted in zip(SKIMAGE_CLASSES.items(), top1):
        assert predicted in classes, (image, predicted)


def test_effnet_dense_is_upsampled_concat_of_stride_8_16_32(effnet):
    x = effnet.normalize(_images(2, 64, 96, seed=1))
    ref_model = timm.create_model(EFFNET, pretrained=False, features_only=True, out_indices=(2, 3, 4))
    ref_model.load_state_dict(
        {k: v for k, v in effnet.model.state_dict().items() if k in ref_model.state_dict()}, strict=True
    )
    with torch.inference_mode():
        s8, s16, s32 = ref_model.eval()(x)
        out = effnet(x)
    assert out.shape == (2, 472, 8, 12)
    up = [F.interpolate(m, size=(8, 12), mode="bilinear", align_corners=False) for m in (s16, s32)]
    torch.testing.assert_close(out, torch.cat([s8, *up], dim=1))


def test_effnet_timm_layout_file_loads_and_bad_shape_names_file(effnet, tmp_path):
    sd = effnet.model.state_dict()
    timm_path = tmp_path / "lite0_timm.safetensors"
    save_file(dict(sd), str(timm_path))
    assert get_backbone(EFFNET, weights=timm_path, device="cpu").fingerprint == effnet.fingerprint

    from usseg_core.backbones.efficientnet import package_weights_path
    from usseg_core.backbones.weights import load_weights_file

    package_sd = load_weights_file(package_weights_path())
    package_sd["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    bad_path = tmp_path / "lite0_bad.pth"
    torch.save(package_sd, bad_path)
    with pytest.raises(WeightsError, match=r"lite0_bad.pth.*_conv_head.weight \(1280, 321, 1, 1\)"):
        get_backbone(EFFNET, weights=bad_path, device="cpu")


def test_effnet_default_weights_are_not_random(effnet):
    rand = _random_small(EFFNET)
    assert not effnet.fingerprint.startswith("random-init")
    x = effnet.normalize(_images(1, 32, 32))
    assert not np.allclose(_dense(effnet, x).numpy(), _dense(rand, x).numpy())

"""The backbone rows (usseg_core/backbones/specs.py), and the cost of a new backbone: DINOv2 with registers and
DINOv3 were added as one row each; here each is built with random weights, and loaded through ``--weights``
from a file in its *published* key layout (facebookresearch/dinov2, facebookresearch/dinov3)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from usseg_core.backbones import fingerprint_state_dict, get_backbone
from usseg_core.backbones.specs import BackboneSpec, backbone_spec, list_backbones, register_backbone
from usseg_core.errors import ConfigError, WeightsError

ADDED = {  # name: (stride, dim, prefix tokens = CLS + registers)
    "vit_small_patch14_reg4_dinov2.lvd142m": (14, 384, 5),
    "vit_base_patch14_reg4_dinov2.lvd142m": (14, 768, 5),
    "vit_small_patch16_dinov3.lvd1689m": (16, 384, 5),
    "vit_base_patch16_dinov3.lvd1689m": (16, 768, 5),
}
SIZES = {14: (28, 42), 16: (32, 48)}  # a 2x3 patch grid: small, non-square


def _images(h: int, w: int) -> torch.Tensor:
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))


def _dense(backbone, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return backbone(backbone.normalize(x))


# ---- the table -------------------------------------------------------------------------------------

def test_the_table_imports_without_torch_and_every_row_is_consistent():
    code = ("import sys; from usseg_core.backbones.specs import backbone_spec, list_backbones; "
            "print([backbone_spec(n).input_multiple for n in list_backbones()], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False"), out.stdout
    for name in list_backbones():
        spec = backbone_spec(name)
        assert spec.name == spec.timm_name == name  # the built-ins are timm names with their tag
        assert spec.timm_model in timm.list_models() and spec.input_multiple % spec.stride == 0


def test_a_bad_row_or_a_second_row_of_a_name_is_refused():
    row = backbone_spec("vit_small_patch16_224.dino")
    with pytest.raises(ConfigError, match="backbone 'vit_small_patch16_224.dino' is already registered"):
        register_backbone(BackboneSpec(**{**row.__dict__, "dim": 1}))
    with pytest.raises(ConfigError, match="unknown weights layout 'mine'"):
        BackboneSpec(**{**row.__dict__, "weights_layout": "mine"})
    with pytest.raises(ConfigError, match="unknown backbone 'vit_huge'; known: "):
        backbone_spec("vit_huge")


# ---- the added rows: published key layouts ---------------------------------------------------------

def _dinov2_published(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm reg4 state dict as facebookresearch/dinov2 stores it (``dinov2_vits14_reg4_pretrain.pth``):
    ``register_tokens``; ``pos_embed`` over [CLS, patches] (timm folds the CLS slot into ``cls_token``);
    the masked-image-modelling ``mask_token``."""
    dim = sd["cls_token"].shape[-1]
    cls_pos = torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(1))
    out = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    return {"cls_token": sd["cls_token"] - cls_pos, "register_tokens": sd["reg_token"],
            "pos_embed": torch.cat([cls_pos, sd["pos_embed"]], dim=1), "mask_token": torch.zeros(1, dim), **out}


def _dinov3_published(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm DINOv3 (Eva) state dict as facebookresearch/dinov3 stores it
    (``dinov3_vits16_pretrain_lvd1689m-*.pth``): ``storage_tokens``, ``ls1/ls2.gamma``, a ``qkv.bias`` with its
    ``bias_mask`` (zero biases, as in the released distilled models), ``rope_embed.periods``, ``mask_token``."""
    dim = sd["cls_token"].shape[-1]
    out = {"storage_tokens": sd["reg_token"], "mask_token": torch.zeros(1, dim),
           "rope_embed.periods": torch.ones(64 // 4)}  # head dim 64 (S and B) / 4
    for key, value in sd.items():
        if key == "reg_token":
            continue
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        out[key] = value
        if key.endswith("attn.qkv.weight"):
            out[key.replace("weight", "bias")] = torch.zeros(3 * dim)
            out[key.replace("weight", "bias_mask")] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    return out


PUBLISHED = {"dinov2-reg": (_dinov2_published, "vision_transformer"), "dinov3": (_dinov3_published, "eva")}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", sorted(ADDED))
def test_added_backbone_random_weights_and_its_published_layout(name, tmp_path, capsys):
    """One build per row (ViT-B costs seconds): the row's features from random weights, then the same weights
    saved in the published layout and loaded through ``--weights`` give the same features."""
    stride, dim, prefix = ADDED[name]
    spec = backbone_spec(name)
    assert (spec.stride, spec.dim, spec.prefix_tokens, spec.input_multiple) == (stride, dim, prefix, stride)
    source = get_backbone(name, random_weights=True, device="cpu")
    assert (source.stride, source.dim, source.input_multiple, source.mean) == (stride, dim, stride, spec.mean)
    h, w = SIZES[stride]
    x = _images(h, w)
    with torch.inference_mode():
        expected = source(source.normalize(x))
        tokens = source.model.forward_features(source.normalize(x))  # (B, prefix + 6, C) after the final norm
    assert tokens.shape == (2, prefix + 6, dim) and expected.shape == (2, dim, h // stride, w // stride)
    # the patch grid is the tokens after CLS and the 4 registers, row-major
    torch.testing.assert_close(expected.flatten(2).transpose(1, 2), tokens[:, prefix:], rtol=0, atol=0)

    to_published, timm_module = PUBLISHED[spec.weights_layout]
    sd = source.model.state_dict()
    published = to_published(sd)
    assert "reg_token" not in published and not any("gamma_" in k for k in published)  # really the other layout
    small = "small" in name  # both file types for both layouts: .safetensors for ViT-S, .pth for ViT-B
    path = tmp_path / ("published.safetensors" if small else "published.pth")
    save_file(published, str(path)) if small else torch.save(published, path)
    loaded = get_backbone(name, weights=path, device="cpu")
    assert loaded.weights_source == str(path) and not loaded.fingerprint.startswith("random-init")
    torch.testing.assert_close(_dense(loaded, x), expected)  # the CLS-slot folding may round in the last bit
    # our adapter reads the layout as timm's own checkpoint filter does
    theirs = getattr(timm.models, timm_module).checkpoint_filter_fn(dict(published), source.model)
    capsys.readouterr()  # timm prints why it skips DINOv3's zero q/v biases
    ours = loaded.model.state_dict()
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], msg=key)
    if small:  # timm's own layout (a state dict saved from timm) loads too, bit-identically
        torch.save(sd, tmp_path / "timm.pth")
        loaded = get_backbone(name, weights=tmp_path / "timm.pth", device="cpu")
        assert loaded.fingerprint == fingerprint_state_dict(sd)
        torch.testing.assert_close(_dense(loaded, x), expected, rtol=0, atol=0)


@pytest.mark.timeout(60)
def test_dinov3_nonzero_query_biases_are_refused_naming_the_file(tmp_path):
    name = "vit_small_patch16_dinov3.lvd1689m"
    source = get_backbone(name, random_weights=True, device="cpu")
    published = _dinov3_published(dict(source.model.state_dict()))
    published["blocks.3.attn.qkv.bias"] = torch.full((3 * 384,), 0.1)
    torch.save(published, tmp_path / "qkvb.pth")
    with pytest.raises(WeightsError, match=r"qkvb.pth: blocks.3.attn.qkv.bias holds non-zero query/value biases"):
        get_backbone(name, weights=tmp_path / "qkvb.pth", device="cpu")

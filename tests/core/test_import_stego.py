"""``usseg import stego``: a checkpoint with the reference's exact key layout round-trips into usseg.

The checkpoint is built here the way [code:STEGO] builds it: a ``LitUnsupervisedSegmenter``-shaped module
(``net`` = DinoFeaturizer with ``model`` / ``cluster1`` / ``cluster2``, ``cluster_probe``, ``linear_probe``,
...) saved as Lightning saves it, with OmegaConf-style hyper-parameters and a callback keyed by a class —
from stand-in modules that are removed before the import, so the importer cannot import them.
"""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from usseg_core.backbones import fingerprint_state_dict, get_backbone
from usseg_core.errors import UssegError
from usseg_core.heads import load_head
from usseg_core.heads.stego_import import parse_stego_checkpoint, read_lightning_checkpoint

ARCH = "vit_small_patch16_224.dino"  # the smallest registry ViT: 384 wide, patch 16
WIDTH, DIM, N_CLASSES = 384, 12, 5


# --- the reference's modules, as modules.py / train_segmentation.py define them ----------------------------
class DinoFeaturizer(nn.Module):
    def __init__(self, model: nn.Module, dim: int, n_feats: int) -> None:
        super().__init__()
        self.model = model
        self.dropout = nn.Dropout2d(p=.1)
        self.cluster1 = nn.Sequential(nn.Conv2d(n_feats, dim, (1, 1)))
        self.cluster2 = nn.Sequential(nn.Conv2d(n_feats, n_feats, (1, 1)), nn.ReLU(), nn.Conv2d(n_feats, dim, (1, 1)))

    def head(self, image_feat: torch.Tensor) -> torch.Tensor:  # DinoFeaturizer.forward after the ViT, eval mode
        code = self.cluster1(self.dropout(image_feat))
        code += self.cluster2(self.dropout(image_feat))
        return code


class ClusterLookup(nn.Module):
    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(n_classes, dim))

    def forward(self, x, alpha, log_probs=False):  # modules.ClusterLookup.forward
        normed_clusters = F.normalize(self.clusters, dim=1)
        normed_features = F.normalize(x, dim=1)
        inner_products = torch.einsum("bchw,nc->bnhw", normed_features, normed_clusters)
        if alpha is None:
            cluster_probs = F.one_hot(torch.argmax(inner_products, dim=1), self.clusters.shape[0]) \
                .permute(0, 3, 1, 2).to(torch.float32)
        else:
            cluster_probs = nn.functional.softmax(inner_products * alpha, dim=1)
        if log_probs:
            return nn.functional.log_softmax(inner_products * alpha, dim=1)
        return -(cluster_probs * inner_products).sum(1).mean(), cluster_probs


class LitUnsupervisedSegmenter(nn.Module):
    def __init__(self, model: nn.Module, extra_clusters: int = 0) -> None:
        super().__init__()
        self.net = DinoFeaturizer(model, DIM, WIDTH)
        self.train_cluster_probe = ClusterLookup(DIM, N_CLASSES)
        self.cluster_probe = ClusterLookup(DIM, N_CLASSES + extra_clusters)
        self.linear_probe = nn.Conv2d(DIM, N_CLASSES, (1, 1))
        self.decoder = nn.Conv2d(DIM, WIDTH, (1, 1))


# --- OmegaConf / Lightning look-alikes, pickled under their real module names -----------------------------
def _fake_module(name: str, **classes) -> types.ModuleType:
    mod = types.ModuleType(name)
    for cls_name, cls in classes.items():
        cls.__module__, cls.__qualname__ = name, cls_name
        setattr(mod, cls_name, cls)
    return mod


class _Container:
    def __getstate__(self):
        return dict(self.__dict__)


def _dictconfig(values: dict, classes: dict) -> object:
    cfg = classes["DictConfig"]()
    meta = classes["ContainerMetadata"]()
    meta.__dict__.update(ref_type=__import__("typing").Any, object_type=dict, key=None, optional=True)
    content = {}
    for k, v in values.items():
        node = classes["AnyNode"]()
        node.__dict__.update(_val=v, _parent=cfg, _metadata=None)
        content[k] = node
    cfg.__dict__.update(_metadata=meta, _parent=None, _content=content)
    return cfg


REFERENCE_CFG = {"arch": "dino", "model_type": "vit_small", "dino_patch_size": 16, "dino_feat_type": "feat",
                 "projection_type": "nonlinear", "dim": DIM, "continuous": True, "extra_clusters": 0,
                 "dataset_name": "cocostuff27", "max_steps": 7000, "lr": 5e-4, "pointwise": True,
                 "pos_intra_weight": 0.67, "pos_inter_weight": 0.25, "neg_inter_weight": 0.63,
                 "pos_intra_shift": 0.08, "pos_inter_shift": 0.02, "neg_inter_shift": 0.66}


def save_reference_checkpoint(path: Path, lit: nn.Module, cfg: dict, state_dict: dict | None = None) -> None:
    """torch.save of what Lightning 1.x writes for STEGO, with OmegaConf/Lightning classes that cannot be imported
    at load time (their modules exist only while saving)."""
    classes = {n: type(n, (_Container,), {}) for n in ("DictConfig", "ContainerMetadata", "AnyNode", "ModelCheckpoint")}
    mods = {"omegaconf.dictconfig": _fake_module("omegaconf.dictconfig", DictConfig=classes["DictConfig"]),
            "omegaconf.base": _fake_module("omegaconf.base", ContainerMetadata=classes["ContainerMetadata"]),
            "omegaconf.nodes": _fake_module("omegaconf.nodes", AnyNode=classes["AnyNode"]),
            "pytorch_lightning.callbacks.model_checkpoint": _fake_module(
                "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=classes["ModelCheckpoint"])}
    for name in list(mods):  # parent packages, so that pickle's import of the module succeeds
        parts = name.split(".")
        for i in range(1, len(parts)):
            mods.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        ckpt = {"epoch": 3, "global_step": 7000, "pytorch-lightning_version": "1.4.0",
                "state_dict": state_dict if state_dict is not None else lit.state_dict(),
                "callbacks": {classes["ModelCheckpoint"]: {"best_model_score": torch.tensor(0.5), "dirpath": "x"}},
                "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
                "hyper_parameters": {"n_classes": N_CLASSES, "cfg": _dictconfig(cfg, classes)}}
        torch.save(ckpt, path)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    assert "omegaconf.dictconfig" not in sys.modules


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(checkpoint path, the reference module with its tensors) for a random ViT-S/16 STEGO."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(ARCH, pretrained=False, num_classes=0, dynamic_img_size=True)
    lit = LitUnsupervisedSegmenter(vit).eval()
    path = tmp_path_factory.mktemp("ckpt") / "cocostuff27_vit_small_test.ckpt"
    save_reference_checkpoint(path, lit, REFERENCE_CFG)
    return path, lit


@pytest.fixture(scope="module")
def imported(reference, tmp_path_factory):
    from commands.importing import import_stego

    storage = tmp_path_factory.mktemp("storage")
    return storage, import_stego(reference[0], storage, name="coco-test")


def test_checkpoint_has_the_reference_layout(reference):
    keys = set(read_lightning_checkpoint(reference[0])["state_dict"])
    assert {"net.model.blocks.0.attn.qkv.weight", "net.cluster1.0.weight", "net.cluster2.0.weight",
            "net.cluster2.2.bias", "cluster_probe.clusters", "linear_probe.weight", "linear_probe.bias",
            "train_cluster_probe.clusters", "decoder.weight"} <= keys


def test_hyper_parameters_read_without_importing_their_classes(reference):
    ck = parse_stego_checkpoint(reference[0])
    assert ck.hparams["model_type"] == "vit_small" and ck.hparams["dim"] == DIM and ck.dataset == "cocostuff27"
    assert (ck.backbone, ck.in_dim, ck.code_dim) == (ARCH, WIDTH, DIM)
    assert (ck.n_classes, ck.n_clusters) == (N_CLASSES, N_CLASSES)
    assert "omegaconf.dictconfig" not in sys.modules and ck.global_step == 7000


def test_backbone_weights_load_as_weights_file(reference, imported):
    _, lit = reference
    _, out = imported
    assert out.weights.suffix == ".safetensors" and out.backbone == ARCH
    bb = get_backbone(ARCH, weights=out.weights, device="cpu")
    assert bb.fingerprint == fingerprint_state_dict(lit.net.model.state_dict())
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        tokens = lit.net.model.forward_features(x)[:, 1:]  # the reference's `feat` path: norm(last block), no CLS
        expected = tokens.transpose(1, 2).reshape(1, WIDTH, 2, 3)
        assert torch.equal(bb(x), expected)


def test_head_codes_and_cluster_probe_match_the_reference(reference, imported):
    _, lit = reference
    _, out = imported
    head = load_head(out.head_path)
    feats = torch.randn(2, WIDTH, 5, 7)
    with torch.no_grad():
        ref_codes = lit.net.head(feats)
        codes = head.codes(feats)
        assert torch.equal(codes, ref_codes)  # the same convolutions in the same order: bit-identical
        ref_assign = lit.cluster_probe(ref_codes, None)[1].argmax(1)
        assert torch.equal(head.assign(codes), ref_assign)
        # the CRF unary: [code:STEGO] eval_segmentation `cluster_probe(code, 2, log_probs=True)`
        assert torch.allclose(head.cluster_logits(codes), lit.cluster_probe(ref_codes, 2, log_probs=True), atol=1e-5)


def test_linear_probe_and_head_serve_evaluation_predictors(reference, imported):
    from tasks.evaluate import predictor_logits

    _, lit = reference
    _, out = imported
    codes = torch.randn(2, DIM, 4, 4)
    with torch.no_grad():
        own = predictor_logits({"kind": "own", "path": str(out.head_path)}, codes)
        assert torch.equal(own.argmax(1), lit.cluster_probe(codes, None)[1].argmax(1))
        linear = predictor_logits({"kind": "linear", "path": str(out.probe_path), "n_classes": N_CLASSES}, codes)
        assert torch.allclose(linear, lit.linear_probe(codes), atol=1e-6)


def test_artifacts_metadata_and_cache_hit(reference, imported):
    from commands.importing import import_stego
    from tasks.segment import _backbone_of
    from usseg_core.store import ArtifactStore

    storage, out = imported
    store = ArtifactStore(storage)
    head_meta = store.get("head", out.head_key).meta
    assert head_meta["method"] == "stego" and head_meta["imported_from"]["name"] == "coco-test"
    assert head_meta["params"]["config"]["stego"]["dim"] == DIM and head_meta["steps"] == 7000
    assert head_meta["params"]["config"]["stego"]["shifts"] == [0.08, 0.02, 0.66]
    ref = _backbone_of(store, head_meta)  # what `usseg segment --model KEY` builds
    assert ref.name == ARCH and Path(ref.weights) == out.weights and not ref.random_weights
    mtimes = {p: p.stat().st_mtime_ns for p in Path(storage).glob("*/*/meta.json")}
    again = import_stego(reference[0], storage)
    assert again.cache_hit and (again.head_key, again.probe_key, again.weights) == (out.head_key, out.probe_key,
                                                                                    out.weights)
    assert {p: p.stat().st_mtime_ns for p in Path(storage).glob("*/*/meta.json")} == mtimes
    from commands.ops import referenced_keys

    assert {out.head_key, out.probe_key, out.backbone_key} <= referenced_keys(storage)  # gc keeps them


def test_segment_with_imported_head(imported, tmp_path):
    from tasks.segment import segment_images
    from usseg_core.viz import save_png

    storage, out = imported
    image = tmp_path / "img.png"
    save_png(image, (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8))
    written = segment_images([image], out.head_key, tmp_path / "out", crf=False, long_side=64, storage=str(storage))
    assert written and written[0].exists()


def test_linear_projection_head_adds_nothing(tmp_path):
    """projection_type linear (no cluster2): the nonlinear branch is all zeros, codes = cluster1(f)."""
    import timm

    with torch.device("meta"):
        vit = timm.create_model(ARCH, pretrained=False, num_classes=0)
    lit = LitUnsupervisedSegmenter(vit)
    sd = {k: (torch.randn(v.shape) if v.is_meta else v) for k, v in lit.state_dict().items()
          if not k.startswith("net.cluster2.")}
    path = tmp_path / "linear.ckpt"
    save_reference_checkpoint(path, lit, {**REFERENCE_CFG, "projection_type": "linear"}, state_dict=sd)
    ck = parse_stego_checkpoint(path)
    assert ck.projection == "linear"
    from usseg_core.heads.stego import StegoHead

    head = StegoHead(WIDTH, DIM)
    head.load_state_dict(ck.head_state)
    feats = torch.randn(1, WIDTH, 3, 3)
    with torch.no_grad():
        assert torch.equal(head.codes(feats), F.conv2d(feats, sd["net.cluster1.0.weight"], sd["net.cluster1.0.bias"]))


# --- bad input: one line naming the file and the problem ----------------------------------------------------
def _small_stego_state(**drop_or_replace) -> dict:
    """The reference keys with real shapes for the head, and a real-shape ViT (random; cheap to make)."""
    import timm

    with torch.device("meta"):
        vit = timm.create_model(ARCH, pretrained=False, num_classes=0)
    sd = {k: torch.zeros(v.shape) for k, v in LitUnsupervisedSegmenter(vit).state_dict().items()}
    for k, v in drop_or_replace.items():
        k = k.replace("__", ".")
        if v is None:
            sd.pop(k)
        else:
            sd[k] = v
    return sd


def _one_line_error(path: Path) -> str:
    with pytest.raises(UssegError) as info:
        parse_stego_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file(tmp_path):
    assert "not found" in _one_line_error(tmp_path / "nope.ckpt")


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "text.ckpt"
    path.write_text("hello")
    assert "not a torch zip checkpoint" in _one_line_error(path)


def test_plain_state_dict_is_not_a_stego_checkpoint(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save({"state_dict": {"blocks.0.attn.qkv.weight": torch.zeros(3)}}, path)
    assert "not a STEGO checkpoint" in _one_line_error(path)


def test_missing_cluster_probe(tmp_path):
    path = tmp_path / "noprobe.ckpt"
    torch.save({"state_dict": _small_stego_state(cluster_probe__clusters=None)}, path)
    assert "cluster_probe.clusters" in _one_line_error(path)


def test_linear_probe_shape_mismatch(tmp_path):
    path = tmp_path / "badprobe.ckpt"
    torch.save({"state_dict": _small_stego_state(linear_probe__weight=torch.zeros(N_CLASSES, DIM + 1, 1, 1))}, path)
    assert "shape mismatch" in _one_line_error(path)


def test_head_shape_mismatch(tmp_path):
    path = tmp_path / "badhead.ckpt"
    torch.save({"state_dict": _small_stego_state(**{"net__cluster2__2__weight": torch.zeros(DIM + 2, WIDTH, 1, 1)})},
               path)
    assert "shape mismatch" in _one_line_error(path) and "net.cluster2.2.weight" in _one_line_error(path)


def test_missing_vit_block(tmp_path):
    path = tmp_path / "novit.ckpt"
    torch.save({"state_dict": _small_stego_state(**{"net__model__blocks__3__mlp__fc1__weight": None})}, path)
    assert "missing keys" in _one_line_error(path)


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _small_stego_state(), "hyper_parameters": Evil()}, path)
    msg = _one_line_error(path)
    assert "refused" in msg and not marker.exists()


def test_cli_import_and_bad_input(reference, tmp_path):
    from commands.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["import", "stego", str(reference[0]), "--storage", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "backbone weights:" in res.output and "--weights" in res.output and "head artifact:" in res.output
    bad = tmp_path / "bad.ckpt"
    bad.write_text("x")
    res = runner.invoke(app, ["import", "stego", str(bad), "--storage", str(tmp_path / "s")])
    assert res.exit_code == 4  # a file that is not a checkpoint: EXIT_INPUT
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and lines[0].startswith("error:")


def test_extra_clusters_become_the_cluster_probe_size(tmp_path):
    sd = _small_stego_state(cluster_probe__clusters=torch.randn(N_CLASSES + 2, DIM))
    path = tmp_path / "extra.ckpt"
    save_reference_checkpoint(path, None, {**REFERENCE_CFG, "extra_clusters": 2}, state_dict=sd)
    ck = parse_stego_checkpoint(path)
    assert (ck.n_classes, ck.n_clusters) == (N_CLASSES, N_CLASSES + 2)
    save_reference_checkpoint(path, None, REFERENCE_CFG, state_dict=sd)  # extra_clusters 0 but 7 rows
    assert "extra_clusters" in _one_line_error(path)


def test_unsupported_feature_type(tmp_path):
    path = tmp_path / "kk.ckpt"
    save_reference_checkpoint(path, None, {**REFERENCE_CFG, "dino_feat_type": "KK"}, state_dict=_small_stego_state())
    assert "dino_feat_type" in _one_line_error(path)


def test_any_other_callable_becomes_an_inert_stand_in(tmp_path):
    """A global outside torch's blocked modules (subprocess.call) is replaced, never called."""
    import subprocess

    marker = tmp_path / "ran"

    class Sneaky:
        def __reduce__(self):
            return subprocess.call, (["touch", str(marker)],)

    path = tmp_path / "sneaky.ckpt"
    torch.save({"state_dict": _small_stego_state(), "hyper_parameters": {"cfg": Sneaky()}}, path)
    ck = parse_stego_checkpoint(path)
    assert not marker.exists() and ck.hparams == {} and ck.backbone == ARCH


def test_lightning_attribute_dict_hparams(tmp_path):
    attribute_dict = type("AttributeDict", (dict,), {})
    mod = _fake_module("pytorch_lightning.utilities.parsing", AttributeDict=attribute_dict)
    parents = {n: types.ModuleType(n) for n in ("pytorch_lightning", "pytorch_lightning.utilities")}
    sys.modules.update({**parents, mod.__name__: mod})
    try:
        hp = attribute_dict(n_classes=N_CLASSES, cfg={"model_type": "vit_small", "dim": DIM})
        path = tmp_path / "attr.ckpt"
        torch.save({"state_dict": _small_stego_state(), "hyper_parameters": hp}, path)
    finally:
        for n in (*parents, mod.__name__):
            sys.modules.pop(n, None)
    ck = parse_stego_checkpoint(path)
    assert ck.hparams == {"model_type": "vit_small", "dim": DIM} and ck.n_classes == N_CLASSES

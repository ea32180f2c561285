"""Bad or surprising inputs (issue 12): huge first image, missing label, silent content change,
splits and symlinks leaving the data root, tiny images."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.backbone import BackboneRef
from tasks.manifest import DataRef, _listing_signature, ensure_manifest
from tasks.extract import resolve_view, upscale_factor, warn_if_upscaled
from usseg_core.datasets import get_dataset
from usseg_core.datasets.manifest import build_manifest
from usseg_core.errors import ConfigError, InputError
from usseg_core.views import ViewSpec, resolve_full_size


def _png(path: Path, h: int, w: int, value: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(path)
    return path


# ---------------------------------------------------------------------- B1: full-frame size is bounded
def test_huge_first_image_does_not_set_a_huge_full_view(tmp_path, monkeypatch):
    monkeypatch.delenv("USSEG_FULL_MAX_SIDE", raising=False)
    root = tmp_path / "photos"
    _png(root / "images" / "a_huge.png", 2000, 3000)   # sorts first
    _png(root / "images" / "b_small.png", 360, 480)
    data = DataRef("directory", str(root), "all")
    manifest = build_manifest(data.dataset(), validate=False, progress=False)
    manifest.to_json(tmp_path / "m.json")
    info = {"path": str(tmp_path / "m.json")}
    backbone = BackboneRef("vit_small_patch8_224.dino")

    view = resolve_view(ViewSpec("full", None), data, info, backbone)
    assert view.size == (680, 1024)  # 2000x3000 scaled to long side 1024, aspect kept, multiple of 8

    monkeypatch.setenv("USSEG_FULL_MAX_SIDE", "512")
    assert resolve_view(ViewSpec("full", None), data, info, backbone).size == (344, 512)
    monkeypatch.setenv("USSEG_FULL_MAX_SIDE", "zero")
    with pytest.raises(ConfigError, match="USSEG_FULL_MAX_SIDE"):
        resolve_view(ViewSpec("full", None), data, info, backbone)


def test_full_size_rule_small_images_and_explicit_resolution():
    # below the cap: the image's own size (CamVid 360x480 keeps its key)
    assert resolve_full_size(ViewSpec("full", None), (360, 480), 32, max_long_side=1024).size == (352, 480)
    # an explicit long side is what the user asked for: not capped
    assert resolve_full_size(ViewSpec("full", 2048), (4000, 6000), 8, max_long_side=1024).size == (1368, 2048)
    # rounding never passes the cap (14 does not divide 1024: floored to 1022)
    assert resolve_full_size(ViewSpec("full", None), (4000, 6000), 14, max_long_side=1024).size == (686, 1022)
    size = resolve_full_size(ViewSpec("full", None), (6000, 4000), 16).size
    assert max(size) <= 1024 and size[0] > size[1]


# ---------------------------------------------------------------------- B2: a missing label
def _labelled_folder(root: Path, missing: str | None = "b") -> Path:
    for stem in ("a", "b", "c"):
        _png(root / "images" / f"{stem}.png", 16, 16)
        if stem != missing:
            _png(root / "labels" / f"{stem}.png", 16, 16, 1, mode="L")
    (root / "classes.txt").write_text("x\ny\n")
    return root


def test_missing_label_names_the_file(tmp_path):
    root = _labelled_folder(tmp_path / "d")
    ds = get_dataset("directory", root, "all")
    _listing_signature(ds)  # no FileNotFoundError
    with pytest.raises(InputError) as err:
        build_manifest(ds, progress=False)
    assert err.value.path == root / "labels" / "b.png"
    assert "label file does not exist" in err.value.problem and "images/b.png" in err.value.problem


def test_missing_label_is_skipped_by_the_skip_policy(tmp_path):
    root = _labelled_folder(tmp_path / "d")
    data = DataRef("directory", str(root), "all", on_error="skip")
    info = ensure_manifest.fn(data, str(tmp_path / "store"))
    assert info["n"] == 2
    assert [(s["id"], s["path"]) for s in info["skipped"]] == [("b", "labels/b.png")]
    with pytest.raises(InputError, match="labels/b.png"):
        ensure_manifest.fn(DataRef("directory", str(root), "all"), str(tmp_path / "store"))
    # adding the label later changes the listing: a new manifest with all three
    _png(root / "labels" / "b.png", 16, 16, 1, mode="L")
    assert ensure_manifest.fn(data, str(tmp_path / "store"))["n"] == 3


# ---------------------------------------------------------------------- B4: the content-hash rule
def _flip_last_byte_keeping_stat(path: Path) -> None:
    st = os.stat(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # a BMP's last byte is pixel data: still a valid image, same size
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_content_change_with_same_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.delenv("USSEG_VERIFY_CONTENT", raising=False)
    root = tmp_path / "d"
    for stem in ("a", "b"):
        p = root / "images" / f"{stem}.bmp"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(p)
    data = DataRef("directory", str(root), "all")
    storage = str(tmp_path / "store")
    before = ensure_manifest.fn(data, storage)
    _flip_last_byte_keeping_stat(root / "images" / "a.bmp")

    # the default rule: path + size + mtime decide reuse -> the stale manifest is reused
    stale = ensure_manifest.fn(data, storage)
    assert stale["key"] == before["key"] and stale["hash"] == before["hash"]

    # USSEG_VERIFY_CONTENT=1: contents are hashed -> a new manifest hash (so new feature keys)
    monkeypatch.setenv("USSEG_VERIFY_CONTENT", "1")
    fresh = ensure_manifest.fn(data, storage)
    assert fresh["hash"] != before["hash"] and fresh["key"] != before["key"]
    # and with verification on, an unchanged folder is still a cache hit
    assert ensure_manifest.fn(data, storage)["key"] == fresh["key"]


# ---------------------------------------------------------------------- B7: leaving the data root
def test_split_leaving_the_root_is_refused(tmp_path):
    root = tmp_path / "root"
    _png(root / "images" / "a.png", 8, 8)
    _png(tmp_path / "x" / "images" / "secret.png", 8, 8)
    with pytest.raises(ConfigError, match=r"--split '\.\./x' leaves the data root"):
        get_dataset("directory", root, "../x")
    with pytest.raises(ConfigError, match="leaves the data root"):
        get_dataset("directory", root, str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="leaves the data root"):
        get_dataset("camvid11", root, "../x")
    assert get_dataset("directory", root, "all").ids() == ["a"]


def test_symlinks_leaving_the_root_are_refused(tmp_path):
    root = tmp_path / "root"
    _png(root / "images" / "a.png", 8, 8)
    outside = _png(tmp_path / "outside" / "secret.png", 8, 8)
    (root / "images" / "inside.png").symlink_to(root / "images" / "a.png")
    assert get_dataset("directory", root, "all").ids() == ["a", "inside"]  # a link inside is fine
    (root / "images" / "evil.png").symlink_to(outside)
    with pytest.raises(InputError, match="outside the data root") as err:
        get_dataset("directory", root, "all")
    assert err.value.path.name == "evil.png"

    # a split folder that is a symlink out of the root
    root2 = tmp_path / "root2"
    root2.mkdir()
    (root2 / "val").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(InputError, match="outside the data root"):
        get_dataset("directory", root2, "val")


# ---------------------------------------------------------------------- B9: tiny images warn
def test_tiny_image_warns_with_its_name_and_size(caplog):
    view = ViewSpec("center_crop", 224)
    with caplog.at_level(logging.WARNING, logger="usseg"):
        assert warn_if_upscaled((8, 8), view, "imgs/icon.png")
    assert "imgs/icon.png" in caplog.text and "8x8" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="usseg"):
        assert not warn_if_upscaled((224, 300), view, "imgs/ok.png")
        assert not warn_if_upscaled((480, 640), ViewSpec("five_crop", 224), "imgs/crops.png")
    assert caplog.text == ""
    assert upscale_factor((100, 100), ViewSpec("five_crop", 224)) == pytest.approx(4.48)
    assert upscale_factor((8, 8), ViewSpec("full", None, size=(64, 32))) == 8.0


# ---------------------------------------------------------------------- a file name that is not UTF-8
def test_a_file_name_that_is_not_utf8_is_accepted_with_a_stable_escaped_id(tmp_path):
    """``caf\\xe9.png`` (café in Latin-1, from an old system): the image is read, its id is the escaped name
    on every listing, the listing signature and manifest hash are stable; a broken one is named escaped, and
    ``on_error="skip"`` lists it escaped."""
    root = tmp_path / "old"
    _png(root / "a.png", 16, 16, 10)
    raw = os.path.join(os.fsencode(root), b"caf\xe9.png")
    Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(os.fsdecode(raw))
    assert os.path.exists(raw)
    ds = get_dataset("directory", root, "all")
    assert ds.ids() == ["a", "caf\\xe9"]
    assert int(ds.load_image("caf\\xe9")[0, 0, 0]) == 200
    signature = _listing_signature(ds)
    assert signature == _listing_signature(get_dataset("directory", root, "all"))
    assert _listing_signature(ds, content=True) != signature
    manifest = build_manifest(ds, progress=False)
    manifest.to_json(tmp_path / "m.json")
    again = type(manifest).from_json(tmp_path / "m.json")
    assert again.hash == manifest.hash and again.image_path("caf\\xe9").read_bytes() == open(raw, "rb").read()

    with open(os.path.join(os.fsencode(root), b"bad\xe9.png"), "wb") as fh:
        fh.write(b"\x89PNG not really")
    broken = get_dataset("directory", root, "all")
    with pytest.raises(InputError) as err:
        build_manifest(broken, progress=False)
    assert str(err.value) == f"{root}/bad\\xe9.png: is not an image file Pillow can identify"
    str(err.value).encode("utf-8")  # printable: no surrogate reaches a log or the terminal
    skipped = build_manifest(broken, on_error="skip", progress=False)
    assert skipped.ids == ["a", "caf\\xe9"]
    assert skipped.skipped == [{"id": "bad\\xe9", "path": "bad\\xe9.png",
                                "problem": "is not an image file Pillow can identify"}]


# ---------------------------------------------------------------------- messages (issue 27, item 6)
def test_split_options_and_data_root_are_named_as_typed(tmp_path):
    from usseg_core.spec import ExtractSpec, RunSpec, build

    root = tmp_path / "root"
    _png(root / "images" / "a.png", 8, 8)
    for option, fields in (("--train-split", {"train_split": "../x"}), ("--eval-split", {"eval_split": "/etc"})):
        with pytest.raises(ConfigError) as err:
            build(RunSpec, head="stego", dataset="directory", data_root=str(root), **fields)
        assert str(err.value).startswith(f"{option} '{next(iter(fields.values()))}' leaves the data root {root}")
    with pytest.raises(ConfigError, match=r"^--split '\.\./x' leaves"):
        build(ExtractSpec, dataset="directory", data_root=str(root), split="../x")
    with pytest.raises(ConfigError, match=rf"^--data-root {tmp_path / 'nope'}: no such folder$"):  # exit 3
        build(RunSpec, head="stego", dataset="directory", data_root=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"^data root .*/gone does not exist \(pass --data-root"):
        get_dataset("directory", tmp_path / "gone", "all")


def test_a_set_value_of_the_wrong_type_names_the_key_and_set():
    from usseg_core.spec import CompareSpec, RunSpec, build

    head = "of head 'stego' section 'stego'"
    cases = {("stego", "steps", "abc"): f"--set steps=abc: expected an integer (field 'steps' {head})",
             ("stego", "stego.dropout", "high"): f"--set stego.dropout=high: expected a number (field 'dropout' {head})",
             ("stego", "pointwise", 1): f"--set pointwise=1: expected true or false (field 'pointwise' {head})",
             ("stego", "knn.k", "many"): "--set knn.k=many: expected an integer",
             ("picie", "views.n_views", 2.5): "--set views.n_views=2.5: expected an integer",
             ("hsg", "hsg.levels", (1, "a")): "--set hsg.levels=[1, \"a\"]: expected a list of integers, e.g. "
                                              "[1,2] (field 'levels' of head 'hsg' section 'hsg')",
             ("stego", "seed", "x"): "--set seed=x: expected an integer",
             ("stego", "n_clusters", "k"): "--set n_clusters=k: expected an integer"}
    for (name, key, value), line in cases.items():
        with pytest.raises(ConfigError) as err:
            build(RunSpec, head=name, dataset="synthetic",
                  overrides={key: list(value) if isinstance(value, tuple) else value})
        assert str(err.value) == line
    with pytest.raises(ConfigError, match=r"^--set steps=abc: expected an integer"):
        build(CompareSpec, dataset="synthetic", heads=["stego"], overrides={"steps": "abc"})
    ok = build(RunSpec, head="hsg", dataset="synthetic", overrides={"hsg.levels": [2, 4], "hsg.dropout": 0})
    assert ok.overrides == {"hsg.levels": [2, 4], "hsg.dropout": 0}


def test_too_few_images_for_the_knn_table_fail_before_any_work(tmp_path):
    from tasks.heads import check_knn_rows
    from usseg_core.spec import RunSpec, build

    root = tmp_path / "four"
    for i in range(4):
        _png(root / f"{i}.png", 16, 16, 40 * i)
    run = build(RunSpec, head="stego", dataset="directory", data_root=str(root))
    with pytest.raises(ConfigError) as err:
        check_knn_rows(run)
    assert str(err.value) == ("dataset directory (train) has 4 images, 4 training items (1 per image), but knn.k=30 "
                              "keeps 30 neighbours of each, which needs at least 31; pass --set knn.k=K with K <= 3 "
                              "(and STEGO's/OMH's num_neighbors <= K)")
    check_knn_rows(build(RunSpec, head="stego", dataset="directory", data_root=str(root),
                         overrides={"knn.k": 3, "num_neighbors": 3}))
    check_knn_rows(build(RunSpec, head="picie", dataset="directory", data_root=str(root)))  # no KNN table

    from tasks.heads import ensure_knn  # the same check on the features (deployments, skipped files)

    with pytest.raises(ConfigError, match=r"^the training features hold 4 items, but knn.k=30 .* K <= 3 "):
        ensure_knn.fn(str(tmp_path / "s"), [{"key": "f0", "n": 4, "path": "-"}])
    assert not (tmp_path / "s" / "knn").exists()  # refused before its folder was begun


def test_torch_messages_are_short_plain_and_never_advise_weights_only_false(tmp_path):
    import torch

    from commands.common import error_message, handled
    from usseg_core.backbones.weights import load_weights_file
    from usseg_core.errors import WeightsError
    from usseg_core.heads import load_head

    class Runs:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    class Calls:
        def __reduce__(self):
            return (exec, ("print('pwned')",))

    torch.save({"w": Runs()}, tmp_path / "system.pt")
    torch.save({"state_dict": Calls()}, tmp_path / "exec.pth")
    for load, path, name in ((load_head, tmp_path / "system.pt", "posix.system"),
                             (load_weights_file, tmp_path / "exec.pth", "exec")):
        with pytest.raises((InputError, WeightsError)) as err:
            load(path)
        text, cut = error_message(handled(err.value))
        assert text.startswith(f"{path}: ") and cut
        assert f"holds a pickled callable ({name}), which usseg never loads" in text
        assert "weights_only=False" not in text and "weights_only` set to `False" not in text
        assert "\x1b" not in text and len(text) < 400


def test_a_long_library_message_keeps_its_first_sentence():
    from commands.common import error_message

    long = "\x1b[1mError(s) in loading state_dict for Head\x1b[0m: size mismatch. " + "x" * 900
    try:
        try:
            raise RuntimeError(long)
        except RuntimeError as exc:
            raise InputError("/w/head.pt", f"unreadable head checkpoint ({exc})") from exc
    except InputError as err:
        text, cut = error_message(err)
    assert (text, cut) == ("/w/head.pt: unreadable head checkpoint (Error(s) in loading state_dict for Head: size "
                           "mismatch.)", True)

"""Manifests: identity independent of the root, sensitive to every byte, skip policy, path safety."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from usseg_core.datasets import Manifest, build_manifest, get_dataset, resolve_under
from usseg_core.errors import InputError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def _folder(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / "val/images").mkdir(parents=True, exist_ok=True)
        (root / "val/labels").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(root / f"val/images/{i:02d}.png")
        Image.fromarray(rng.integers(0, 12, (5, 7), dtype=np.uint8)).save(root / f"val/labels/{i:02d}.png")
    return root


def _manifest(root: Path, **kw) -> Manifest:
    return build_manifest(get_dataset("camvid11", root, "val"), progress=False, **kw)


def test_entries_hold_relpaths_sizes_and_hashes(tmp_path):
    m = _manifest(_folder(tmp_path / "a"))
    assert m.ids == ["00", "01", "02"] and len(m) == 3 and m.dataset == "camvid11" and m.split == "val"
    e = m.entry("01")
    assert e.image == "val/images/01.png" and e.label == "val/labels/01.png"
    assert e.size == (tmp_path / "a/val/images/01.png").stat().st_size
    assert len(e.sha256) == 64 and len(e.label_sha256) == 64 and e.sha256 != e.label_sha256
    assert m.image_path("01") == (tmp_path / "a/val/images/01.png").resolve()


def test_hash_stable_across_root_move(tmp_path):
    first = _manifest(_folder(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere/b")
    moved = _manifest(tmp_path / "elsewhere/b")
    assert moved.root != first.root
    assert moved.hash == first.hash


@pytest.mark.parametrize("which", ["images", "labels"])
def test_hash_changes_when_one_byte_changes(tmp_path, which):
    root = _folder(tmp_path / "a")
    before = _manifest(root, validate=False).hash
    path = root / f"val/{which}/02.png"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    assert _manifest(root, validate=False).hash != before


def test_hash_depends_on_dataset_and_split(tmp_path):
    root = _folder(tmp_path / "a")
    m = _manifest(root)
    other = Manifest("synthetic", m.split, m.root, m.entries)
    assert other.hash != m.hash


def test_skip_policy_lists_skipped_files(tmp_path):
    root = _folder(tmp_path / "a", n=4)
    (root / "val/images/01.png").write_text("garbage")
    Image.fromarray(np.full((5, 7), 99, np.uint8)).save(root / "val/labels/03.png")
    with pytest.raises(InputError, match="01.png"):
        _manifest(root)
    m = _manifest(root, on_error="skip")
    assert m.ids == ["00", "02"]
    assert [s["path"] for s in m.skipped] == ["val/images/01.png", "val/labels/03.png"]
    assert "99" in m.skipped[1]["problem"]


def test_all_skipped_is_an_error(tmp_path):
    root = _folder(tmp_path / "a", n=1)
    (root / "val/images/00.png").write_bytes(b"")
    with pytest.raises(InputError):
        _manifest(root, on_error="skip")


def test_json_round_trip_and_tamper_check(tmp_path):
    m = _manifest(_folder(tmp_path / "a"))
    m.to_json(tmp_path / "m.json")
    back = Manifest.from_json(tmp_path / "m.json")
    assert back.hash == m.hash and back.entries == m.entries and back.root == m.root
    doc = json.loads((tmp_path / "m.json").read_text())
    doc["entries"][0]["size"] += 1
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="t.json"):
        Manifest.from_json(tmp_path / "t.json")
    doc = json.loads((tmp_path / "m.json").read_text())
    doc["entries"][0]["image"] = "../../etc/passwd"
    del doc["hash"]
    (tmp_path / "e.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="escaping"):
        Manifest.from_json(tmp_path / "e.json")


def test_resolve_under_rejects_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub/ok.png").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("s")
    assert resolve_under(root, "sub/ok.png") == (root / "sub/ok.png").resolve()
    assert resolve_under(root, "sub/../sub/ok.png") == (root / "sub/ok.png").resolve()
    for bad in ("../secret.txt", "sub/../../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd"):
        with pytest.raises(InputError):
            resolve_under(root, bad)
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    with pytest.raises(InputError, match="escapes"):
        resolve_under(root, "link.txt")


@pytest.mark.realdata
def test_camvid_val_manifest_real_data():
    root = SHARED / "data" / "camvid"
    if not (root / "val").is_dir():
        pytest.skip(f"real CamVid data not found at {root}")
    m = build_manifest(get_dataset("camvid11", root, "val"), progress=False)
    assert len(m) == 101 and not m.skipped
    assert all(e.label is not None for e in m.entries)
    assert m.entry(m.ids[0]).image.startswith("val/images/")

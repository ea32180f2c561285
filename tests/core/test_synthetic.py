"""The procedural synthetic set: deterministic, complete-once, exact labels, readable as a dataset."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from usseg_core.datasets import build_manifest, ensure_synthetic, get_dataset, render_synthetic
from usseg_core.datasets.synthetic import CLASS_NAMES, MARKER, render_scene
from usseg_core.errors import ConfigError

SMALL = dict(n_train=3, n_val=2, height=48, width=64)


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_same_seed_gives_bit_identical_files(tmp_path):
    a = render_synthetic(tmp_path / "a", seed=3, **SMALL)
    b = render_synthetic(tmp_path / "b", seed=3, **SMALL)
    names = _files(a)
    assert names == _files(b)
    assert len([n for n in names if n.endswith(".png")]) == 2 * (3 + 2)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_other_seed_differs(tmp_path):
    a = render_synthetic(tmp_path / "a", seed=0, **SMALL)
    b = render_synthetic(tmp_path / "b", seed=1, **SMALL)
    assert (a / "train/images/0000.png").read_bytes() != (b / "train/images/0000.png").read_bytes()


def test_complete_folder_is_not_rewritten(tmp_path):
    root = render_synthetic(tmp_path / "s", **SMALL)
    assert (root / MARKER).is_file()
    (root / "val/images/0001.png").unlink()
    ensure_synthetic(root, **SMALL)  # complete: nothing is rendered again
    assert not (root / "val/images/0001.png").exists()
    with pytest.raises(ConfigError, match="already holds"):
        render_synthetic(root, seed=5, **SMALL)


def test_incomplete_folder_is_completed(tmp_path):
    root = render_synthetic(tmp_path / "s", **SMALL)
    reference = {n: (root / n).read_bytes() for n in _files(root)}
    (root / MARKER).unlink()
    (root / "train/images/0002.png").unlink()
    render_synthetic(root, **SMALL)
    assert {n: (root / n).read_bytes() for n in _files(root)} == reference


def test_scene_labels_are_exact_and_in_range():
    image, label = render_scene(np.random.default_rng(7), 96, 128)
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8
    assert label.shape == (96, 128) and label.dtype == np.uint8
    assert set(np.unique(label)) <= set(range(len(CLASS_NAMES)))
    assert label[0].min() in (0, 1)  # top row: sky or building, never ground
    assert label[-1].max() in (2, 3, 4)  # bottom row: ground, road or car


@pytest.fixture(scope="module")
def default_set(tmp_path_factory):
    return render_synthetic(tmp_path_factory.mktemp("synthetic"))


def test_default_set_reads_as_dataset(default_set):
    train = get_dataset("synthetic", default_set, "train")
    val = get_dataset("synthetic", default_set, "val")
    assert len(train) == 40 and len(val) == 12
    assert train.class_names == CLASS_NAMES and train.n_classes == 5 and train.eval_policy == "full"
    m = build_manifest(val, progress=False)
    assert len(m) == 12 and not m.skipped
    image, label = val.load_pair(val.ids()[0])
    assert image.shape == (192, 256, 3) and label.shape == (192, 256)
    counts = np.zeros(5)
    for id in train.ids():
        counts += np.bincount(train.load_label(id).ravel(), minlength=5)
    freq = counts / counts.sum()
    assert (freq > 0.03).all(), freq  # every class is present in a useful amount


def test_colour_alone_is_ambiguous(default_set):
    """A per-pixel nearest-colour-centroid classifier stays far from perfect (measured about 0.45)."""
    def pixels(split):
        ds = get_dataset("synthetic", default_set, split)
        x = np.concatenate([ds.load_image(i).reshape(-1, 3) for i in ds.ids()]).astype(np.float32)
        y = np.concatenate([ds.load_label(i).ravel() for i in ds.ids()])
        return x, y

    x, y = pixels("train")
    xv, yv = pixels("val")
    centroids = np.stack([x[y == k].mean(0) for k in range(5)])  # (5, 3)
    pred = ((xv[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yv).mean() < 0.7


def test_synthetic_label_out_of_range_is_error(tmp_path):
    root = render_synthetic(tmp_path / "s", **SMALL)
    Image.fromarray(np.full((48, 64), 9, np.uint8)).save(root / "val/labels/0000.png")
    with pytest.raises(Exception, match="0000.png"):
        get_dataset("synthetic", root, "val").check("0000")

"""OWT-UCM: ultrametric nesting, exact recovery of a synthetic partition, BSDS ucm2 layout and I/O."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from usseg_core.edges import EdgeMap, get_edge_detector
from usseg_core.errors import InputError
from usseg_core.ucm import load_ucm2_mat, owt_ucm, save_ucm2_mat, ucm_labels

BSDS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bsds500_sample"


def _quadrants() -> np.ndarray:
    """4 flat rectangles: left/right differ weakly, top/bottom strongly (so levels are ordered)."""
    img = np.zeros((48, 64, 3), np.uint8)
    img[:20, :30] = (90, 90, 90)
    img[:20, 30:] = (110, 110, 110)  # weak vertical boundary on top
    img[20:, :30] = (230, 40, 40)
    img[20:, 30:] = (230, 60, 60)  # weak vertical boundary at the bottom, strong horizontal one
    return img


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def test_synthetic_regions_recovered_exactly_at_their_levels():
    ucm2 = owt_ucm(get_edge_detector("classical")(_quadrants()))
    truth4 = np.zeros((48, 64), int)
    truth4[:20, 30:] = 1
    truth4[20:, :30] = 2
    truth4[20:, 30:] = 3
    truth2 = (truth4 >= 2).astype(int)
    v_lvl = ucm2[1:40:2, 60]  # boundary site between columns 29 and 30, top rows
    h_lvl = ucm2[40, 1:60:2]  # boundary site between rows 19 and 20, left part
    weak, strong = float(np.median(v_lvl)), float(np.median(h_lvl))
    assert 0 < weak < strong
    lab4 = ucm_labels(ucm2, 0.5 * weak)
    assert lab4.max() + 1 == 4 and _same_partition(lab4, truth4)
    lab2 = ucm_labels(ucm2, 0.5 * (weak + strong))
    assert lab2.max() + 1 == 2 and _same_partition(lab2, truth2)
    assert ucm_labels(ucm2, ucm2.max()).max() == 0


def _random_edges(seed: int, h: int = 40, w: int = 50) -> EdgeMap:
    rng = np.random.default_rng(seed)
    from scipy import ndimage as ndi

    s = ndi.gaussian_filter(rng.random((h, w)), 1.5)
    s = (s - s.min()) / (s.max() - s.min())
    return EdgeMap(s.astype(np.float32), (rng.random((h, w)) * np.pi).astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_give_nested_partitions(seed):
    ucm2 = owt_ucm(_random_edges(seed))
    levels = np.quantile(ucm2[ucm2 > 0], [0.05, 0.2, 0.5, 0.8, 0.95])
    labs = [ucm_labels(ucm2, t) for t in levels]
    counts = [lab.max() + 1 for lab in labs]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    for fine, coarse in zip(labs, labs[1:]):
        # every fine region lies inside exactly one coarse region
        pairs = np.unique(np.stack([fine.ravel(), coarse.ravel()]), axis=1)
        assert pairs.shape[1] == fine.max() + 1


def test_ucm2_layout_like_bsds():
    e = _random_edges(3, 30, 20)
    ucm2 = owt_ucm(e)
    assert ucm2.shape == (61, 41)
    assert np.all(ucm2[1::2, 1::2] == 0)  # pixel sites
    assert np.array_equal(ucm2[0], ucm2[1]) and np.array_equal(ucm2[:, -1], ucm2[:, -2])
    cr = ucm2[2:-1:2, 2:-1:2]
    inc = np.maximum.reduce([ucm2[1:-2:2, 2:-1:2], ucm2[3::2, 2:-1:2], ucm2[2:-1:2, 1:-2:2], ucm2[2:-1:2, 3::2]])
    assert np.array_equal(cr, inc)
    assert ucm2.max() <= 1.0


def test_ultrametric_levels_are_region_merge_heights():
    # ultrametric property on sampled pixel triples: d(a,c) <= max(d(a,b), d(b,c)), where d is the
    # smallest threshold at which two pixels share a region
    ucm2 = owt_ucm(_random_edges(4, 20, 24))
    levels = np.unique(ucm2)
    labs = np.stack([ucm_labels(ucm2, t) for t in levels])  # (L, H, W)
    flat = labs.reshape(len(levels), -1)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, flat.shape[1], size=(200, 3))

    def d(i, j):
        return levels[np.argmax(flat[:, i] == flat[:, j])]

    for a, b, c in idx:
        assert d(a, c) <= max(d(a, b), d(b, c)) + 1e-12


def test_oriented_weighting_lowers_across_orientation_arcs():
    s = np.zeros((30, 30), np.float32)
    s[:, 15] = 1.0  # a vertical ridge
    along = EdgeMap(s, np.full_like(s, np.pi / 2))
    across = EdgeMap(s, np.zeros_like(s))
    assert owt_ucm(along).max() > 0.9
    assert owt_ucm(across).max() < 0.2  # edge orientation perpendicular to the arc: suppressed
    assert owt_ucm(across, oriented=False).max() > 0.9


def test_mat_roundtrip_and_bad_files(tmp_path):
    ucm2 = owt_ucm(_random_edges(5, 10, 12))
    save_ucm2_mat(tmp_path / "a.mat", ucm2)
    assert np.array_equal(load_ucm2_mat(tmp_path / "a.mat"), ucm2)
    import scipy.io as sio

    sio.savemat(tmp_path / "b.mat", {"other": np.zeros(3)})
    with pytest.raises(InputError, match="b.mat.*ucm2"):
        load_ucm2_mat(tmp_path / "b.mat")
    with pytest.raises(InputError, match="missing.mat"):
        load_ucm2_mat(tmp_path / "missing.mat")


def test_reference_bsds_ucm2_reads_and_nests():
    f = BSDS / "ucm2" / "2018.mat"
    if not f.is_file():
        pytest.skip(f"BSDS sample not found at {BSDS}")
    u = load_ucm2_mat(f)
    assert u.shape == (963, 643)
    a, b = ucm_labels(u, 0.05), ucm_labels(u, 0.3)
    assert a.max() > b.max() > 0
    assert np.unique(np.stack([a.ravel(), b.ravel()]), axis=1).shape[1] == a.max() + 1

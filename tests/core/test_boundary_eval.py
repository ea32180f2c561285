"""BSDS boundary benchmark: matching vs brute force, hand-computed counts, ODS/OIS, GT loading."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from usseg_core.boundary_eval import (
    ImageCounts, bsds_thresholds, evaluate_dataset, evaluate_image, load_bsds_gt, match_boundaries,
)
from usseg_core.errors import InputError

BSDS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bsds500_sample"


def _brute_max_matching(p, g, tol) -> int:
    best = 0
    for perm in itertools.permutations(range(len(g)), min(len(p), len(g))):
        for np_ in itertools.combinations(range(len(p)), len(perm)):
            k = sum(np.hypot(*(p[i] - g[j])) <= tol for i, j in zip(np_, perm))
            best = max(best, k)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matching_cardinality_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 12)
    pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
    pred[tuple(rng.integers(0, 12, (2, 5)))] = True
    gt[tuple(rng.integers(0, 12, (2, 4)))] = True
    max_dist = 3.0 / np.hypot(*shape)  # 3-pixel tolerance
    mp, mg = match_boundaries(pred, gt, max_dist)
    assert mp.sum() == mg.sum()
    assert not (mp & ~pred).any() and not (mg & ~gt).any()
    assert mp.sum() == _brute_max_matching(np.argwhere(pred), np.argwhere(gt), 3.0 + 1e-9)


def test_one_to_one_not_many_to_one():
    pred = np.zeros((10, 10), bool)
    gt = np.zeros((10, 10), bool)
    pred[5, 4:7] = True  # three predicted pixels near one GT pixel
    gt[5, 5] = True
    mp, mg = match_boundaries(pred, gt, 2.0 / np.hypot(10, 10))
    assert mp.sum() == 1 and mg.sum() == 1


def test_evaluate_image_hand_counts():
    h, w = 20, 20
    g1 = np.zeros((h, w), bool)
    g1[10, 2:18] = True  # 16 px
    g2 = np.zeros((h, w), bool)
    g2[2:18, 10] = True  # 16 px
    pb = np.zeros((h, w))
    pb[10, 2:18] = 0.8  # exactly annotator 1's line
    pb[3, 3] = 0.3  # isolated false positive, present only at the low threshold
    c = evaluate_image(pb, [g1, g2], thresholds=np.array([0.2, 0.5]), max_dist=0.0, thin_pb=False)
    # t=0.2: 17 predicted; line matches g1 fully (16) and g2 at its crossing pixel only (1)
    assert c.sumP.tolist() == [17, 16]
    assert c.cntP.tolist() == [16, 16]
    assert c.sumR.tolist() == [32, 32]
    assert c.cntR.tolist() == [17, 17]
    res = evaluate_dataset([c])
    r, p = 17 / 32, 16 / 16
    assert res["ods_f"] == pytest.approx(2 * p * r / (p + r), rel=1e-6)
    assert res["ois_f"] == pytest.approx(2 * p * r / (p + r), rel=1e-6)


def test_dataset_ods_vs_ois():
    th = np.array([0.25, 0.75])
    a = ImageCounts(th, np.array([8, 4]), np.array([10, 10]), np.array([4, 4]), np.array([10, 4]))
    b = ImageCounts(th, np.array([9, 1]), np.array([10, 10]), np.array([9, 1]), np.array([10, 1]))
    res = evaluate_dataset([a, b])
    # OIS picks a's t=0.75 (F=.571 > .533) and b's t=0.25 (F=.9): R=13/20, P=13/14
    assert res["ois_f"] == pytest.approx(2 * (13 / 14) * (13 / 20) / (13 / 14 + 13 / 20))
    assert res["ods_f"] <= res["ois_f"] + 1e-12
    assert 0 < res["ap"] <= 1
    assert len(res["curve"]["precision"]) == 2


def test_threshold_grid():
    t = bsds_thresholds(99)
    assert len(t) == 99 and t[0] == pytest.approx(0.01) and t[-1] == pytest.approx(0.99)


def test_load_bsds_gt_and_reference_ucm_beats_chance():
    f = BSDS / "groundTruth" / "2018.mat"
    if not f.is_file():
        pytest.skip(f"BSDS sample not found at {BSDS}")
    from usseg_core.ucm import load_ucm2_mat

    gts = load_bsds_gt(f)
    assert len(gts) >= 5 and gts[0].shape == (481, 321) and gts[0].dtype == bool
    ucm = load_ucm2_mat(BSDS / "ucm2" / "2018.mat")[2::2, 2::2]
    th = np.array([0.1, 0.2, 0.4])
    ref = evaluate_dataset([evaluate_image(ucm, gts, th)])
    rng = np.random.default_rng(0)
    rand = evaluate_dataset([evaluate_image(rng.random(ucm.shape) * (rng.random(ucm.shape) < 0.05), gts, th)])
    assert ref["ods_f"] > 0.6 and ref["ods_f"] > rand["ods_f"] + 0.2  # random 5% dots score ~0.35 at 4 px tolerance


def test_load_bsds_gt_bad_file(tmp_path):
    import scipy.io as sio

    sio.savemat(tmp_path / "x.mat", {"foo": np.zeros(2)})
    with pytest.raises(InputError, match="x.mat"):
        load_bsds_gt(tmp_path / "x.mat")


def _exact_count(pred, gt, tol):
    """Maximum matching size by networkx's Hopcroft-Karp on the whole candidate graph (no components)."""
    nx = pytest.importorskip("networkx")
    from scipy.spatial import cKDTree

    pi, gi = np.argwhere(pred), np.argwhere(gt)
    pairs = cKDTree(pi).query_ball_tree(cKDTree(gi), tol)
    g = nx.Graph()
    top = [("p", k) for k in range(len(pi))]
    g.add_nodes_from(top)
    g.add_nodes_from(("g", k) for k in range(len(gi)))
    g.add_edges_from((("p", a), ("g", c)) for a, lst in enumerate(pairs) for c in lst)
    return len(nx.bipartite.hopcroft_karp_matching(g, top_nodes=top)) // 2


@pytest.mark.parametrize("seed", range(3))
def test_large_components_are_matched_exactly(seed):
    from usseg_core import boundary_eval as be

    rng = np.random.default_rng(seed)
    pred = rng.random((40, 40)) < 0.3  # dense: one component far above EXACT_MAX_NODES
    gt = rng.random((40, 40)) < 0.3
    max_dist = 2.0 / np.hypot(40, 40)
    mp, mg = match_boundaries(pred, gt, max_dist)
    assert pred.sum() + gt.sum() > be.EXACT_MAX_NODES
    assert mp.sum() == mg.sum() and not (mp & ~pred).any() and not (mg & ~gt).any()
    exact = _exact_count(pred, gt, 2.0 + 1e-9)
    assert mp.sum() == exact
    # the greedy start alone is below the maximum here, so the test sees a non-exact matcher
    pi, gi = np.argwhere(pred), np.argwhere(gt)
    d = np.hypot(*(pi[:, None, :] - gi[None, :, :]).transpose(2, 0, 1))
    ri, ci = np.nonzero(d <= 2.0 + 1e-9)
    assert len(be._greedy_nearest_first(ri, ci, d[ri, ci])[0]) < exact


@pytest.mark.skipif(not (BSDS / "groundTruth").is_dir(), reason="BSDS500 sample not present")
@pytest.mark.parametrize("image,thr", [("2018", 0.05), ("6046", 0.2), ("8068", 0.05)])
def test_bsds_sample_matching_is_maximum(image, thr):
    """On real BSDS boundary maps (reference ucm2, thinned): our count is the maximum matching's, and the
    benchmark's own CSA matcher (pyedgeeval's correspondPixels, when installed) agrees within 0.2 %."""
    from skimage.morphology import thin

    from usseg_core.ucm import load_ucm2_mat

    pb = load_ucm2_mat(BSDS / "ucm2" / f"{image}.mat")[2::2, 2::2]
    gt = load_bsds_gt(BSDS / "groundTruth" / f"{image}.mat")[0]
    b = thin(pb >= thr)
    mp, mg = match_boundaries(b, gt)
    tol = 0.0075 * np.hypot(*b.shape)
    assert mp.sum() == mg.sum() == _exact_count(b, gt, tol)
    try:
        from pyEdgeEval._lib import correspond_pixels
    except ImportError:
        return
    m1, m2, _, _ = correspond_pixels(b, gt, max_dist=0.0075)
    csa = int((m1 > 0).sum())
    assert csa <= mp.sum() <= csa * 1.002, (csa, int(mp.sum()))

"""Evaluation and segmentation hold no D-channel map at the label's or photo's size (issue 27, item 1).

Two halves: the band-by-band predictions equal today's full-size path (a reference copy of it lives here:
upsample the codes in one piece, logits, argmax, the dense CRF on the whole float64 log-softmax) for every
predictor kind (segment retrieval included), CRF on and off, and past the CRF's pixel budget the capped
grid equals its one-piece recipe; and a big image's peak memory, CRF on, stays within a ratio of a small
image's, both measured in subprocesses making the per-image calls of `evaluate_shard` and
`segment_images` (labels band by band, confusion counts, kept examples, label / colour / overlay PNGs).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tasks.evaluate import confusion, hierarchy_maps, predict_labels, predictor_logits, upsampled_bands
from usseg_core.crf import CRFParams, crf_grid
from usseg_core.metrics import ConfusionMatrix

REPO = Path(__file__).resolve().parents[2]
D, K, GRID, SIZE = 24, 5, (7, 9), (61, 83)
SMALL_BANDS = 4 * D * SIZE[1] * 3  # three rows a band: many bands, a partial last one


def _blobs(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 smooth colour blobs: a CRF has edges to follow."""
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.integers(0, 256, (1, 3, 4, 5)).astype(np.float32))
    img = F.interpolate(small, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    return img.round().clamp(0, 255).to(torch.uint8).numpy()


def _reference_crf(image: np.ndarray, logits: np.ndarray, params: CRFParams) -> np.ndarray:
    """The CRF as it was: the whole (K, H, W) float64 log-softmax, floored, handed to pydensecrf."""
    import pydensecrf.densecrf as dcrf

    z = logits.astype(np.float64) - logits.max(axis=0, keepdims=True)
    log_p = np.maximum(z - np.log(np.exp(z).sum(axis=0, keepdims=True)), np.log(params.prob_floor))
    k, h, w = logits.shape
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(np.ascontiguousarray((-log_p).reshape(k, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image[:, :, ::-1]), compat=params.bilateral_compat)
    return np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(k, h, w)


def _reference(pred: dict, codes: torch.Tensor, image: np.ndarray, crf: bool) -> dict[str, np.ndarray]:
    """Today's full-size path: codes (1, D, H, W), logits (K, H, W), argmax [, CRF argmax]."""
    full = F.interpolate(codes, size=image.shape[:2], mode="bilinear", align_corners=False)
    logits = predictor_logits(pred, full)[0]
    out = {"no": logits.argmax(0).numpy()}
    if crf:
        out["yes"] = _reference_crf(image, logits.numpy(), CRFParams()).argmax(0)
    return out


def _save_stego_head(path: Path, in_dim: int, code_dim: int, n_classes: int) -> None:
    """A STEGO head.pt with random weights (its codes and its own cluster probe)."""
    from usseg_core.heads.builtin import StegoTrained
    from usseg_core.heads.registry import save_head
    from usseg_core.heads.stego import StegoConfig

    head = StegoTrained("stego", in_dim, code_dim, n_classes, 0.1)
    save_head(path, "stego", n_classes, {"stego": StegoConfig()}, {
        "in_dim": in_dim, "code_dim": code_dim, "head": head.head.state_dict(), "cluster": head.probe.state_dict()})


@pytest.fixture(scope="module")
def predictors(tmp_path_factory) -> dict[str, dict]:
    """A k-means on raw features, a STEGO head's own cluster probe and a linear probe, as files."""
    from usseg_core.heads.probes import LinearProbe

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("predictors")
    np.save(folder / "centroids.npy", torch.randn(K, D).numpy())
    torch.save(LinearProbe(D, K).state_dict(), folder / "probe.pt")
    _save_stego_head(folder / "head.pt", D, D, K)
    (folder / "memory").mkdir()
    np.save(folder / "memory" / "prototypes.npy", F.normalize(torch.randn(30, D), dim=1).numpy())
    np.save(folder / "memory" / "labels.npy", torch.randint(0, K, (30,)).numpy())
    return {"kmeans": {"kind": "kmeans", "path": str(folder / "centroids.npy")},
            "retrieval": {"kind": "retrieval", "path": str(folder / "memory"), "n_classes": K, "grid": [2, 3],
                          "iters": 5, "k": 3, "vote": "majority", "pool_to": list(GRID)},
            "own": {"kind": "own", "path": str(folder / "head.pt")},
            "linear": {"kind": "linear", "path": str(folder / "probe.pt"), "n_classes": K}}


def test_bands_are_the_one_interpolation_up_to_rounding():
    torch.manual_seed(1)
    for grid, size in [((7, 9), (61, 83)), ((5, 4), (400, 300)), ((1, 1), (9, 7)), ((12, 16), (12, 16))]:
        codes = torch.randn(1, 6, *grid)
        full = F.interpolate(codes, size=size, mode="bilinear", align_corners=False)
        for band_bytes in (1, 4 * 6 * size[1] * 5, 1 << 30):
            parts = list(upsampled_bands(codes, size, band_bytes))
            assert [p[0] for p in parts] == list(range(0, size[0], parts[0][1] - parts[0][0]))
            got = torch.cat([p[2] for p in parts], dim=2)
            assert got.shape == full.shape
            ulp = torch.finfo(torch.float32).eps * full.abs().clamp_min(1)
            assert ((got - full).abs() <= 4 * ulp).all()  # a few roundings apart
            if band_bytes == 1 << 30:  # one band: the call itself
                assert torch.equal(got, full)


@pytest.mark.parametrize("kind", ["kmeans", "own", "linear", "retrieval"])
@pytest.mark.parametrize("crf", [False, True])
def test_band_predictions_equal_the_full_size_path(predictors, kind, crf):
    torch.manual_seed(2)
    image = _blobs(SIZE)
    pred = predictors[kind]
    for seed in range(3):
        codes = torch.randn(1, D, *GRID, generator=torch.Generator().manual_seed(seed))
        want = _reference(pred, codes, image, crf)
        got = predict_labels(pred, codes, SIZE, image=image, crf=CRFParams() if crf else None,
                             band_bytes=SMALL_BANDS)
        assert set(got) == set(want)
        for flag in want:
            assert got[flag].dtype == np.int16 and got[flag].shape == SIZE
            np.testing.assert_array_equal(got[flag], want[flag], err_msg=f"{kind} crf={flag}")
        one_band = predict_labels(pred, codes, SIZE, image=image, crf=CRFParams() if crf else None)
        for flag in want:  # below the band budget: the same calls as before, bit for bit
            np.testing.assert_array_equal(one_band[flag], want[flag])


def _reference_grid_crf(pred: dict, codes: torch.Tensor, image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The capped-grid CRF written out in one piece: logits of the codes upsampled to the grid, the image
    box-filtered to it (PIL), pydensecrf, the marginals upsampled bilinearly to the image, argmax."""
    from PIL import Image

    logits = predictor_logits(pred, F.interpolate(codes, size=grid, mode="bilinear", align_corners=False))[0]
    small = np.asarray(Image.fromarray(image).resize(grid[::-1], Image.BOX))
    q = torch.from_numpy(_reference_crf(small, logits.numpy(), CRFParams()))[None]
    return F.interpolate(q, size=image.shape[:2], mode="bilinear", align_corners=False)[0].argmax(0).numpy()


@pytest.mark.parametrize("kind", ["kmeans", "own", "linear", "retrieval"])
def test_crf_of_a_big_image_runs_on_the_capped_grid(predictors, kind):
    image, pred = _blobs(SIZE, seed=4), predictors[kind]
    codes = torch.randn(1, D, *GRID, generator=torch.Generator().manual_seed(5))
    within = predict_labels(pred, codes, SIZE, image=image, crf=CRFParams(), crf_max_pixels=SIZE[0] * SIZE[1])
    np.testing.assert_array_equal(within["yes"], _reference(pred, codes, image, True)["yes"])  # at its own size
    budget = 1200  # 61 x 83 -> 29 x 40
    grid = crf_grid(*SIZE, budget)
    assert grid == (29, 40)
    want = _reference_grid_crf(pred, codes, image, grid)
    got = predict_labels(pred, codes, SIZE, image=image, crf=CRFParams(), crf_max_pixels=budget)
    assert got["yes"].dtype == np.int16 and got["yes"].shape == SIZE
    np.testing.assert_array_equal(got["yes"], want)
    np.testing.assert_array_equal(got["no"], within["no"])  # the CRF-free labels stay at full size
    banded = predict_labels(pred, codes, SIZE, image=image, crf=CRFParams(), crf_max_pixels=budget,
                            band_bytes=SMALL_BANDS)
    assert (banded["yes"] == want).mean() > 0.999  # bands: the same values up to rounding


def test_confusion_in_bands_equals_one_update():
    rng = np.random.default_rng(3)
    pred = rng.integers(0, 7, (57, 31)).astype(np.int16)
    label = rng.integers(-1, 4, (57, 31)).astype(np.int16)
    cm = ConfusionMatrix(7, 4)
    cm.update(pred.astype(np.int64), label.astype(np.int64))
    np.testing.assert_array_equal(confusion(pred, label, 7, 4, pixels=100), cm.matrix)


def test_hierarchy_maps_equal_nearest_interpolation():
    class Levels:  # a hierarchical head: levels of its codes at feature resolution
        def codes(self, feats):
            return feats

        def levels(self, codes):
            return [codes[:, 0].long(), codes[:, 1].long() // 3]

    feats = torch.randint(0, 40, (1, 2, 5, 7)).float()
    got = hierarchy_maps(Levels(), feats, (43, 29))
    for lv, mine in zip(Levels().levels(feats), got):
        want = F.interpolate(lv[None].float(), size=(43, 29), mode="nearest")[0, 0].to(torch.int32).numpy()
        np.testing.assert_array_equal(mine, want)


# --- peak memory: a big image against a small one, each in its own process ------------------------

_WORK = textwrap.dedent("""
    import json, resource, sys, tempfile
    from pathlib import Path
    import numpy as np, torch
    from tasks.evaluate import confusion, predict_labels
    from usseg_core.viz import colorize, overlay, save_png, thumbnail

    h, w, head, crf = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "crf"
    torch.set_num_threads(1)
    yy, xx = np.arange(h)[:, None], np.arange(w)[None, :]  # broadcast: no (H, W) int64 grids
    image = np.empty((h, w, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = yy * 255 // h, xx * 255 // w, (yy + xx) * 127 // (h + w)
    label = np.empty((h, w), np.int16)  # what the evaluation keeps of a label
    label[:] = (yy * 3 // h + xx * 2 // w * 3) % 5
    grid = (h * 128 // max(h, w), w * 128 // max(h, w))  # the feature grid of the view capped at 1024 px
    from tasks.heads import load_head
    codes = load_head(head).codes(torch.randn(1, 472, *grid))  # (1, 70, h, w): a STEGO head's codes
    # evaluation: the head's own clusterer (with the dense CRF: its capped grid past 1 MP), counted
    from usseg_core.crf import CRFParams
    outs = predict_labels({"kind": "own", "path": head}, codes, (h, w), image=image, crf=CRFParams() if crf else None)
    pred = outs["yes" if crf else "no"]
    counted = confusion(pred, label, 5, 5).sum()
    kept = thumbnail(pred)
    # segmentation: the same labels written as PNGs and an overlay
    out = Path(tempfile.mkdtemp())
    save_png(out / "labels.png", pred.astype(np.uint8))
    save_png(out / "color.png", colorize(pred, 5))
    save_png(out / "overlay.png", overlay(image, pred, 5))
    print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "pixels": int(counted)}))
""")


def _peak_kb(h: int, w: int, head: str, crf: bool = False) -> int:
    done = subprocess.run([sys.executable, "-c", _WORK, str(h), str(w), head, "crf" if crf else "no"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["pixels"] == h * w  # every pixel counted
    return out["peak_kb"]


def test_big_image_peak_memory_within_twice_a_small_ones(tmp_path, crf=True):
    """With the CRF on: the same call also makes the CRF-free labels, so one run of each size covers both
    (the small image's CRF adds some 40 MB: it does not hide the no-CRF path's growth)."""
    torch.manual_seed(0)
    _save_stego_head(tmp_path / "head.pt", 472, 70, 5)
    head = str(tmp_path / "head.pt")
    small, big = _peak_kb(300, 400, head, crf), _peak_kb(3000, 4000, head, crf)
    # before the bands, the head's 70 channels upsampled to 3000 x 4000 in float32 took 3.4 GB; before the
    # capped grid, pydensecrf took about 300 bytes a pixel at K = 5 (3.6 GB)
    print(f"peak RSS {small / 1024:.0f} MB (400x300), {big / 1024:.0f} MB (4000x3000), crf={crf}")
    assert big < 2 * small, f"peak RSS {big / 1024:.0f} MB on 4000x3000 vs {small / 1024:.0f} MB on 400x300"

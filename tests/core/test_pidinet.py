"""PiDiNet: pixel-difference kernels against their definitions, strict checkpoint loading, BSDS sanity."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usseg_core.edges.pidinet import PiDiNet, PiDiNetConfig, load_pidinet, pdc_kernel
from usseg_core.errors import WeightsError

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
WEIGHTS = SHARED / "weights" / "pidinet"
BSDS = SHARED / "data" / "bsds500_sample"


def _brute(op: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Direct pixel-difference definitions (Su et al. 2021, Fig. 3) for one channel, zero padding."""
    h, wd = x.shape
    xp = np.pad(x, 2)
    out = np.zeros_like(x)
    ring = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]  # clockwise
    ring_k = [0, 1, 2, 5, 8, 7, 6, 3]  # flat 3x3 index of each ring position
    for i in range(h):
        for j in range(wd):
            v = lambda di, dj: xp[i + 2 + di, j + 2 + dj]  # noqa: E731
            acc = 0.0
            for n, (di, dj) in enumerate(ring):
                k = ring_k[n]
                if op == "cd":
                    acc += w.flat[k] * (v(di, dj) - v(0, 0))
                elif op == "ad":  # each tap minus its clockwise successor (release's order)
                    pdi, pdj = ring[(n + 1) % 8]
                    acc += w.flat[k] * (v(di, dj) - v(pdi, pdj))
                elif op == "rd":  # outer ring (x2) minus inner ring
                    acc += w.flat[k] * (v(2 * di, 2 * dj) - v(di, dj))
            out[i, j] = acc
    return out


@pytest.mark.parametrize("op", ["cd", "ad", "rd"])
def test_pdc_kernel_matches_definition(op):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 7, 8, generator=g, dtype=torch.float64)
    w = torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64)
    k, pad = pdc_kernel(op, w)
    y = F.conv2d(x, k, padding=pad)[0, 0].numpy()
    ref = _brute(op, x[0, 0].numpy(), w[0, 0].numpy())
    assert np.allclose(y, ref, atol=1e-10)


def test_cd_kernel_kills_constant_input():
    w = torch.randn(4, 1, 3, 3)
    for op in ("cd", "ad", "rd"):
        k, pad = pdc_kernel(op, w)
        assert torch.allclose(k.sum(dim=(2, 3)), torch.zeros(4, 1), atol=1e-6)  # differences: DC-free


def test_random_model_shapes_and_range():
    torch.manual_seed(0)
    net = PiDiNet(PiDiNetConfig(width=8, dil=4)).eval()
    with torch.no_grad():
        outs = net(torch.randn(1, 3, 37, 45))  # odd sizes: pooling floors, upsampling restores
    assert len(outs) == 5
    for o in outs:
        assert o.shape == (1, 1, 37, 45) and float(o.min()) >= 0 and float(o.max()) <= 1


def test_bad_checkpoint_is_a_weights_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pth"):
        load_pidinet(bad)
    torch.save({"state_dict": {"module.nope": torch.zeros(1)}}, tmp_path / "keys.pth")
    with pytest.raises(WeightsError, match="keys.pth"):
        load_pidinet(tmp_path / "keys.pth")


@pytest.mark.parametrize("variant,fname", [("pidinet", "table5_pidinet.pth"), ("pidinet-tiny", "table5_pidinet-tiny.pth")])
def test_release_checkpoint_loads_strictly(variant, fname):
    path = WEIGHTS / fname
    if not path.is_file():
        pytest.skip(f"PiDiNet weights not found at {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model = load_pidinet(path, variant)
    ours = set(model.state_dict())
    theirs = {k.removeprefix("module.") for k in sd}
    assert ours == theirs  # no missing, no unexpected keys
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd["module." + k])
    with pytest.raises(WeightsError):  # wrong variant for the file
        load_pidinet(path, "pidinet-tiny" if variant == "pidinet" else "pidinet")


def test_pidinet_fires_on_human_boundaries():
    path = WEIGHTS / "table5_pidinet-tiny.pth"
    if not path.is_file() or not (BSDS / "images").is_dir():
        pytest.skip(f"PiDiNet weights or BSDS sample missing under {SHARED}")
    from usseg_core.boundary_eval import load_bsds_gt
    from usseg_core.edges import get_edge_detector
    from usseg_core.imageio import read_rgb

    det = get_edge_detector("pidinet-tiny", weights=path)
    img = read_rgb(BSDS / "images" / "2018.jpg")
    e = det(img)
    assert e.strength.shape == img.shape[:2]
    gt = np.any(load_bsds_gt(BSDS / "groundTruth" / "2018.mat"), axis=0)
    on, off = e.strength[gt].mean(), e.strength[~gt].mean()
    assert on > 2.5 * off  # measured ~3.4x for the full model on this image


def test_pidinet_ods_far_above_chance():
    path = WEIGHTS / "table5_pidinet-tiny.pth"
    if not path.is_file() or not (BSDS / "images").is_dir():
        pytest.skip(f"PiDiNet weights or BSDS sample missing under {SHARED}")
    from usseg_core.boundary_eval import evaluate_dataset, evaluate_image, load_bsds_gt
    from usseg_core.edges import get_edge_detector
    from usseg_core.imageio import read_rgb
    from usseg_core.edges.orientation import edge_nms
    from scipy import ndimage as ndi

    det = get_edge_detector("pidinet-tiny", weights=path)
    th = np.array([0.2, 0.4, 0.6, 0.8])
    rng = np.random.default_rng(0)
    ours, base = [], []
    for i in ("2018", "6046"):
        gts = load_bsds_gt(BSDS / "groundTruth" / f"{i}.mat")
        e = det(read_rgb(BSDS / "images" / f"{i}.jpg"))
        ours.append(evaluate_image(edge_nms(e.strength, e.orientation), gts, th))
        noise = ndi.gaussian_filter(rng.random(e.strength.shape), 2.0)  # blurred noise, ridges like edges
        noise = (noise - noise.min()) / (noise.max() - noise.min())
        base.append(evaluate_image(edge_nms(noise.astype(np.float32), e.orientation), gts, th))
    f_ours, f_base = evaluate_dataset(ours)["ods_f"], evaluate_dataset(base)["ods_f"]
    assert f_ours > 0.6 and f_ours > f_base + 0.25

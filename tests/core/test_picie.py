"""PiCIE: weighted prototype CE by hand, the loss's four terms against a per-pixel loop, the reference's
raw centroids and warp-then-normalise on hand-computed cases, cluster weights, k-means against brute-force
Lloyd, training that learns, and a mid-epoch resume that is bit-identical."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from usseg_core.cluster import spherical_kmeans
from usseg_core.errors import ConfigError, InputError
from usseg_core.heads import HeadInputs, get_head
from usseg_core.heads.picie import (PicieConfig, PicieTrained, cluster_weights, over_clustering_weights,
                                    picie_loss, prototype_ce, pseudo_labels)
from usseg_core.heads.picie_train import train_picie_head, warp_view2
from usseg_core.viewbank import Geometry, warp_maps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prototype_ce_matches_a_hand_computed_weighted_mean():
    # Two pixels, D = 2, K = 2 centroids e0, e1; codes at angles 0 and 90 degrees.
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # (B=1, D=2, h=1, w=2)
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([[[0, 0]]])  # the second pixel is labelled with the far centroid
    weight = torch.tensor([0.25, 0.75])
    # pixel 1: logits (1, 0), target 0 -> -log(e/(e+1)); pixel 2: logits (0, 1), target 0 -> -log(1/(1+e))
    l1, l2 = -math.log(math.e / (math.e + 1)), -math.log(1 / (1 + math.e))
    want = (0.25 * l1 + 0.25 * l2) / (0.25 + 0.25)  # both targets are cluster 0: weight 0.25 each
    assert prototype_ce(codes, centroids, labels, weight).item() == pytest.approx(want, rel=1e-6)
    labels2 = torch.tensor([[[0, 1]]])
    want2 = (0.25 * l1 + 0.75 * -math.log(math.e / (1 + math.e))) / (0.25 + 0.75)
    assert prototype_ce(codes, centroids, labels2, weight).item() == pytest.approx(want2, rel=1e-6)


def test_cluster_weights_frequency_inverse_none():
    counts = torch.tensor([6.0, 3.0, 0.0, 1.0])
    assert torch.allclose(cluster_weights(counts, "frequency"), torch.tensor([0.6, 0.3, 0.0, 0.1]))
    # inverse: total / (K_used * count) = 10 / (3 * c), empty cluster 0
    assert torch.allclose(cluster_weights(counts, "inverse"), torch.tensor([10 / 18, 10 / 9, 0.0, 10 / 3]))
    assert torch.equal(cluster_weights(counts, "none"), torch.ones(4))
    with pytest.raises(ConfigError, match="balance"):
        cluster_weights(counts, "median")


def test_over_clustering_weights_damp_the_larger_k():
    l1, l2 = over_clustering_weights(27, 100)
    assert l1 + l2 == pytest.approx(1.0)
    assert l1 == pytest.approx(math.log(100) / (math.log(27) + math.log(100))) and l1 > l2


def _brute_ce(z: torch.Tensor, mu: torch.Tensor, y: torch.Tensor, w: torch.Tensor, kind: str) -> float:
    """Weighted prototype CE by a per-pixel loop in float64: logits <z, μ/|μ|> ("unit") or <z, μ> ("raw")."""
    mu = mu.double() / (mu.double().norm(dim=1, keepdim=True) if kind == "unit" else 1.0)
    num = den = 0.0
    for b in range(z.shape[0]):
        for i in range(z.shape[2]):
            for j in range(z.shape[3]):
                logits = [float(z[b, :, i, j].double() @ mu[k]) for k in range(mu.shape[0])]
                t = int(y[b, i, j])
                nll = math.log(sum(math.exp(v) for v in logits)) - logits[t]
                num, den = num + float(w[t]) * nll, den + float(w[t])
    return num / den


@pytest.mark.parametrize("kind", ["unit", "raw"])
def test_picie_loss_against_a_per_pixel_loop(kind):
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(2, 4, 3, 3, generator=g), dim=1)
    z2 = F.normalize(torch.randn(2, 4, 3, 3, generator=g), dim=1)
    c = {"lam": 1.0, "mu1": torch.randn(3, 4, generator=g), "mu2": torch.randn(3, 4, generator=g),
         "y1": torch.randint(0, 3, (2, 3, 3), generator=g), "y2": torch.randint(0, 3, (2, 3, 3), generator=g),
         "w1": torch.tensor([0.2, 0.3, 0.5]), "w2": torch.tensor([0.5, 0.25, 0.25])}
    loss, stats = picie_loss(z1, z2, [c], kind)
    l11 = _brute_ce(z1, c["mu1"], c["y1"], c["w1"], kind)
    l22 = _brute_ce(z2, c["mu2"], c["y2"], c["w2"], kind)
    l12 = _brute_ce(z1, c["mu2"], c["y2"], c["w2"], kind)  # cross: view 1 against view 2's clustering
    l21 = _brute_ce(z2, c["mu1"], c["y1"], c["w1"], kind)
    assert loss.item() == pytest.approx(((l12 + l21) / 2 + (l11 + l22) / 2) / 2, rel=1e-5)
    assert stats["loss_within"] == pytest.approx((l11 + l22) / 2, rel=1e-5)
    assert stats["loss_cross"] == pytest.approx((l12 + l21) / 2, rel=1e-5)
    loss_h, _ = picie_loss(z1, z2, [{**c, "lam": 0.6}, {**c, "lam": 0.4}], kind)
    assert loss_h.item() == pytest.approx(loss.item(), rel=1e-6)  # λ's sum to 1 over identical clusterings


def test_raw_centroids_label_score_and_assign_as_the_reference():
    z = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)  # a unit code
    mu = torch.tensor([[0.3, 0.0], [0.8, 0.8], [0.7, 0.3]])
    # unit: cosines (1, 0.7071, 0.9191) -> 0; raw: ||z − μ||² = (0.49, 0.68, 0.18) -> 2
    assert pseudo_labels(z, mu, "unit").item() == 0 and pseudo_labels(z, mu, "raw").item() == 2
    # the raw logits <z, μ> = (0.3, 0.8, 0.7): the reference's evaluation picks 1, not its pseudo-label
    trained = PicieTrained(2, 2, mu, kind="raw")
    assert torch.allclose(trained.cluster_logits(z)[0, :, 0, 0], 2 * torch.tensor([0.3, 0.8, 0.7]))
    assert trained.assign(z).item() == 1 and PicieTrained(2, 2, mu).assign(z).item() == 0
    one = torch.ones(3)
    # −log softmax(0.3, 0.8, 0.7)[2] and −log softmax(1, 0.7071, 0.9191)[0]
    assert prototype_ce(z, mu, torch.tensor([[[2]]]), one, "raw").item() == pytest.approx(1.0208, abs=1e-4)
    assert prototype_ce(z, mu, torch.tensor([[[0]]]), one, "unit").item() == pytest.approx(0.9815, abs=1e-4)


def test_view2_normalises_after_the_warp_as_the_reference():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # (B=1, D=2, h=1, w=2): (2, 0), (0, 1)
    ident = [Geometry()]  # a 1x1 output samples the midpoint of the two pixels
    after = warp_view2(z, ident, (1, 1), "after-warp")[0, :, 0, 0]  # normalise((1, 0.5))
    both = warp_view2(z, ident, (1, 1), "before-and-after-warp")[0, :, 0, 0]  # normalise((0.5, 0.5))
    assert torch.allclose(after, torch.tensor([0.8944, 0.4472]), atol=1e-4)
    assert torch.allclose(both, torch.tensor([0.7071, 0.7071]), atol=1e-4)


def _lloyd(x: np.ndarray, init: np.ndarray, iters: int = 100) -> np.ndarray:
    """Brute-force spherical Lloyd: assign by cosine, centroid = normalised mean, until nothing moves."""
    c = init / np.linalg.norm(init, axis=1, keepdims=True)
    for _ in range(iters):
        lab = (x @ c.T).argmax(1)
        new = np.stack([x[lab == j].sum(0) for j in range(len(c))])
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        if np.allclose(new, c):
            break
        c = new
    return c


def test_minibatch_kmeans_matches_brute_force_lloyd():
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(8, 8)))[0][:4]  # 4 orthonormal directions in 8-d
    x = np.concatenate([c + 0.15 * rng.normal(size=(300, 8)) for c in centres]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rng.shuffle(x)
    got = spherical_kmeans(lambda: (x[i:i + 128] for i in range(0, len(x), 128)), 4, n_epochs=3, seed=0,
                           device="cpu")
    want = _lloyd(x.astype(np.float64), got.astype(np.float64))  # Lloyd's fixed point from our answer
    cos = got @ want.T
    rows, cols = linear_sum_assignment(-cos)
    assert cos[rows, cols].min() > 0.999  # the mini-batch centroids sit at the Lloyd fixed point
    assert ((x @ got.T).argmax(1) == (x @ want[cols].T).argmax(1)).mean() > 0.995


class FakeBank:
    """An in-memory view bank with the ViewBank reading API (features drawn from two class prototypes)."""

    def __init__(self, n: int = 12, v: int = 3, c: int = 8, h: int = 6, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        protos = rng.normal(size=(2, c)).astype(np.float32)
        self.geoms = [[Geometry((rng.uniform(0, 0.3), rng.uniform(0, 0.3), 0.7, 0.7), bool(rng.random() < 0.5))
                       for _ in range(v)] for _ in range(n)]
        self.plain_arr = np.empty((n, v, c, h, h), np.float16)
        self.warped_arr = np.empty((n, v, c, h, h), np.float16)
        for i in range(n):
            lab = np.zeros((h, h), int)
            lab[:, rng.integers(1, h - 1):] = 1
            base = protos[lab].transpose(2, 0, 1)  # (C, h, w)
            for j in range(v):
                plain = base + 0.3 * rng.normal(size=base.shape)  # a photometric draw: noise
                self.plain_arr[i, j] = plain
                warped = warp_maps(torch.from_numpy(plain[None].astype(np.float32)), [self.geoms[i][j]])[0]
                self.warped_arr[i, j] = warped.numpy()
        self.n_images, self.n_views, self.shape = n, v, (c, h, h)

    def plain_batch(self, idx, vs):
        return torch.from_numpy(self.plain_arr[np.asarray(idx), np.asarray(vs)].astype(np.float32))

    def warped_batch(self, idx, vs):
        return torch.from_numpy(self.warped_arr[np.asarray(idx), np.asarray(vs)].astype(np.float32))

    def geometry(self, i, v):
        return self.geoms[i][v]


def _config(**kw):
    base = dict(dim=4, epochs=3, batch_size=4, kmeans_samples=500, kmeans_iters=5, checkpoint_every=2, log_every=1)
    return get_head("picie").config("synthetic", {**base, **kw})


def _equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_learns_and_records_epochs():
    banks = [FakeBank()]
    res = train_picie_head(HeadInputs(n_classes=2, views=banks), _config(epochs=4), device="cpu", progress=False)
    assert res.steps_done == 4 * 3  # 12 images / batch 4 = 3 steps per epoch
    epochs = [h for h in res.history if "epoch" in h]
    assert [h["epoch"] for h in epochs] == [0, 1, 2, 3] and "kmeans_used_2_v1" in epochs[0]
    steps = [h for h in res.history if "epoch" not in h]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert res.payload["centroids"].shape == (2, 4) and res.meta["steps_per_epoch"] == 3
    head = get_head("picie").load({"in_dim": 8, "code_dim": 4, "n_classes": 2, "head": res.payload["head"],
                                   "centroids": res.payload["centroids"],
                                   "config": {"picie": _config()["picie"].to_dict()}})
    feats = torch.from_numpy(banks[0].plain_arr[:, 0].astype(np.float32))
    codes = head.codes(feats)
    assert torch.allclose(codes.norm(dim=1), torch.ones(1), atol=1e-5)  # unit codes
    assert head.assign(codes).shape == (12, 6, 6)


def test_over_clustering_adds_a_second_clustering():
    res = train_picie_head(HeadInputs(n_classes=2, views=[FakeBank()]), _config(epochs=1, over_clustering=True,
                           k_over=5), device="cpu", progress=False)
    assert res.meta["k"] == [2, 5] and res.payload["centroids_over"].shape == (5, 4)


def _interrupt_and_resume(banks, cfg, ckpt: Path, full) -> None:
    """Stop a run at step 7 (epoch 1, step 3 of 4: the last checkpoint, step 6, is mid-epoch), resume it
    under another global seed, and check it ends exactly where the uninterrupted run ``full`` ended."""

    class Interrupt(Exception):
        pass

    def stop(step, _):
        if step == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_picie_head(HeadInputs(n_classes=2, views=banks), cfg, checkpoint_path=ckpt, device="cpu",
                         progress=False, on_step=stop)
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    torch.manual_seed(999)
    resumed = train_picie_head(HeadInputs(n_classes=2, views=banks), cfg, checkpoint_path=ckpt, device="cpu",
                               progress=False)
    _equal_states(full.payload["head"], resumed.payload["head"])
    assert torch.equal(full.payload["centroids"], resumed.payload["centroids"])
    assert full.history == resumed.history


def test_mid_epoch_interrupt_resumes_bit_identical(tmp_path: Path):
    banks = [FakeBank(), FakeBank(n=6, seed=1)]  # two splits: 18 images, 4 steps per epoch
    cfg = _config(epochs=2)
    torch.manual_seed(5)
    full = train_picie_head(HeadInputs(n_classes=2, views=banks), cfg, device="cpu", progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    _interrupt_and_resume(banks, cfg, ckpt, full)
    # another learning rate is not a resumable change
    with pytest.raises(InputError, match="lr"):
        train_picie_head(HeadInputs(n_classes=2, views=banks), _config(epochs=2, lr=0.5), checkpoint_path=ckpt,
                         device="cpu", progress=False)


def test_config_validation_and_presets():
    assert get_head("picie").config("cocostuff27")["picie"].lr == 1e-4  # [code:PiCIE] COCO script
    assert get_head("picie").config("camvid11")["picie"].lr == 1e-3  # paper
    with pytest.raises(ConfigError, match="balance"):
        PicieConfig(balance="sqrt")
    with pytest.raises(ConfigError, match="2 views"):
        train_picie_head(HeadInputs(n_classes=2, views=[FakeBank(v=1)]), _config(), device="cpu", progress=False)


_REFERENCE = dict(centroids="raw", kmeans="reference", normalise="after-warp", kmeans_init_images=8,
                  kmeans_update_images=4)


def test_reference_options_train_and_resume_bit_identical(tmp_path: Path):
    banks = [FakeBank(), FakeBank(n=6, seed=1)]  # 18 images: init on 8, then groups of 4, 4 and 2
    cfg = _config(epochs=2, **_REFERENCE)
    torch.manual_seed(5)
    full = train_picie_head(HeadInputs(n_classes=2, views=banks), cfg, device="cpu", progress=False)
    steps = [h for h in full.history if "epoch" not in h]
    assert all(math.isfinite(h["loss"]) for h in steps) and steps[-1]["loss"] < steps[0]["loss"]
    norms = full.payload["centroids"].norm(dim=1)
    assert (norms < 0.999).all()  # running means of unit codes, never renormalised
    ckpt = tmp_path / "checkpoint.pt"
    _interrupt_and_resume(banks, cfg, ckpt, full)
    # the run on the default options is another run: its checkpoint does not resume this one
    with pytest.raises(InputError, match="centroids"):
        train_picie_head(HeadInputs(n_classes=2, views=banks), _config(epochs=2), checkpoint_path=ckpt,
                         device="cpu", progress=False)


def test_reference_options_are_the_paper_datasets_defaults():
    for dataset in ("cocostuff27", "cityscapes27", "potsdam3"):
        cfg = get_head("picie").config(dataset)["picie"]
        assert (cfg.centroids, cfg.kmeans, cfg.normalise) == ("raw", "reference", "after-warp"), dataset
        assert (cfg.kmeans_init_images, cfg.kmeans_update_images) == (5120, 256)  # [code:PiCIE] 20 x 256, 256
    for dataset in ("camvid11", "directory", "synthetic"):
        cfg = get_head("picie").config(dataset)["picie"]
        assert (cfg.centroids, cfg.kmeans, cfg.normalise) == ("unit", "spherical-reservoir",
                                                              "before-and-after-warp"), dataset
    for name, bad in (("centroids", "normed"), ("kmeans", "lloyd"), ("normalise", "never"),
                      ("kmeans_init_images", 0), ("kmeans_update_images", 0)):
        with pytest.raises(ConfigError, match=name):
            PicieConfig(**{name: bad})

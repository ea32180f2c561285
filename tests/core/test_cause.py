"""CAUSE on hand-computed cases: the modularity objective and its gradient, the concept-fragment selection
through a hand-made clusterbook, each loss term, the EMA update, the concept bank, grid sampling, and a
bit-identical resume of the clusterbook fit and of both variants' training (front door and probe)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from usseg_core.errors import ConfigError, InputError
from usseg_core.heads import HeadInputs, get_head
from usseg_core.heads.cause import (CauseConfig, CauseTrained, ClusterbookConfig, ConceptBank, concept_masks,
                                    ema_update, feature_cell_box, front_door_loss, grid_sample,
                                    modularity_loss, nce_rows)
from usseg_core.heads.cause_train import fit_clusterbook, train_cause

pytestmark = pytest.mark.usefixtures("one_thread")


# --- modularity ----------------------------------------------------------------------------------------

def _direct_modularity(x: np.ndarray, centres: np.ndarray, temp: float) -> float:
    """−mean_b Q_b written out pair by pair (float64): A_ij = max(cos, 0) for i != j, d_i = Σ_j A_ij,
    e = Σ_ij A_ij, Q = Σ_ij (A_ij − d_i d_j / e) max_k tanh(C_ik C_jk / T) / e, C_ik = max(cos(x_i, c_k), 0)."""
    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    qs = []
    for img in x:
        p = len(img)
        a = np.array([[max(cos(img[i], img[j]), 0.0) if i != j else 0.0 for j in range(p)] for i in range(p)])
        d, e = a.sum(1), a.sum()
        c = np.array([[max(cos(img[i], ck), 0.0) for ck in centres] for i in range(p)])
        q = 0.0
        for i in range(p):
            for j in range(p):
                delta = max(math.tanh(c[i, k] * c[j, k] / temp) for k in range(len(centres)))
                q += (a[i, j] - d[i] * d[j] / e) * delta / e
        qs.append(q)
    return -float(np.mean(qs))


def test_modularity_of_two_perfect_communities_is_one_half_times_tanh():
    """Points e1, e1, e2, e2 and centres e1, e2: the textbook modularity 1/2 of two equal separated
    communities, times tanh(1 / T) (the soft co-assignment of a pair in the same concept)."""
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
    centres = torch.eye(2, dtype=torch.float64)
    loss = modularity_loss(centres, x, 0.1)
    assert float(loss) == pytest.approx(-0.5 * math.tanh(10.0), abs=1e-12)


def test_modularity_and_gradient_against_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    centres = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = modularity_loss(centres, x, 0.5)
    assert float(loss) == pytest.approx(_direct_modularity(x.numpy(), centres.detach().numpy(), 0.5), abs=1e-10)
    loss.backward()
    # central differences of the direct formula, entry by entry
    eps, c0 = 1e-6, centres.detach().numpy().copy()
    numeric = np.zeros_like(c0)
    for idx in np.ndindex(*c0.shape):
        up, down = c0.copy(), c0.copy()
        up[idx] += eps
        down[idx] -= eps
        numeric[idx] = (_direct_modularity(x.numpy(), up, 0.5) - _direct_modularity(x.numpy(), down, 0.5)) / (2 * eps)
    assert np.allclose(centres.grad.numpy(), numeric, atol=1e-6)
    assert np.abs(numeric).max() > 1e-3  # the check is not vacuous


def test_modularity_chunks_over_many_centres_agree():
    """More than one chunk of 256 centres gives the same value as the direct formula."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, 3, generator=g, dtype=torch.float64)
    centres = torch.randn(300, 3, generator=g, dtype=torch.float64)
    assert float(modularity_loss(centres, x, 0.2)) == pytest.approx(
        _direct_modularity(x.numpy(), centres.numpy(), 0.2), abs=1e-10)


# --- concept fragments ---------------------------------------------------------------------------------

BOOK = torch.tensor([[1.0, 0.0],            # 0: e1
                     [0.0, 1.0],            # 1: e2, cos(0, 1) = 0      -> negative (< 0.1)
                     [1.0, 1.0],            # 2: cos(0, 2) = 0.707     -> positive (> 0.3)
                     [-1.0, 0.0],           # 3: cos(0, 3) = -1        -> negative
                     [0.2, 0.98]])          # 4: cos(0, 4) = 0.2       -> neither


def test_concept_fragments_positive_and_negative_for_a_hand_made_book():
    pos, neg = concept_masks(torch.tensor([0, 1]), torch.tensor([0, 1, 2, 3, 4]), BOOK, 0.3, 0.1)
    # anchor concept 0 (e1):  same, e2, diagonal, −e1, nearly e2
    assert pos[0].tolist() == [True, False, True, False, False]
    assert neg[0].tolist() == [False, True, False, True, False]
    # anchor concept 1 (e2): cos with 0, 1, 2, 3, 4 = 0, 1, 0.707, 0, 0.98
    assert pos[1].tolist() == [False, True, True, False, True]
    assert neg[1].tolist() == [True, False, False, True, False]


def test_in_batch_pairs_exclude_the_anchor_itself_only():
    """One image of two tokens in concept 0 and one in concept 1: positives are the other token of
    concept 0 (not itself); the loss is the hand-computed InfoNCE of those pairs."""
    cfg = CauseConfig()
    concepts = torch.tensor([[0, 0, 1], [2, 3, 4]])
    proj = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], [[0.8, 0.6], [-1.0, 0.0], [0.0, -1.0]]],
                        dtype=torch.float64)
    ema = proj.flip(-1)  # teacher: x and y swapped
    loss, stats = front_door_loss(concepts, proj, ema, BOOK.double(), torch.zeros(0, dtype=torch.long),
                                  torch.zeros(0, 2), cfg)
    flat_c, s, e = concepts.reshape(-1), proj.reshape(-1, 2), ema.reshape(-1, 2)
    bn = torch.nn.functional.normalize(BOOK.double(), dim=1)
    per_image = []
    for b in range(2):
        total, n = 0.0, 0
        for i in range(3 * b, 3 * b + 3):
            cos_c = [float(bn[flat_c[i]] @ bn[flat_c[j]]) for j in range(6)]
            sims = [float(s[i] @ e[j]) / 0.07 for j in range(6)]
            chosen = [j for j in range(6) if (cos_c[j] > 0.3 and j != i) or cos_c[j] < 0.1]
            log_denominator = math.log(sum(math.exp(sims[j]) for j in chosen))
            for j in range(6):
                if cos_c[j] > 0.3 and j != i:
                    total += log_denominator - sims[j]
                    n += 1
        per_image.append(total / n)
    assert float(loss) == pytest.approx(sum(per_image) / 2, rel=1e-9)
    assert stats["terms"] == 2.0


def test_nce_rows_hand_computed():
    sim = torch.tensor([[0.5, 0.2, -0.1]], dtype=torch.float64)
    pos, neg = torch.tensor([[True, False, False]]), torch.tensor([[False, False, True]])
    total, count = nce_rows(sim, pos, neg, 0.5)
    # −1.0 + log(e^1.0 + e^−0.2): the middle pair (neither) is out of the denominator
    assert float(total) == pytest.approx(-1.0 + math.log(math.exp(1.0) + math.exp(-0.2)), rel=1e-12)
    assert int(count) == 1


def test_bank_term_uses_the_bank_concepts_and_no_self_exclusion():
    """With a bank, the loss averages 2 terms per image: in-batch and bank; the bank term by hand."""
    cfg = CauseConfig()
    concepts = torch.tensor([[0]]).expand(2, 1)
    proj = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    ema = proj.clone()
    bank_ids, bank = torch.tensor([0, 1]), torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)
    loss, stats = front_door_loss(concepts, proj, ema, BOOK.double(), bank_ids, bank, cfg)
    # in batch: image 0's anchor has image 1's token (concept 0) as positive and nothing else chosen
    in_batch = [math.log(math.exp(0.0)) - 0.0, math.log(math.exp(0.0)) - 0.0]
    # bank: concept 0 entry positive, concept 1 entry negative; anchors (1,0) and (0,1)
    b0 = -0.6 / 0.07 + math.log(math.exp(0.6 / 0.07) + math.exp(1.0 / 0.07))
    b1 = -0.8 / 0.07 + math.log(math.exp(0.8 / 0.07) + math.exp(0.0))
    assert float(loss) == pytest.approx((sum(in_batch) + b0 + b1) / 4, rel=1e-9)
    assert stats["terms"] == 4.0


def test_an_image_without_positives_is_left_out():
    cfg = CauseConfig()
    concepts = torch.tensor([[0], [1]])  # two images, one token each, orthogonal concepts: no positive pair
    proj = torch.randn(2, 1, 3, dtype=torch.float64, requires_grad=True)
    loss, stats = front_door_loss(concepts, proj, proj.detach(), BOOK.double(), torch.zeros(0, dtype=torch.long),
                                  torch.zeros(0, 3), cfg)
    assert float(loss) == 0.0 and stats["terms"] == 0.0
    loss.backward()  # still differentiable: a zero step, not NaN
    assert torch.isfinite(proj.grad).all()


# --- EMA, bank, grid -----------------------------------------------------------------------------------

def test_ema_update_hand_computed():
    student, teacher = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        student.weight.fill_(3.0), student.bias.fill_(-1.0)
        teacher.weight.fill_(1.0), teacher.bias.fill_(1.0)
    ema_update(student, teacher, 0.99)
    assert float(teacher.weight) == pytest.approx(0.99 * 1 + 0.01 * 3, abs=1e-7)
    assert float(teacher.bias) == pytest.approx(0.99 * 1 - 0.01 * 1, abs=1e-7)


def test_bank_keeps_the_newest_per_concept_in_concept_order():
    bank = ConceptBank(size=2, keep=1.0)
    g = torch.Generator().manual_seed(0)
    values = torch.arange(4, dtype=torch.float32).reshape(1, 4, 1)  # tokens 0..3
    bank.update(torch.tensor([[5, 5, 2, 5]]), values, g)
    ids, vals = bank.flat(1, torch.device("cpu"))
    assert ids.tolist() == [2, 5, 5]  # concept 2 then 5; concept 5 keeps 2 of its 3 (a random two)
    assert vals[0].item() == 2.0 and set(vals[1:, 0].tolist()) <= {0.0, 1.0, 3.0}
    bank.update(torch.tensor([[2, 2, 2, 2]]), values + 10, g)
    ids, vals = bank.flat(1, torch.device("cpu"))
    assert ids.tolist() == [2, 2, 5, 5] and set(vals[:2, 0].tolist()) <= {10.0, 11.0, 12.0, 13.0}  # oldest gone
    half = ConceptBank(size=100, keep=0.5)
    half.update(torch.tensor([[1, 1, 1, 1, 1]]), torch.zeros(1, 5, 1), g)
    assert len(half.flat(1, torch.device("cpu"))[0]) == 2  # int(5 * 0.5)
    restored = ConceptBank(size=2, keep=1.0)
    restored.load_state(bank.state(), torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(restored.flat(1, torch.device("cpu")), bank.flat(1, torch.device("cpu"))))


def test_grid_sampling_picks_the_ordered_token_of_each_block():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # 4 x 4 grid, token = row * 4 + col
    out = grid_sample(x, (4, 4), 2, torch.tensor([0, 3, 1, 2]))
    # blocks (row-major): TL picks (0,0)=0, TR picks (1,3)=7, BL picks (2,1)=9, BR picks (3,2)=14
    assert out.reshape(-1).tolist() == [0.0, 7.0, 9.0, 14.0]
    with pytest.raises(ConfigError, match="at least 4x4"):
        grid_sample(torch.zeros(1, 6, 1), (2, 3), 4, torch.zeros(0, dtype=torch.long))


def test_five_crop_cell_box():
    # 100 x 200 image, ratio 0.5: crops 50 x 100; short_side to 20 -> 20 x 40, centre 20 x 20 = crop cols 25..75
    view = {"policy": "five_crop", "resolution": 20, "crop_ratio": 0.5, "crop_resize": "short_side"}
    top, left, h, w = feature_cell_box(view, (100, 200), (2, 2), 1, 0, 0)  # crop 1 = top-right, cell (0, 0)
    assert (top, left, h, w) == pytest.approx((0.0, 100 + 25.0, 25.0, 25.0))
    squash = dict(view, crop_resize="squash")
    assert feature_cell_box(squash, (100, 200), (2, 2), 3, 1, 1) == pytest.approx((75.0, 150.0, 25.0, 50.0))


# --- training ------------------------------------------------------------------------------------------

def _features(n: int = 12, c: int = 6, hw=(4, 4), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, c))
    labels = rng.integers(0, 3, size=(n, *hw))
    return (centres[labels].transpose(0, 3, 1, 2) + 0.3 * rng.normal(size=(n, c, *hw))).astype(np.float32)


def _configs(variant: str, **over) -> dict:
    spec = get_head(f"cause-{variant}")
    sets = {"cause.batch_size": 4, "cause.epochs": 2, "cause.probe_epochs": 2, "cause.projection_dim": 8,
            "cause.dim": 5, "cause.grid": 2, "cause.checkpoint_every": 2, "cause.log_every": 1,
            "cause.tr_hidden": 16, "cause.bank_size": 5, **over}
    return spec.config("synthetic", sets)


def test_clusterbook_fit_raises_modularity_and_resumes_bit_identical(tmp_path: Path):
    feats = _features()
    cfg = ClusterbookConfig(concepts=5, epochs=4, batch_size=4, grid=2)
    full = fit_clusterbook(feats, settings=cfg, device="cpu", progress=False)
    assert full.history[-1]["modularity"] > full.history[0]["modularity"]

    class Stop(Exception):
        pass

    ckpt = tmp_path / "book.pt"
    import usseg_core.heads.cause_train as ct
    original = ct.BookMethod.step
    calls = {"n": 0}

    def step(self, plan, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise Stop
        return original(self, plan, batch)

    ct.BookMethod.step = step
    try:
        with pytest.raises(Stop):
            fit_clusterbook(feats, settings=cfg, checkpoint_path=ckpt, device="cpu", progress=False)
    finally:
        ct.BookMethod.step = original
    resumed = fit_clusterbook(feats, settings=cfg, checkpoint_path=ckpt, device="cpu", progress=False)
    assert np.array_equal(full.book, resumed.book) and full.history == resumed.history


@pytest.mark.parametrize("variant", ["mlp", "tr"])
def test_training_resumes_bit_identical_across_front_door_and_probe(variant: str, tmp_path: Path):
    feats = _features()
    book = fit_clusterbook(feats, settings=ClusterbookConfig(concepts=6, epochs=1, batch_size=4, grid=2),
                           device="cpu", progress=False).book
    inputs = HeadInputs(n_classes=3, features=feats, clusterbook=book)
    config = _configs(variant)
    full = train_cause(variant, inputs, config, device="cpu", progress=False)
    assert full.steps_done == (2 + 2) * 3  # 12 items / batch 4 = 3 steps an epoch
    assert full.meta == {"front_steps": 6, "probe_steps": 6}
    assert any("bank" in h and h["bank"] > 0 for h in full.history)  # the bank filled during the front door

    class Stop(Exception):
        pass

    ckpt = tmp_path / "cause.pt"
    with pytest.raises(Stop):  # stops after step 7: the last checkpoint (step 6) is the first probe step's eve
        train_cause(variant, inputs, config, checkpoint_path=ckpt, device="cpu", progress=False,
                    on_step=lambda s, _: (_ for _ in ()).throw(Stop) if s == 7 else None)
    resumed = train_cause(variant, inputs, config, checkpoint_path=ckpt, device="cpu", progress=False)
    for k, v in full.payload["head"].items():
        assert torch.equal(v, resumed.payload["head"][k]), k
    assert torch.equal(full.payload["probe"], resumed.payload["probe"])
    assert full.history == resumed.history
    with pytest.raises(InputError, match="different config"):
        train_cause(variant, inputs, _configs(variant, **{"cause.temperature": 0.1}), checkpoint_path=ckpt,
                    device="cpu", progress=False)

    # the trained head loads from its payload; TR resizes its query positions to another grid
    head = CauseTrained.from_checkpoint({"config": {"cause": config["cause"].to_dict()}, "n_classes": 3,
                                         **full.payload}).eval()
    codes = head.codes(torch.from_numpy(_features(n=2, hw=(6, 5))))
    assert codes.shape == (2, 5, 6, 5)
    logits = head.cluster_logits(codes)
    assert torch.allclose(logits.exp().sum(1), torch.ones(2, 6, 5), atol=1e-5)


def test_bad_settings_fail_with_one_line():
    with pytest.raises(ConfigError, match="cause.batch_size"):
        CauseConfig(batch_size=1)
    with pytest.raises(ConfigError, match="neg_thresh"):
        CauseConfig(pos_thresh=0.1, neg_thresh=0.3)
    with pytest.raises(ConfigError, match="clusterbook.concepts"):
        ClusterbookConfig(concepts=1)
    feats = _features(hw=(3, 3))
    with pytest.raises(ConfigError, match="grid=1"):
        fit_clusterbook(feats, settings=ClusterbookConfig(concepts=4, grid=4), device="cpu", progress=False)
    with pytest.raises(ConfigError, match="clusterbook of shape"):
        train_cause("mlp", HeadInputs(n_classes=3, features=_features(), clusterbook=np.zeros((4, 2))),
                    _configs("mlp"), device="cpu", progress=False)

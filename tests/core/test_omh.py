"""OMH add-on: level sizes, cluster / match losses against hand values, plan scaling, OMHLoss."""
from __future__ import annotations

import pytest
import torch

from usseg_core.errors import ConfigError
from usseg_core.heads.omh import (
    HierarchicalClusterHeads,
    OMHConfig,
    OMHLoss,
    cluster_loss,
    level_plan,
    level_sizes,
    match_loss,
)


def test_level_sizes() -> None:
    assert level_sizes(27, 3, 2.0) == [27, 54, 108]
    assert level_sizes(3, 3, 2.0) == [3, 6, 12]
    assert [h.shape for h in OMHLoss(70, 27).heads.centres] == [(27, 70), (54, 70), (108, 70)]
    assert OMHLoss(70, 3).sizes == [3, 6, 12]


def test_cluster_loss_hand_value() -> None:
    # two pixels: activations [0.2, 0.7, 0.1] and [0.5, 0.3, 0.0] -> -(0.7 + 0.5) / 2
    act = torch.tensor([[0.2, 0.5], [0.7, 0.3], [0.1, 0.0]]).reshape(1, 3, 1, 2).requires_grad_()
    loss = cluster_loss(act)
    assert loss.item() == pytest.approx(-0.6, abs=1e-7)
    loss.backward()
    expected = torch.zeros(1, 3, 1, 2)
    expected[0, 1, 0, 0] = expected[0, 0, 0, 1] = -0.5  # only the arg-max cluster gets gradient
    assert torch.equal(act.grad, expected)


def test_match_loss_hand_value() -> None:
    plan = torch.tensor([[1.0, 0.5, 0.0], [0.1, 0.0, 1.0]])
    fine = torch.tensor([0.2, 0.9, 0.5]).reshape(1, 3, 1, 1)
    coarse = torch.tensor([0.6, 0.1]).reshape(1, 2, 1, 1)
    # joint rows: [0.2, 0.45, 0] -> 0.45 ; [0.02, 0, 0.5] -> 0.5 ; |0.45-0.6| + |0.5-0.1| = 0.55
    assert match_loss(coarse, fine, plan).item() == pytest.approx(0.55 / 2, abs=1e-7)
    # the paper's scale: summed over the K_i = 2 coarse clusters at the one pixel
    assert match_loss(coarse, fine, plan, "pixel_sum").item() == pytest.approx(0.55, abs=1e-7)


def test_pixel_sum_reduction_sums_clusters_and_averages_pixels() -> None:
    torch.manual_seed(0)
    plan = torch.rand(3, 5)
    fine, coarse = torch.rand(2, 5, 4, 3), torch.rand(2, 3, 4, 3)
    # brute force: per image and pixel, sum over k of |max_l plan[k,l] fine[l,p] - coarse[k,p]|
    total = 0.0
    for b in range(2):
        for y in range(4):
            for x in range(3):
                for k in range(3):
                    total += abs(max(plan[k, l] * fine[b, l, y, x] for l in range(5)) - coarse[b, k, y, x])
    assert match_loss(coarse, fine, plan, "pixel_sum").item() == pytest.approx(float(total) / 24, rel=1e-6)
    assert match_loss(coarse, fine, plan).item() == pytest.approx(float(total) / 72, rel=1e-6)
    with pytest.raises(ConfigError, match="match_reduction"):
        OMHConfig(match_reduction="sum")


def test_match_loss_gradient_equals_direct_max() -> None:
    torch.manual_seed(0)
    a = torch.rand(3, 5, 4, 4, requires_grad=True)
    f = torch.rand(3, 9, 4, 4, requires_grad=True)
    p = torch.rand(5, 9, requires_grad=True)
    ours = match_loss(a, f, p)
    joint = p[None, :, :, None] * f.flatten(2)[:, None]  # (B, K_i, K_f, P)
    ref = (joint.max(dim=2).values - a.flatten(2)).abs().mean()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-7)
    for g1, g2 in zip(torch.autograd.grad(ours, (a, f, p)), torch.autograd.grad(ref, (a, f, p))):
        assert torch.allclose(g1, g2, atol=1e-7)


def _perfect_refinement() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coarse centres e0, e1; fine centres e0, e0, e1, e1 (each coarse centre duplicated);
    codes: 3 pixels on e0, 3 pixels on e1 (one-hot activations at both levels)."""
    eye = torch.eye(4)
    coarse = eye[:2].clone()  # (2, 4)
    fine = eye[[0, 0, 1, 1]].clone()  # (4, 4)
    codes = eye[[0, 1, 0, 1, 1, 0]].T.reshape(1, 4, 2, 3)  # (1, D=4, 2, 3)
    return coarse, fine, codes


def _acts(centres: list[torch.Tensor], codes: torch.Tensor) -> list[torch.Tensor]:
    heads = HierarchicalClusterHeads(codes.shape[1], [c.shape[0] for c in centres])
    with torch.no_grad():
        for p, c in zip(heads.centres, centres):
            p.copy_(c)
    return heads.activations(codes)


def test_plan_of_perfect_refinement_is_block_diagonal() -> None:
    coarse, fine, _ = _perfect_refinement()
    plan = level_plan(coarse, fine, 0.02, 200, "max")
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(plan, expected, atol=1e-6)


def test_match_loss_zero_for_perfect_refinement() -> None:
    coarse, fine, codes = _perfect_refinement()
    act_c, act_f = _acts([coarse, fine], codes)
    assert set(act_c.unique().tolist()) == {0.0, 1.0}  # one-hot, consistent activations
    plan = level_plan(coarse, fine, 0.02, 200, "max")
    assert match_loss(act_c, act_f, plan).item() <= 1e-5


def test_row_scaling_is_not_zero_for_perfect_refinement() -> None:
    # Why "max" is the default: with rows summing to 1 each of ρ = 2 children weighs 1/2, so the
    # winning coarse cluster is transported as 0.5 instead of 1: loss = (1 - 1/ρ)·1 / K_i = 0.25.
    coarse, fine, codes = _perfect_refinement()
    act_c, act_f = _acts([coarse, fine], codes)
    plan = level_plan(coarse, fine, 0.02, 200, "row")
    assert match_loss(act_c, act_f, plan).item() == pytest.approx(0.25, abs=1e-5)


def test_match_loss_positive_when_inconsistent() -> None:
    # Fine activations from the opposite assignment: every pixel's coarse cluster gets ~0 through
    # the plan (|0 - 1|) and the other coarse cluster gets 1 (|1 - 0|): mean over K_i = 2 is 1.
    coarse, fine, codes = _perfect_refinement()
    act_c, _ = _acts([coarse, fine], codes)
    _, act_f_swapped = _acts([coarse, fine], codes.flip(1).roll(-2, dims=1))  # e0 <-> e1
    plan = level_plan(coarse, fine, 0.02, 200, "max")
    assert match_loss(act_c, act_f_swapped, plan).item() == pytest.approx(1.0, abs=1e-5)


def test_omh_loss_forward_backward() -> None:
    torch.manual_seed(0)
    omh = OMHLoss(code_dim=8, n_classes=3)
    codes = torch.randn(2, 8, 5, 5, requires_grad=True)
    loss, stats = omh(codes)
    assert loss.ndim == 0 and torch.isfinite(loss)
    cfg = omh.config
    expected = cfg.w_cluster * sum(stats[f"cluster_{i}"] for i in range(3)) + cfg.w_match * sum(
        stats[f"match_{i}"] for i in range(2)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    for i in range(2):
        assert stats[f"sinkhorn_err_{i}"] < 1e-5
        k_fine = omh.sizes[i + 1]
        assert 1.0 <= stats[f"plan_children_{i}"] <= k_fine
    loss.backward()
    assert codes.grad is not None and torch.isfinite(codes.grad).all()
    assert codes.grad.abs().sum() > 0
    for h in omh.heads.centres:
        assert h.grad is not None and torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_grad_through_plan_switch() -> None:
    torch.manual_seed(1)
    on = OMHLoss(8, 3)
    off = OMHLoss(8, 3, OMHConfig(grad_through_plan=False))
    off.load_state_dict(on.state_dict())
    assert all(raw.requires_grad for raw, _ in on.plans())
    assert not any(raw.requires_grad for raw, _ in off.plans())
    codes = torch.randn(2, 8, 4, 4)
    l_on, _ = on(codes)
    l_off, _ = off(codes)
    assert l_on.item() == pytest.approx(l_off.item(), abs=1e-6)  # same value, different gradient
    l_on.backward()
    l_off.backward()
    assert not torch.allclose(on.heads.centres[0].grad, off.heads.centres[0].grad)


def test_single_level_is_cluster_loss_only() -> None:
    torch.manual_seed(2)
    omh = OMHLoss(8, 3, OMHConfig(n_levels=1))
    codes = torch.randn(2, 8, 4, 4)
    loss, stats = omh(codes)
    assert "match_0" not in stats
    assert loss.item() == pytest.approx(0.01 * stats["cluster_0"], rel=1e-6)


def test_fp32_under_autocast() -> None:
    torch.manual_seed(3)
    omh = OMHLoss(8, 3)
    codes = torch.randn(2, 8, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = omh(codes)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_training_reduces_loss() -> None:
    # Codes drawn around 3 directions; Adam on the centres alone (codes fixed) must lower the loss
    # (from ~0.09 to ~0.02 in 20 steps with this seed).
    torch.manual_seed(4)
    dirs = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    labels = torch.randint(0, 3, (4, 6, 6))
    codes = (dirs[labels] + 0.1 * torch.randn(4, 6, 6, 8)).permute(0, 3, 1, 2)  # (B, D, h, w)
    omh = OMHLoss(8, 3)
    opt = torch.optim.Adam(omh.parameters(), lr=5e-2)
    first = omh(codes)[0].item()
    for _ in range(30):
        opt.zero_grad()
        loss, _ = omh(codes)
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.03


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="plan_scale"):
        OMHConfig(plan_scale="sum")
    with pytest.raises(ConfigError, match="n_levels"):
        OMHConfig(n_levels=0)
    with pytest.raises(ConfigError, match="ot_eps"):
        OMHConfig(ot_eps=0.0)
    with pytest.raises(ValueError, match="codes must be"):
        OMHLoss(8, 3)(torch.randn(2, 7, 4, 4))

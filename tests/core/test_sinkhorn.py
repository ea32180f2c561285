"""Log-domain Sinkhorn: marginals, stability at small ε, LP limit, entropy vs ε, gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from usseg_core.sinkhorn import marginal_error, sinkhorn_log


def _entropy(plan: torch.Tensor) -> float:
    p = plan.double()
    return float(-(p * p.clamp_min(1e-300).log()).sum())


@pytest.mark.parametrize("shape", [(27, 54), (54, 108), (5, 7)])
def test_marginals_fp32_eps_002(shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    cost = torch.rand(*shape, dtype=torch.float32)
    plan = sinkhorn_log(cost, 0.02, n_iter=200)
    assert plan.dtype == torch.float32
    assert torch.isfinite(plan).all()
    n, m = shape
    rows, cols = plan.sum(1).double(), plan.sum(0).double()
    assert torch.allclose(rows, torch.full((n,), 1 / n, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(cols, torch.full((m,), 1 / m, dtype=torch.float64), atol=1e-4)
    assert float(marginal_error(plan.double())) < 1e-4


def test_marginals_small_eps_no_nan() -> None:
    # ε = 0.005 with costs up to 2: exp(-C/ε) = e^-400 underflows to 0 in fp32 (and fp64); the
    # log-domain iterations must still give finite, correctly normalised plans.
    torch.manual_seed(1)
    cost = 2 * torch.rand(27, 54, dtype=torch.float32)
    assert float(torch.exp(-cost / 0.005).min()) == 0.0  # the naive kernel would break here
    plan = sinkhorn_log(cost, 0.005, n_iter=3000, tol=1e-7)
    assert torch.isfinite(plan).all()
    assert float(marginal_error(plan.double())) < 1e-4


def test_custom_marginals() -> None:
    torch.manual_seed(2)
    cost = torch.rand(4, 6, dtype=torch.float64)
    r = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    c = torch.softmax(torch.randn(6, dtype=torch.float64), 0)
    plan = sinkhorn_log(cost, 0.05, r=r, c=c, n_iter=500)
    assert torch.allclose(plan.sum(1), r, atol=1e-6)
    assert torch.allclose(plan.sum(0), c, atol=1e-6)


def _lp_optimum(cost: np.ndarray) -> float:
    n, m = cost.shape
    a_eq = np.zeros((n + m, n * m))
    for i in range(n):
        a_eq[i, i * m : (i + 1) * m] = 1.0  # row sums
    for j in range(m):
        a_eq[n + j, j::m] = 1.0  # column sums
    b_eq = np.concatenate([np.full(n, 1 / n), np.full(m, 1 / m)])
    res = linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    assert res.success
    return float(res.fun)


def test_small_eps_approaches_lp_optimum() -> None:
    # Entropic OT cost exceeds the LP optimum by at most ε·log(n·m) (= 0.025 here); with a unique
    # LP vertex it is much closer. A plan ignoring the cost (uniform) would be ~0.15 off.
    rng = np.random.default_rng(3)
    cost = rng.random((3, 4))
    opt = _lp_optimum(cost)
    plan = sinkhorn_log(torch.from_numpy(cost), 0.01, n_iter=2000, tol=1e-10)
    value = float((plan * torch.from_numpy(cost)).sum())
    uniform = float(cost.mean())
    assert uniform - opt > 0.05  # the test problem is not degenerate
    assert value >= opt - 1e-9
    assert value - opt < 1e-3
    # larger ε moves away from the LP optimum
    plan_big = sinkhorn_log(torch.from_numpy(cost), 0.1, n_iter=2000)
    value_big = float((plan_big * torch.from_numpy(cost)).sum())
    assert value_big - opt > value - opt


def test_entropy_increases_with_eps() -> None:
    # λ is the entropic WEIGHT (OMH Table 7: larger λ -> less sparse), not 1/λ as in OMH Eq. 7.
    torch.manual_seed(4)
    cost = torch.rand(27, 54)
    ents = [_entropy(sinkhorn_log(cost, eps, n_iter=500)) for eps in (0.02, 0.05, 0.1)]
    assert ents[0] < ents[1] < ents[2]
    assert ents[2] < np.log(27 * 54)  # never more than the uniform plan


def test_gradient_finite_and_nonzero() -> None:
    torch.manual_seed(5)
    for eps in (0.02, 0.005):
        cost = torch.rand(6, 9, requires_grad=True)
        plan = sinkhorn_log(cost, eps, n_iter=300)
        target = torch.rand(6, 9)
        (plan * target).sum().backward()
        assert torch.isfinite(cost.grad).all()
        assert cost.grad.abs().sum() > 0


def test_gradient_matches_finite_difference() -> None:
    # Unrolled autograd through converged iterations ≈ derivative of the converged plan.
    torch.manual_seed(6)
    cost = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 4, dtype=torch.float64)

    def f(c: torch.Tensor) -> torch.Tensor:
        return (sinkhorn_log(c, 0.1, n_iter=500, tol=0) * w).sum()

    assert torch.autograd.gradcheck(f, (cost,), eps=1e-6, atol=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_log(torch.rand(3), 0.1)
    with pytest.raises(ValueError, match="eps"):
        sinkhorn_log(torch.rand(3, 3), 0.0)

"""Entropic optimal transport by log-domain Sinkhorn iterations.

Solves, for a cost matrix C (n, m) and marginals r (n,), c (m,) that each sum to 1,

    P* = argmin_{P >= 0, P 1 = r, P^T 1 = c}  <P, C> - eps * H(P),   H(P) = -sum P log P,

whose solution is P = diag(u) K diag(v) with kernel K = exp(-C / eps).

Conventions (OMH, docs/methods/omh.md §4.2 and §6.19):
- ``eps`` is the entropic *weight*. Larger eps gives a blurrier, higher-entropy plan. This is the
  reading that fits OMH Table 7 (λ = 0.02 sparsest, 0.1 most diffuse), not the ``1/λ`` printed in
  OMH Eq. 7.
- All arithmetic runs on log-potentials with ``logsumexp`` in float64, whatever the input dtype.
  The naive kernel exp(-C/eps) underflows in fp32 once C/eps > ~87 (e.g. C = 1, eps < 0.0115),
  which is the NaN OMH reports for λ < 0.02; in the log domain nothing is ever exponentiated
  except the final plan, and float64 keeps the potentials accurate for eps down to ~1e-3.
- The iterations are plain differentiable torch ops, so autograd unrolls them: gradients of any
  function of the plan reach the cost (and whatever produced it).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# How often the (host-synchronising) convergence check runs. A check every iteration would force
# one GPU->CPU sync per iteration; every 10 keeps the overshoot below 10 cheap iterations.
_CHECK_EVERY = 10


def sinkhorn_log(
    cost: Tensor,
    eps: float,
    *,
    r: Tensor | None = None,
    c: Tensor | None = None,
    n_iter: int = 100,
    tol: float = 1e-6,
) -> Tensor:
    """Entropic OT plan for ``cost`` with entropic weight ``eps`` (log-domain Sinkhorn).

    Args:
        cost: (n, m) transport cost, any float dtype (computed in float64 internally).
        eps: entropic weight (> 0); kernel exp(-cost / eps). Larger eps -> higher-entropy plan.
        r: (n,) row marginal summing to 1; default uniform 1/n.
        c: (m,) column marginal summing to 1; default uniform 1/m.
        n_iter: maximum number of (row, column) update pairs.
        tol: stop early once the largest absolute row-marginal error is below ``tol`` (column
            marginals are exact after each column update, up to rounding). Checked every
            10 iterations; ``tol <= 0`` always runs ``n_iter`` iterations.

    Returns:
        (n, m) plan in ``cost.dtype`` with row sums ≈ r and column sums ≈ c; total mass 1.
        Differentiable with respect to ``cost`` (and to ``r`` / ``c`` if they require grad).
    """
    if cost.ndim != 2:
        raise ValueError(f"sinkhorn_log: cost must be 2-D (n, m), got shape {tuple(cost.shape)}")
    if n_iter < 1:
        raise ValueError(f"sinkhorn_log: n_iter must be >= 1, got {n_iter}")
    if not eps > 0:
        raise ValueError(f"sinkhorn_log: eps must be > 0, got {eps}")
    n, m = cost.shape
    dev = cost.device
    log_r = (
        torch.full((n,), -math.log(n), dtype=torch.float64, device=dev)
        if r is None
        else torch.log(r.to(torch.float64))
    )  # (n,)
    log_c = (
        torch.full((m,), -math.log(m), dtype=torch.float64, device=dev)
        if c is None
        else torch.log(c.to(torch.float64))
    )  # (m,)
    log_k = -cost.to(torch.float64) / eps  # (n, m) log-kernel; never exponentiated on its own

    log_v = torch.zeros(m, dtype=torch.float64, device=dev)  # (m,)
    for it in range(n_iter):
        log_u = log_r - torch.logsumexp(log_k + log_v[None, :], dim=1)  # (n,) rows match r
        log_v = log_c - torch.logsumexp(log_k + log_u[:, None], dim=0)  # (m,) cols match c
        if tol > 0 and (it + 1) % _CHECK_EVERY == 0 and it + 1 < n_iter:
            with torch.no_grad():
                row_log = torch.logsumexp(log_k + log_u[:, None] + log_v[None, :], dim=1)  # (n,)
                err = (row_log.exp() - log_r.exp()).abs().max()
            if err.item() < tol:
                break
    plan = torch.exp(log_u[:, None] + log_k + log_v[None, :])  # (n, m)
    return plan.to(cost.dtype)


def marginal_error(plan: Tensor, r: Tensor | None = None, c: Tensor | None = None) -> Tensor:
    """Largest absolute deviation of the plan's row / column sums from ``r`` / ``c``.

    Args:
        plan: (n, m) transport plan.
        r, c: target marginals (n,), (m,); default uniform.

    Returns:
        0-d tensor (same dtype as ``plan``), max over rows and columns of |sum - target|.
    """
    n, m = plan.shape
    r = torch.full((n,), 1.0 / n, dtype=plan.dtype, device=plan.device) if r is None else r
    c = torch.full((m,), 1.0 / m, dtype=plan.dtype, device=plan.device) if c is None else c
    row_err = (plan.sum(dim=1) - r).abs().max()
    col_err = (plan.sum(dim=0) - c).abs().max()
    return torch.maximum(row_err, col_err)

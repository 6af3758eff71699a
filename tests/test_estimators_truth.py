"""Stochastic estimators graded against the truth by Monte Carlo: 300 independent runs (seeds) on a dense
matrix whose exact trace, Frobenius norm, diagonal and 1-1 norm are known. Their spread across seeds must be
the closed-form standard error computed from H, and the standard error each run *reports* must be that too
(an estimator graded only against its own reported error can be scaled and inflated together unnoticed)."""
import numpy as np
import pytest
import torch

from rayexp.hessian.estimators import hutchinson, l11_row_sample
from rayexp.hessian.operator import FunctionOperator

RUNS, N = 300, 16


@pytest.fixture(scope="module")
def H():
    g = torch.Generator().manual_seed(11)
    a = torch.randn(40, 40, dtype=torch.float64, generator=g)
    return a + a.T + torch.diag(torch.linspace(-3.0, 6.0, 40, dtype=torch.float64))


def op_of(H):
    return FunctionOperator(lambda v: H @ v, H.shape[0])


def rademacher_se(A: torch.Tensor, n: int) -> float:
    """SE of the mean of n draws of vᵀAv, v Rademacher: Var = 2(‖A‖_F² − Σ A_ii²)."""
    return (2 * (float((A ** 2).sum()) - float((A.diagonal() ** 2).sum())) / n) ** 0.5


@pytest.fixture(scope="module")
def runs(H):
    op = op_of(H)
    return [hutchinson(op, probes=N, seed=s, chunk=N) for s in range(RUNS)]


@pytest.mark.parametrize("key, truth, A", [("trace", lambda H: H.trace(), lambda H: H),
                                           ("frobenius_sq", lambda H: (H ** 2).sum(), lambda H: H @ H)])
def test_hutchinson_spread_and_reported_se_equal_the_closed_form(H, runs, key, truth, A):
    est = np.array([r[key] for r in runs])
    reported = np.array([r[f"{key}_se"] for r in runs])
    se = rademacher_se(A(H), N)
    assert abs(est.mean() - float(truth(H))) <= 4 * se / RUNS ** 0.5  # unbiased
    assert 0.85 < est.std(ddof=1) / se < 1.15  # the spread of the estimate is the closed form's
    assert 0.85 < reported.mean() / se < 1.1  # and so is what each run reports
    z = (est - float(truth(H))) / reported
    assert 0.9 < np.mean(np.abs(z) < 2) < 0.99  # ~95% of runs cover the truth within 2 reported SEs


def test_hutchinson_diagonal_spread_is_the_off_diagonal_row_norm(H, runs):
    """diag estimate: mean of v ⊙ Hv, entry i has Var = Σ_{j≠i} H_ij² per probe."""
    est = torch.stack([r["diag"] for r in runs]).numpy()
    se = np.sqrt(((H ** 2).sum(1) - H.diagonal() ** 2).numpy() / N)
    assert np.all(np.abs(est.mean(0) - H.diagonal().numpy()) <= 4.5 * se / RUNS ** 0.5)
    assert np.allclose(est.std(0, ddof=1) / se, 1.0, atol=0.2)


def test_l11_row_sample_spread_and_reported_se_equal_sampling_without_replacement(H):
    """(d/s) Σ_{i∈S} ‖H_i‖₁ over a uniform s-subset: Var = d² S²/s (1 − s/d), S² the rows' variance (ddof 1)."""
    rows = H.abs().sum(1).numpy()
    d, s = len(rows), 10
    samples = [l11_row_sample(op_of(H), s, seed=k, chunk=s) for k in range(RUNS)]
    est = np.array([x["l11_sample"] for x in samples])
    reported = np.array([x["l11_sample_se"] for x in samples])
    se = d * rows.std(ddof=1) / s ** 0.5 * (1 - s / d) ** 0.5
    assert abs(est.mean() - rows.sum()) <= 4 * se / RUNS ** 0.5
    assert 0.85 < est.std(ddof=1) / se < 1.15
    assert 0.85 < reported.mean() / se < 1.1

"""Hessian-estimator edges that surviving mutants showed no test reached, each against an independent reference
(dense ``eigh``/``eigvalsh``, a numpy formula, or hand-computed values):

- ``assemble`` keeps float64 when it embeds a process's part; ``block_grad_norms`` on a span not starting at 0;
- ``block_curvature`` passes ``chunk`` on (each product call carries at most ``chunk`` vectors);
- ``block_power`` is the largest positive eigenvalue of each dense block; ``first_positive`` falls back to the max;
- power iteration stops as soon as λ has converged (two products per eigenvalue on c·I), not after ``iters``;
- ``default_curvature_blocks`` drops biases and positions; Lanczos on an operator without a ``precision``;
- ``slq_blocks`` honours ``indices`` (nodes/weights = eigh of H_bb and (Uᵀv₀)²/‖v₀‖²) and forwards ``callback``;
- ``Quadrature.density`` renormalizes a truncated grid and leaves an all-zero density as zeros;
  ``Quadrature.masses`` for a wide σ; ``Quadrature.scale('top10')`` by hand.
"""
import numpy as np
import pytest
import torch
from scipy.stats import norm

from rayexp.hessian.estimators import (assemble, block_curvature, block_grad_norms, block_power,
                                       default_curvature_blocks)
from rayexp.hessian.lanczos import first_positive, lanczos_runs, power_iteration
from rayexp.hessian.operator import Block, FunctionOperator
from rayexp.hessian.probes import probe
from rayexp.hessian.slq import SIGMA2, Quadrature, slq_blocks


def spectrum_matrix(eigs, seed=0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


def block_diag(*mats) -> np.ndarray:
    n = sum(len(m) for m in mats)
    out, i = np.zeros((n, n)), 0
    for m in mats:
        out[i:i + len(m), i:i + len(m)] = m
        i += len(m)
    return out


class PartOp:
    """One process's view of a d-vector: only ``span`` held, ``reduce`` the identity (a lone shard)."""

    def __init__(self, d, span):
        self.d, self.span, self.device, self.dtype = d, span, torch.device("cpu"), torch.float64

    def reduce(self, x):
        return x


class Recording(FunctionOperator):
    """A dense-matrix operator that records the number of vectors of each ``matmat`` call, with a gradient."""

    def __init__(self, H: np.ndarray, g: np.ndarray, calls: list):
        Ht = torch.from_numpy(H)
        super().__init__(lambda v: Ht @ v, len(H))
        self.g, self.calls = torch.from_numpy(g), calls

    def matmat(self, V):
        self.calls.append(len(V))
        return super().matmat(V)

    def grad(self):
        return self.g.clone()


class Batches:
    """``block_curvature``'s operator: ``n_batches`` and ``for_batch(i)``, each batch its own dense H_i and g_i."""

    def __init__(self, Hs, gs):
        self.Hs, self.gs, self.n_batches, self.count, self.calls = Hs, gs, len(Hs), 0, []

    def for_batch(self, i):
        return Recording(self.Hs[i], self.gs[i], self.calls)


class Minimal:
    """A ``HessianOperator`` with exactly the protocol's attributes (no ``precision``)."""

    def __init__(self, A: np.ndarray):
        self.A, self.d, self.span = torch.from_numpy(A), len(A), slice(0, len(A))
        self.device, self.dtype, self.blocks, self.count = torch.device("cpu"), torch.float64, [], 0

    def matvec(self, v):
        return self.matmat(v.reshape(1, -1))[0]

    def matmat(self, V):
        self.count += len(V)
        return V.to(torch.float64) @ self.A.T

    def reduce(self, x):
        return x


# -- estimators ---------------------------------------------------------------------------------------------
def test_assemble_embeds_a_float64_part_exactly_in_zeros():
    op = PartOp(6, slice(2, 5))
    x = torch.tensor([1.0 + 1e-12, -2.0, 3.0 + 1e-13], dtype=torch.float64)
    full = assemble(op, x)
    assert full.dtype == torch.float64
    assert full.tolist() == [0.0, 0.0, 1.0 + 1e-12, -2.0, 3.0 + 1e-13, 0.0]


def test_block_grad_norms_on_a_span_that_starts_inside_the_vector():
    """Process holding [4, 10) of a 10-vector: each block's norm is that of its part inside the span only."""
    op = PartOp(10, slice(4, 10))
    g = torch.tensor([3.0, 4.0, 1.0, 2.0, 2.0, 1.0], dtype=torch.float64)  # entries 4..9
    blocks = [Block("a", "a", 0, 3), Block("b", "b", 3, 6), Block("c", "c", 6, 8), Block("d", "d", 8, 10)]
    # a: nothing held; b: entries 4, 5 = (3, 4); c: 6, 7 = (1, 2); d: 8, 9 = (2, 1)
    assert np.allclose(block_grad_norms(op, g, blocks), [0.0, 5.0, 5 ** 0.5, 5 ** 0.5], rtol=1e-14, atol=0)


def test_block_curvature_passes_chunk_so_each_product_carries_at_most_chunk_vectors():
    """chunk=1: every product call holds one block vector (the memory plan's bound), and the array is still
    [eigvalsh(H_bb)[-1], ‖g_b‖] per batch and block."""
    Hs = [block_diag(spectrum_matrix([5.0, 1.0, -2.0, 0.5], 1), spectrum_matrix([-3.0, 2.0, 0.1, 0.7, 1.5], 2)),
          block_diag(spectrum_matrix([-1.0, -4.0, -0.5, -2.0], 3), spectrum_matrix([9.0, 0.0, 1.0, 3.0, 4.0], 4))]
    gs = [np.arange(1.0, 10.0), np.linspace(-1.0, 2.0, 9)]
    blocks = [Block("a", "a", 0, 4), Block("b", "b", 4, 9)]
    op = Batches(Hs, gs)
    arr = block_curvature(op, blocks, steps=5, seed=0, chunk=1)
    assert op.calls and max(op.calls) == 1
    for i, (H, g) in enumerate(zip(Hs, gs)):
        for j, b in enumerate(blocks):
            assert arr[i, j, 0] == pytest.approx(np.linalg.eigvalsh(H[b.slice, b.slice])[-1], rel=1e-9)
            assert arr[i, j, 1] == pytest.approx(np.linalg.norm(g[b.slice]), rel=1e-12)
    op2 = Batches(Hs, gs)  # the default (chunk=0): both blocks share each product
    block_curvature(op2, blocks, steps=5, seed=0)
    assert max(op2.calls) == 2


def test_block_power_is_the_largest_positive_eigenvalue_of_each_dense_block():
    """Deflated power iteration finds eigenvalues by decreasing |λ|, so its first positive one is the largest
    positive eigenvalue: 6 (dominant positive) and 3 (after the dominant −8)."""
    A = spectrum_matrix([6.0, 1.0, 0.5, -0.2], 5)
    B = spectrum_matrix([-8.0, 3.0, 1.0, 0.5, -0.1], 6)
    H = torch.from_numpy(block_diag(A, B))
    op = FunctionOperator(lambda v: H @ v, 9)
    blocks = [Block("a", "a", 0, 4), Block("b", "b", 4, 9)]
    got = block_power(op, blocks, top_n=5, iters=500, tol=1e-10)
    ref = [max(e for e in np.linalg.eigvalsh(M) if e > 0) for M in (A, B)]
    assert np.allclose(got, ref, rtol=1e-5)


def test_first_positive_without_a_positive_is_the_largest():
    assert first_positive(np.array([-3.0, -1.0, -2.0])) == -1.0
    assert first_positive(np.array([-3.0, 0.5, 2.0])) == 0.5


def test_power_iteration_stops_once_lambda_has_converged():
    """On 3·I every Rayleigh quotient is 3: one product gives λ, a second confirms it (|Δλ|/|λ| ~ 1e-6 < tol),
    so k eigenvalues cost 2k products, far fewer than ``iters``."""
    op = FunctionOperator(lambda v: 3.0 * v, 5)
    for k in (1, 2):
        eigs, used = power_iteration(op, k=k, iters=50, tol=1e-3)
        assert used == 2 * k
        assert np.allclose(eigs, [3.0] * k, rtol=1e-5)


def test_default_curvature_blocks_drop_biases_and_positions():
    names = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
             "transformer.h.0.ln_1.bias", "transformer.h.0.attn.c_attn.weight.q", "transformer.h.0.attn.c_attn.bias",
             "transformer.h.0.mlp.c_fc.bias", "lm_head.weight"]
    blocks = [Block(n, n, i, i + 1) for i, n in enumerate(names)]
    assert [b.name for b in default_curvature_blocks(blocks)] == [
        "transformer.wte.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight.q",
        "lm_head.weight"]


# -- Lanczos ------------------------------------------------------------------------------------------------
def test_lanczos_on_an_operator_without_precision_is_fp64_and_exact():
    """The protocol does not require ``precision``: such an operator is fp64 (float64 basis), and d full
    Lanczos steps give eigvalsh."""
    A = spectrum_matrix([4.0, -1.0, 2.5, 0.3, -3.0, 1.0], 7)
    op, kept = Minimal(A), []
    T = lanczos_runs(op, [torch.ones(6, dtype=torch.float64)], 6, "full", keep=kept)[0]
    assert kept[0].Q.dtype == torch.float64
    assert np.allclose(T.eig()[0], np.linalg.eigvalsh(A), rtol=1e-10, atol=1e-10)


# -- SLQ ----------------------------------------------------------------------------------------------------
def test_slq_blocks_uses_the_probe_indices_asked_for():
    """indices=[3, 7]: two rows per block, row r the Gauss quadrature of probe indices[r] on H_bb, i.e.
    nodes = eigh(H_bb) values and weights = (Uᵀv₀)²/‖v₀‖² for v₀ = probe (seed, 'slq/<name>', index)."""
    A = spectrum_matrix([4.0, 1.0, -2.0, 0.5], 8)
    B = spectrum_matrix([3.0, -1.5, 0.2, 6.0, 1.1], 9)
    H = torch.from_numpy(block_diag(A, B))
    op = FunctionOperator(lambda v: H @ v, 9)
    blocks = [Block("a", "a", 0, 4), Block("b", "b", 4, 9)]
    quads = slq_blocks(op, blocks, steps=5, seed=4, indices=[3, 7], reorth="full")
    for b, M in zip(blocks, (A, B)):
        lam, U = np.linalg.eigh(M)
        q = quads[b.name]
        assert q.nodes.shape == (2, b.size)
        for r, i in enumerate([3, 7]):
            v0 = probe(b.size, "gaussian", 4, i, f"slq/{b.name}").numpy()
            assert np.allclose(q.nodes[r], lam, rtol=1e-9, atol=1e-9)
            assert np.allclose(q.weights[r], (U.T @ v0) ** 2 / (v0 @ v0), rtol=1e-7, atol=1e-10)


def test_slq_blocks_forwards_lanczos_keywords():
    """``callback`` (a Lanczos keyword) gets the number of active runs at every lockstep step: 2 blocks × 1
    probe for 3 steps."""
    H = torch.from_numpy(spectrum_matrix(np.arange(1.0, 9.0), 10))
    op = FunctionOperator(lambda v: H @ v, 8)
    calls = []
    slq_blocks(op, [Block("a", "a", 0, 4), Block("b", "b", 4, 8)], probes=1, steps=3, callback=calls.append)
    assert calls == [2, 2, 2]


def test_density_on_a_grid_holding_half_the_mass_is_renormalized_to_one():
    """Node 0 (weight 1), grid [0, 0.05]: the grid holds half the Gaussian, so the renormalized density is
    twice N(t; 0, σ²), exactly exp(−t²/2σ²) over its trapezoid integral."""
    q = Quadrature(np.array([[0.0, 1.0]]), np.array([[1.0, 0.0]]))
    grid = np.linspace(0.0, 0.05, 2001)
    _, phi = q.density(grid)
    ref = np.exp(-grid ** 2 / (2 * SIGMA2))
    ref /= np.trapezoid(ref, grid)
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, rel=1e-12)
    assert np.allclose(phi, ref, rtol=1e-9, atol=1e-12)


def test_density_far_from_every_node_is_zero_not_nan():
    q = Quadrature(np.array([[0.0, 1.0]]), np.array([[0.5, 0.5]]))
    grid = np.linspace(5.0, 6.0, 100)
    with np.errstate(all="raise"):
        _, phi = q.density(grid)
    assert np.array_equal(phi, np.zeros(100))


def test_masses_with_a_wide_sigma_are_the_normal_cell_probabilities():
    """σ = 2 on a unit grid: cell probabilities of N(0.3, 4) (scipy.stats.norm), summing to 1."""
    q = Quadrature(np.array([[0.3, 5.0]]), np.array([[1.0, 0.0]]))
    grid = np.arange(-50.0, 51.0)
    edges = np.concatenate([[-np.inf], (grid[1:] + grid[:-1]) / 2, [np.inf]])
    ref = np.diff(norm(0.3, 2.0).cdf(edges))
    got = q.masses(grid, sigma2=4.0)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(got, ref, rtol=1e-9, atol=1e-15)


def test_top10_scale_by_hand():
    """Probe 1: nodes 1..12 (two padded with weight 0): 10th largest = 3. Probe 2: three nodes −9, −8, −7 (fewer
    than 10): its smallest, −9. |mean(3, −9)| = 3."""
    nodes = np.array([list(range(12, 0, -1)) + [50.0, 60.0], [-7.0, -9.0, -8.0] + [100.0] * 11])
    weights = np.array([[1 / 12] * 12 + [0.0, 0.0], [1 / 3] * 3 + [0.0] * 11])
    assert Quadrature(nodes, weights).scale("top10") == 3.0

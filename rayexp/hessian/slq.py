"""Stochastic Lanczos quadrature (SLQ) spectral densities, full and blockwise, and their JS heterogeneity.

For a probe v (Gaussian, normalized) m Lanczos steps give T = U Λ Uᵀ; the nodes λ_j and weights
τ_j = U[0, j]² form a Gauss quadrature with vᵀ f(H) v ≈ Σ_j τ_j f(λ_j) (exact for polynomials of
degree < 2m). Averaging over n_v probes (Ghorbani et al. 2019, Eq. 7; arXiv 2402.16788, Sec. 3.1):

    φ(t) = (1/n_v) Σ_probes Σ_j τ_j N(t; λ_j, σ²),     ∫ t^k φ ≈ tr(H^k)/d (+ σ² for k = 2).

Defaults follow seed 001: σ² = 1e-5, a 50,000-point grid from mean(min λ) − 1 to mean(max λ) + 1,
density renormalized to integrate to 1. **Blockwise**: the same for each diagonal block H_bb (probe
supported on block b, keep block b of Hv). The block×probe Lanczos runs advance in lockstep, ``chunk`` of
them sharing one product (vmapped over block-supported tangents where the products allow).

**Heterogeneity** (rayexp's definition of JS₀; neither seed repository computes it, arXiv 2402.16788 Sec. 3.3
defines it in words): the average pairwise Jensen–Shannon distance between blockwise densities, evaluated
on one common grid; JS distance = sqrt(JS divergence) with natural logs (scipy.spatial.distance.
jensenshannon's convention), so it lies in [0, sqrt(ln 2)]. Also on spectral shape: each block's nodes
divided by its max|λ| or, as the paper's Fig. 3 normalizes, by its 10th-largest eigenvalue (``normalized``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from rayexp.hessian.lanczos import Tridiagonal, lanczos_runs
from rayexp.hessian.operator import Block, HessianOperator, block_products
from rayexp.hessian.probes import probe

SIGMA2 = 1e-5
GRID_POINTS = 50_000
NORMALIZATIONS = ("max_abs", "top10")  # JS₀ of spectral shape: nodes / max|λ| or / |λ_10| per block
TOP_RANK = 10


@dataclass
class Quadrature:
    """SLQ nodes and weights, one row per probe (short runs padded with weight 0)."""
    nodes: np.ndarray  # (n_v, m)
    weights: np.ndarray  # (n_v, m)

    @classmethod
    def from_tridiagonals(cls, tris: Sequence[Tridiagonal]) -> "Quadrature":
        m = max(t.steps for t in tris)
        nodes, weights = np.zeros((len(tris), m)), np.zeros((len(tris), m))
        for i, t in enumerate(tris):
            lam, tau = t.eig()
            nodes[i, :len(lam)], weights[i, :len(lam)] = lam, tau
            nodes[i, len(lam):] = lam[-1]
        return cls(nodes, weights)

    @classmethod
    def concat(cls, parts: Sequence["Quadrature"]) -> "Quadrature":
        m = max(p.nodes.shape[1] for p in parts)
        pad = lambda a, fill: np.pad(a, ((0, 0), (0, m - a.shape[1])), constant_values=fill)  # noqa: E731
        return cls(np.concatenate([pad(p.nodes, 0.0) for p in parts]),
                   np.concatenate([pad(p.weights, 0.0) for p in parts]))

    def moment(self, k: int) -> float:
        """(1/n_v) Σ_probes Σ_j τ_j λ_j^k ≈ tr(H^k)/d."""
        return float(np.mean(np.sum(self.weights * self.nodes ** k, axis=1)))

    def range(self) -> tuple[float, float]:
        """The seed's grid ends: mean over probes of the smallest / largest node, ∓ 1."""
        lo = np.mean([row[w > 0].min() for row, w in zip(self.nodes, self.weights)])
        hi = np.mean([row[w > 0].max() for row, w in zip(self.nodes, self.weights)])
        return float(lo) - 1.0, float(hi) + 1.0

    def scale(self, by: str) -> float:
        """The normalizer of ``normalized``: ``max_abs`` = the largest |node|; ``top10`` = |the 10th-largest
        eigenvalue| (arXiv 2402.16788 Fig. 3), read as the mean over probes of each probe's
        ``TOP_RANK``-th largest Ritz value (its smallest when it has fewer nodes)."""
        if by not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {by!r}; allowed: {', '.join(NORMALIZATIONS)}")
        if by == "max_abs":
            return float(np.abs(self.nodes[self.weights > 0]).max())
        ranked = [np.sort(row[w > 0])[::-1] for row, w in zip(self.nodes, self.weights)]
        return float(abs(np.mean([r[min(TOP_RANK, len(r)) - 1] for r in ranked])))

    def normalized(self, by: str) -> "Quadrature":
        """Nodes divided by ``scale(by)`` (weights unchanged; a zero scale leaves them as they are)."""
        s = self.scale(by)
        return Quadrature(self.nodes / s if s > 0 else self.nodes, self.weights)

    def grid(self, points: int = GRID_POINTS) -> np.ndarray:
        return np.linspace(*self.range(), points)

    def density(self, grid: Optional[np.ndarray] = None, sigma2: float = SIGMA2) -> tuple[np.ndarray, np.ndarray]:
        """(grid, φ(grid)) with φ renormalized so that its trapezoid integral is 1."""
        grid = self.grid() if grid is None else grid
        phi = np.zeros_like(grid)
        n_v = len(self.nodes)
        for lam, tau in zip(self.nodes.ravel(), self.weights.ravel()):
            if tau > 0:
                lo, hi = np.searchsorted(grid, [lam - 10 * sigma2 ** 0.5, lam + 10 * sigma2 ** 0.5])
                t = grid[lo:hi]
                phi[lo:hi] += tau * np.exp(-(t - lam) ** 2 / (2 * sigma2)) / np.sqrt(2 * np.pi * sigma2) / n_v
        area = np.trapezoid(phi, grid)
        return grid, phi / area if area > 0 else phi


    def masses(self, grid: np.ndarray, sigma2: float = SIGMA2) -> np.ndarray:
        """φ's probability in the cell of each grid point (cells end half-way between points, the outer ones
        unbounded): Σ τ_j/n_v (Φ((b − λ_j)/σ) − Φ((a − λ_j)/σ)). It sums to 1 however coarse the grid is
        relative to σ, where point values of φ could miss a narrow Gaussian entirely."""
        from scipy.special import ndtr
        edges = np.concatenate([[-np.inf], (grid[1:] + grid[:-1]) / 2, [np.inf]])
        out, sigma, n_v = np.zeros(len(grid)), sigma2 ** 0.5, len(self.nodes)
        for lam, tau in zip(self.nodes.ravel(), self.weights.ravel()):
            if tau > 0:  # the cells within ±10σ, and the two around them (mass beyond is < 1e-23)
                lo, hi = np.searchsorted(edges, [lam - 10 * sigma, lam + 10 * sigma])
                lo, hi = max(lo - 1, 0), min(hi + 1, len(edges))
                out[lo:hi - 1] += tau / n_v * np.diff(ndtr((edges[lo:hi] - lam) / sigma))
        return out


def slq(op: HessianOperator, probes: int = 10, steps: int = 100, seed: int = 0,
        indices: Optional[Sequence[int]] = None, reorth: str = "none", chunk: int = 1, **kw) -> Quadrature:
    """SLQ of H: probes ``indices`` (default 0..probes−1), probe i = Gaussian keyed by (seed, i), normalized.

    ``chunk`` probes advance in lockstep (one ``op.matmat`` per step for all of them); the memory plan
    sizes it (``rayexp.hessian.tasks``)."""
    indices = list(range(probes) if indices is None else indices)
    tris = []
    for i in range(0, len(indices), max(chunk, 1)):
        v0s = [probe(op.d, "gaussian", seed, k, "slq", op.span, op.device) for k in indices[i:i + max(chunk, 1)]]
        tris += lanczos_runs(op, v0s, steps, reorth, **kw)
    return Quadrature.from_tridiagonals(tris)


def slq_blocks(op: HessianOperator, blocks: Sequence[Block], probes: int = 10, steps: int = 100, seed: int = 0,
               indices: Optional[Sequence[int]] = None, reorth: str = "none", chunk: int = 0,
               **kw) -> dict[str, Quadrature]:
    """SLQ of every diagonal block H_bb; probe i of block b is keyed by (seed, 'slq/<block name>', i).

    The (block, probe) Lanczos runs advance in lockstep, ``chunk`` of them sharing one product (0 = all):
    each product embeds the runs' block-supported vectors and applies H once (vmapped where possible)."""
    indices = list(range(probes) if indices is None else indices)
    views, products = block_products(op, blocks)
    runs = [(k, i) for k in range(len(blocks)) for i in indices]
    v0s = [probe(blocks[k].size, "gaussian", seed, i, f"slq/{blocks[k].name}", views[k].span, op.device)
           for k, i in runs]
    tris = lanczos_runs(op, v0s, steps, reorth, products=lambda ids, qs: products([runs[i][0] for i in ids], qs),
                        chunk=chunk, dims=[blocks[k].size for k, _ in runs], **kw)
    n = len(indices)
    return {b.name: Quadrature.from_tridiagonals(tris[k * n:(k + 1) * n]) for k, b in enumerate(blocks)}


def common_grid(quads: Sequence[Quadrature], points: int = GRID_POINTS) -> np.ndarray:
    """One grid covering every quadrature's seed-style range."""
    ranges = np.array([q.range() for q in quads])
    return np.linspace(ranges[:, 0].min(), ranges[:, 1].max(), points)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """sqrt(JS divergence) between two densities on the same grid, treated as discrete distributions."""
    p, q = p / p.sum(), q / q.sum()

    def kl_to_mid(a, b):  # KL(a ‖ (a + b)/2) = Σ a log(2a / (a + b)), stable for tiny a
        mask = a > 0
        return float(np.sum(a[mask] * np.log(2 * a[mask] / (a[mask] + b[mask]))))
    return float(np.sqrt(max(0.5 * kl_to_mid(p, q) + 0.5 * kl_to_mid(q, p), 0.0)))


def js_matrix(densities: np.ndarray) -> np.ndarray:
    """Pairwise JS distances between rows of ``densities`` (n_blocks, grid)."""
    n = len(densities)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = js_distance(densities[i], densities[j])
    return out


def heterogeneity(matrix: np.ndarray) -> float:
    """Mean pairwise JS distance over distinct blocks (JS₀ of arXiv 2402.16788)."""
    n = len(matrix)
    return float(matrix[np.triu_indices(n, 1)].mean()) if n > 1 else 0.0


def block_densities(quads: dict[str, Quadrature], sigma2: float = SIGMA2, points: int = GRID_POINTS):
    """(grid, densities (n_blocks, points), JS matrix, heterogeneity) on one common grid; the JS distances are
    between the densities' cell probabilities (``Quadrature.masses``), so a block whose nodes span a much wider
    range than another's cannot leave the other's narrow peaks between grid points."""
    grid = common_grid(list(quads.values()), points)
    dens = np.stack([q.density(grid, sigma2)[1] for q in quads.values()])
    mat = js_matrix(np.stack([q.masses(grid, sigma2) for q in quads.values()]))
    return grid, dens, mat, heterogeneity(mat)

"""Lanczos tridiagonalization (top-k Ritz values) and power iteration (PyHessian's baseline).

Lanczos (Golub & Van Loan, Alg. 10.1.1) builds an orthonormal basis q_1..q_m of the Krylov space of
(H, q_1) and the tridiagonal T = Qᵀ H Q with diagonal α_j = q_jᵀ H q_j and off-diagonal β_j:

    w = H q_j − α_j q_j − β_{j−1} q_{j−1},   β_j = ‖w‖,   q_{j+1} = w / β_j.

Its eigenvalues (Ritz values) approximate H's extreme eigenvalues. With ``reorth=True`` each w is
re-orthogonalized against all previous q (classical Gram–Schmidt, twice), in float64, which keeps Q
orthonormal and removes spurious copies of converged eigenvalues. The iteration stops early when
β_j ≤ tol·‖T‖ (an invariant subspace: the Ritz values are then exact).

``matvec`` maps a float64 torch vector to H times it (same device), e.g. a ``hessian.hvp.HVP``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from rayexp.hessian.probes import probe

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Tridiagonal:
    alpha: np.ndarray  # (m,)
    beta: np.ndarray  # (m - 1,)

    @property
    def steps(self) -> int:
        return len(self.alpha)

    def matrix(self) -> np.ndarray:
        return np.diag(self.alpha) + np.diag(self.beta, 1) + np.diag(self.beta, -1)

    def eig(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values λ_j (ascending) and Gauss quadrature weights τ_j = (first component of T's j-th
        eigenvector)², which sum to 1."""
        lam, vecs = np.linalg.eigh(self.matrix())
        return lam, vecs[0] ** 2


def lanczos(matvec: Matvec, v0: torch.Tensor, steps: int, reorth: bool = True, tol: float = 1e-10,
            callback: Optional[Callable[[int], None]] = None) -> Tridiagonal:
    """``steps`` Lanczos iterations of H from start vector ``v0`` (normalized here); returns T."""
    q = (v0 / v0.norm()).to(torch.float64)
    d = q.numel()
    steps = min(steps, d)
    Q = torch.empty(steps, d, dtype=torch.float64, device=q.device) if reorth else None
    alpha, beta = [], []
    q_prev, b_prev = torch.zeros_like(q), 0.0
    for j in range(steps):
        if reorth:
            Q[j] = q
        w = matvec(q).to(q)
        a = float(w @ q)
        w = w - a * q - b_prev * q_prev
        if reorth:
            for _ in range(2):
                w = w - Q[:j + 1].T @ (Q[:j + 1] @ w)
        alpha.append(a)
        if callback:
            callback(j + 1)
        b = float(w.norm())
        if j == steps - 1 or b <= tol * max(1.0, max(abs(x) for x in alpha)):
            break
        beta.append(b)
        q_prev, q, b_prev = q, w / b, b
    return Tridiagonal(np.array(alpha), np.array(beta))


def top_eigs(matvec: Matvec, d: int, k: int = 5, steps: int = 30, v0: Optional[torch.Tensor] = None,
             seed: int = 0, reorth: bool = True, by: str = "algebraic", device=None,
             callback: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """The k largest Ritz values of H (``by='algebraic'``) or the k of largest magnitude (``'magnitude'``,
    what seed 000 reports as the top eigenvalue), descending. ``v0`` defaults to a random Gaussian;
    seed 000 starts from the normalized mean gradient."""
    if v0 is None:
        v0 = probe(d, "gaussian", seed, 0, kind="lanczos")
    if device is not None:
        v0 = v0.to(device)
    lam, _ = lanczos(matvec, v0, steps, reorth=reorth, callback=callback).eig()
    order = np.argsort(-np.abs(lam) if by == "magnitude" else -lam, kind="stable")
    return lam[order[:k]]


def power_iteration(matvec: Matvec, d: int, k: int = 1, iters: int = 100, tol: float = 1e-3, seed: int = 0,
                    device=None) -> tuple[np.ndarray, int]:
    """PyHessian's top-k: power iteration with deflation against found eigenvectors, stopping when the
    Rayleigh quotient changes by < tol (relative). Returns (eigenvalues of largest magnitude, HVPs used)."""
    found: list[torch.Tensor] = []
    eigs, used = [], 0
    for i in range(k):
        v = probe(d, "gaussian", seed, i, kind="power").to(device or "cpu")
        lam = None
        for _ in range(iters):
            for u in found:
                v = v - (u @ v) * u
            v = v / v.norm()
            hv = matvec(v).to(v)
            used += 1
            new = float(hv @ v)
            v = hv
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-12):
                lam = new
                break
            lam = new
        for u in found:
            v = v - (u @ v) * u
        found.append(v / v.norm())
        eigs.append(lam)
    return np.array(eigs), used


def lanczos_batch(matvec_many: Callable[[list, list], list], v0s: list, steps: int, reorth: bool = True,
                  tol: float = 1e-10, callback: Optional[Callable[[int], None]] = None) -> list[Tridiagonal]:
    """Independent Lanczos runs in lockstep: step j of every unfinished run is one call of
    ``matvec_many(ids, [q_i for i in ids]) -> [H_i q_i for i in ids]`` over the unfinished runs ``ids``
    (e.g. one vmapped blockwise HVP). Same
    recurrence and stopping rule as ``lanczos``; runs may have different dimensions."""
    n = len(v0s)
    qs = [(v / v.norm()).to(torch.float64) for v in v0s]
    steps_i = [min(steps, q.numel()) for q in qs]
    Qs = [torch.empty(s, q.numel(), dtype=torch.float64, device=q.device) if reorth else None
          for s, q in zip(steps_i, qs)]
    alpha, beta = [[] for _ in range(n)], [[] for _ in range(n)]
    prev = [(torch.zeros_like(q), 0.0) for q in qs]
    active = list(range(n))
    j = 0
    while active:
        if reorth:
            for i in active:
                Qs[i][j] = qs[i]
        ws = matvec_many(active, [qs[i] for i in active])
        if callback:
            callback(len(active))
        still = []
        for i, w in zip(active, ws):
            q, (q_prev, b_prev) = qs[i], prev[i]
            w = w.to(q)
            a = float(w @ q)
            w = w - a * q - b_prev * q_prev
            if reorth:
                for _ in range(2):
                    w = w - Qs[i][:j + 1].T @ (Qs[i][:j + 1] @ w)
            alpha[i].append(a)
            b = float(w.norm())
            if j == steps_i[i] - 1 or b <= tol * max(1.0, max(abs(x) for x in alpha[i])):
                continue
            beta[i].append(b)
            prev[i], qs[i] = (q, b), w / b
            still.append(i)
        active, j = still, j + 1
    return [Tridiagonal(np.array(a), np.array(b)) for a, b in zip(alpha, beta)]


def numpy_matvec(fn: Callable[[np.ndarray], np.ndarray]) -> Matvec:
    """Adapt a numpy operator (e.g. ``rayexp.hessian.jax_backend.jax_hvp_fn(model, batches)``) to the torch
    float64 vectors every estimator here passes."""
    def mv(v: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(fn(v.detach().cpu().numpy()), dtype=np.float64)).to(v.device)
    return mv

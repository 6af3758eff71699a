"""Lanczos tridiagonalization and power iteration on a ``HessianOperator`` (docs/methods.md "Lanczos").

Lanczos (Golub & Van Loan, Alg. 10.1.1) builds an orthonormal basis q_1..q_m of the Krylov space of
(H, q_1) and the tridiagonal T = Qᵀ H Q with α_j = q_jᵀ H q_j and

    w = H q_j − α_j q_j − β_{j−1} q_{j−1},   β_j = ‖w‖,   q_{j+1} = w / β_j.

Its eigenvalues (Ritz values) approximate H's extreme eigenvalues. ``REORTH`` says what keeps Q
orthonormal in floating point:

- ``none``: the three-term recurrence alone (seed 001's SLQ): 3 vectors per run, no basis;
- ``full``: w re-orthogonalized against every kept q (classical Gram–Schmidt, twice);
- ``selective`` (Parlett & Scott 1979): w orthogonalized only against the Ritz vectors y_i = Q s_i that
  have converged, β_j |s_{j,i}| ≤ √eps ‖T‖ — the directions in which orthogonality is lost.

A kept basis is stored in the product precision (fp32 for fp32 products) on ``basis_device`` (the
operator's device, or the CPU when the memory plan says so). Several runs advance in lockstep, so that
one ``products`` call (a vmapped or block-batched product) serves all of them and one ``op.reduce``
(an all-reduce under parameter sharding) carries all their dot products. The iteration stops early when
β_j ≤ tol·max(1, max|α|) (an invariant subspace: the Ritz values are then exact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from rayexp.hessian.operator import HessianOperator, dot
from rayexp.hessian.probes import probe

REORTH = ("none", "full", "selective")
WHICH = ("largest", "smallest", "both", "magnitude")
Products = Callable[[Sequence[int], Sequence[torch.Tensor]], Sequence[torch.Tensor]]


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


class _Run:
    """One Lanczos run's state: current q, previous q and β, the coefficients, and the kept basis."""

    def __init__(self, q: torch.Tensor, steps: int, reorth: str, basis_dtype, basis_device):
        self.q, self.q_prev, self.b_prev = q, torch.zeros_like(q), 0.0
        self.steps, self.alpha, self.beta = steps, [], []
        keep = reorth != "none"
        self.Q = torch.empty(steps, q.numel(), dtype=basis_dtype, device=basis_device) if keep else None


def _project(op: HessianOperator, run: _Run, w: torch.Tensor, j: int, reorth: str) -> torch.Tensor:
    """w minus its component along the kept basis (full, twice) or the converged Ritz vectors (selective)."""
    Q = run.Q[:j + 1]
    coefs = lambda x: op.reduce((Q @ x.to(Q)).to(torch.float64))  # noqa: E731  Qᵀx over the whole vector
    if reorth == "full":
        for _ in range(2):
            w = w - (Q.T @ coefs(w).to(Q)).to(w)
        return w
    lam, S = np.linalg.eigh(Tridiagonal(np.array(run.alpha), np.array(run.beta)).matrix())
    beta = dot(op, w, w) ** 0.5
    conv = beta * np.abs(S[-1]) <= np.sqrt(np.finfo(np.float64).eps) * max(float(np.abs(lam).max()), 1e-300)
    if not conv.any():
        return w
    Sc = torch.from_numpy(S[:, conv]).to(Q.device)
    return w - (Q.T @ (Sc @ (Sc.T @ coefs(w))).to(Q)).to(w)


def lanczos_runs(op: HessianOperator, v0s: Sequence[torch.Tensor], steps: int, reorth: str = "full",
                 products: Optional[Products] = None, basis_device=None, chunk: int = 0, tol: float = 1e-10,
                 dims: Optional[Sequence[int]] = None, callback: Optional[Callable[[int], None]] = None,
                 keep: Optional[list] = None) -> list[Tridiagonal]:
    """Lanczos runs from start vectors ``v0s`` (parts in ``op.span``, normalized here) in lockstep.

    ``products(ids, qs)`` returns H q for the runs ``ids`` (default ``op.matmat`` of the stacked qs, ``chunk``
    runs per call, 0 = all); ``dims`` are the runs' whole dimensions (default ``op.d``), which cap their
    steps. Returns each run's T; ``keep`` (a list) receives the runs, whose bases give Ritz vectors."""
    if reorth not in REORTH:
        raise ValueError(f"reorth={reorth!r} is unknown; allowed: {', '.join(REORTH)}")
    products = products or (lambda ids, qs: list(op.matmat(torch.stack(list(qs)))))
    basis_dtype = torch.float32 if getattr(op, "precision", "fp64") != "fp64" else torch.float64
    runs = []
    for v, d in zip(v0s, dims or [op.d] * len(v0s)):
        v = v.to(op.device, torch.float64)
        runs.append(_Run(v / dot(op, v, v) ** 0.5, min(steps, d), reorth, basis_dtype, basis_device or op.device))
    if keep is not None:
        keep.extend(runs)
    active, j = list(range(len(runs))), 0
    while active:
        step = chunk or len(active)
        ws = []
        for i in range(0, len(active), step):
            ids = active[i:i + step]
            ws += list(products(ids, [runs[k].q for k in ids]))
        if callback:
            callback(len(active))
        active = _advance(op, [runs[k] for k in active], ws, j, reorth, tol, active)
        j += 1
    return [Tridiagonal(np.array(r.alpha), np.array(r.beta)) for r in runs]


def _advance(op, runs: list[_Run], ws: list[torch.Tensor], j: int, reorth: str, tol: float, ids: list[int]) -> list[int]:
    """One Lanczos step of every active run from its product w = H q; returns the runs still active."""
    alphas = op.reduce(torch.stack([(w.to(r.q) * r.q).sum() for r, w in zip(runs, ws)]))
    new_ws = []
    for r, w, a in zip(runs, ws, alphas.tolist()):
        if r.Q is not None:
            r.Q[j] = r.q.to(r.Q)
        w = w.to(r.q) - a * r.q - r.b_prev * r.q_prev
        r.alpha.append(a)
        new_ws.append(_project(op, r, w, j, reorth) if r.Q is not None else w)
    norms = op.reduce(torch.stack([(w * w).sum() for w in new_ws])).clamp_min(0).sqrt().tolist()
    still = []
    for k, r, w, b in zip(ids, runs, new_ws, norms):
        if len(r.alpha) >= r.steps or b <= tol * max(1.0, max(abs(x) for x in r.alpha)):
            r.q = r.q_prev = None  # free the run's vectors
            continue
        r.beta.append(b)
        r.q_prev, r.q, r.b_prev = r.q, w / b, b
        still.append(k)
    return still


def lanczos(op: HessianOperator, v0: torch.Tensor, steps: int, reorth: str = "full", **kw) -> Tridiagonal:
    """``steps`` Lanczos iterations of ``op`` from ``v0``; returns T."""
    return lanczos_runs(op, [v0], steps, reorth, **kw)[0]


def top_ritz(op: HessianOperator, v0: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """λ_max of H and its Ritz vector y = Q s (this process's part), by Lanczos with full
    reorthogonalization from ``v0``: a warm start for the next call (curvature during training)."""
    runs: list = []
    T = lanczos_runs(op, [v0], steps, "full", keep=runs)[0]
    lam, S = np.linalg.eigh(T.matrix())
    Q = runs[0].Q[:T.steps]
    return float(lam[-1]), (Q.T.to(torch.float64) @ torch.from_numpy(S[:, -1]).to(Q.device)).to(op.device)


def select(lam: np.ndarray, k: int, which: str = "largest"):
    """The k Ritz values ``which`` asks for: largest (descending), smallest (ascending), largest |λ|
    (``magnitude``, seed 000's top eigenvalue), or ``both`` as (largest, smallest)."""
    if which not in WHICH:
        raise ValueError(f"which={which!r} is unknown; allowed: {', '.join(WHICH)}")
    if which == "both":
        return select(lam, k, "largest"), select(lam, k, "smallest")
    order = {"largest": -lam, "smallest": lam, "magnitude": -np.abs(lam)}[which]
    return lam[np.argsort(order, kind="stable")[:k]]


def top_eigs(op: HessianOperator, k: int = 5, steps: int = 30, which: str = "largest",
             v0: Optional[torch.Tensor] = None, seed: int = 0, reorth: str = "full", **kw):
    """Extreme eigenvalues of H by Lanczos (see ``select`` for ``which``). ``v0`` defaults to a Gaussian
    probe keyed by ``seed``; seed 000 starts from the normalized mean gradient."""
    if v0 is None:
        v0 = probe(op.d, "gaussian", seed, 0, "lanczos", op.span, op.device)
    lam, _ = lanczos(op, v0, steps, reorth, **kw).eig()
    return select(lam, k, which)


PYHESSIAN_EPS = 1e-6  # PyHessian's guard: v/(‖v‖ + eps), and |Δλ|/(|λ| + eps) < tol (docs/methods.md "Power iteration")


class _Power:
    """One power-iteration run with deflation: its start vectors, found eigenpairs and current iterate."""

    def __init__(self, start: Callable[[int], torch.Tensor]):
        self.start, self.found, self.eigs = start, [], []
        self.v, self.lam, self.it = None, None, 0


def _normalized(op: HessianOperator, v: torch.Tensor) -> torch.Tensor:
    return v / (dot(op, v, v) ** 0.5 + PYHESSIAN_EPS)


def power_runs(op: HessianOperator, starts: Sequence[Callable[[int], torch.Tensor]], top_n: int = 5,
               iters: int = 100, tol: float = 1e-3, stop_at_positive: bool = False,
               products: Optional[Products] = None, chunk: int = 0) -> list[np.ndarray]:
    """PyHessian's power iteration with deflation (seed 003), several runs in lockstep.

    Eigenvalue i of a run starts from ``starts[run](i)`` and iterates v ← (v ⟂ found)/‖·‖, λ = vᵀHv,
    v ← Hv/‖Hv‖ until |λ_prev − λ|/(|λ_prev| + eps) < tol (λ_prev is kept, as PyHessian does) or ``iters``
    products; the last v joins the found vectors. A run ends after ``top_n`` eigenvalues, or at the first
    positive one with ``stop_at_positive``. Returns each run's eigenvalues in the order found."""
    products = products or (lambda ids, qs: list(op.matmat(torch.stack(list(qs)))))
    runs = [_Power(s) for s in starts]
    active = list(range(len(runs)))
    while active:
        for k in active:
            r = runs[k]
            if r.v is None:
                r.v, r.lam, r.it = starts[k](len(r.eigs)).to(op.device, torch.float64), None, 0
                r.v = _normalized(op, r.v)
            for u in r.found:
                r.v = r.v - dot(op, r.v, u) * u
            r.v = _normalized(op, r.v)
        step = chunk or len(active)
        hvs = []
        for i in range(0, len(active), step):
            ids = active[i:i + step]
            hvs += list(products(ids, [runs[k].v for k in ids]))
        active = [k for k, hv in zip(list(active), hvs) if _power_step(op, runs[k], hv, top_n, iters, tol, stop_at_positive)]
    return [np.array(r.eigs) for r in runs]


def _power_step(op, r: _Power, hv: torch.Tensor, top_n: int, iters: int, tol: float, stop_at_positive: bool) -> bool:
    """Advance run ``r`` by its product Hv; returns whether it is still active."""
    tmp = dot(op, hv.to(r.v), r.v)
    r.v, r.it = _normalized(op, hv.to(r.v)), r.it + 1
    converged = r.lam is not None and abs(r.lam - tmp) / (abs(r.lam) + PYHESSIAN_EPS) < tol
    if not converged:
        r.lam = tmp
    if not converged and r.it < iters:
        return True
    r.eigs.append(r.lam)
    r.found.append(r.v)
    r.v = None
    if (stop_at_positive and r.lam > 0) or len(r.eigs) == top_n:
        r.found = []
        return False
    return True


def first_positive(eigs: np.ndarray) -> float:
    """Seed 003's choice among deflated power-iteration eigenvalues: the first positive one, else the largest."""
    pos = eigs[eigs > 0]
    return float(pos[0]) if len(pos) else float(eigs.max())


def power_iteration(op: HessianOperator, k: int = 1, iters: int = 100, tol: float = 1e-3, seed: int = 0,
                    ) -> tuple[np.ndarray, int]:
    """The baseline (PyHessian's top-k, ``power_runs``): eigenvalues of largest magnitude found by power
    iteration with deflation from Gaussian starts keyed by ``seed``. Returns (eigenvalues, HVPs used)."""
    before = op.count
    start = lambda i: probe(op.d, "gaussian", seed, i, "power", op.span, op.device)  # noqa: E731
    eigs = power_runs(op, [start], top_n=k, iters=iters, tol=tol)[0]
    return eigs, op.count - before

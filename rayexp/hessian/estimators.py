"""Randomized and exact Hessian estimators on a ``HessianOperator`` (docs/methods.md "Estimators").

- Hutchinson (1990): tr H = E[vᵀHv], diag H = E[v ⊙ Hv], v Rademacher.
- Frobenius (seed 000): ‖H‖_F² = E‖Hv‖², v Rademacher (the same products as Hutchinson).
- 1-1 norm (arXiv 2410.08198): ‖H‖₁,₁ = Σᵢ ‖Hᵢ‖₁. With v of i.i.d. standard Cauchy entries, (Hv)ᵢ is
  Cauchy with scale ‖Hᵢ‖₁ (1-stability), so over k vectors ‖Hᵢ‖₁ ≈ median_k |(Hv)ᵢ| or ≈ ½ IQR_k (Hv)ᵢ.
  Each process keeps the k samples of its own rows only (fp32, on the device or the host, as planned).
  Exact check: ‖H eᵢ‖₁ for requested rows (in the order requested), or a uniform row sample S,
  (d/|S|) Σ_{i∈S} ‖H eᵢ‖₁ with standard error d·s/√|S|·√(1 − |S|/d).
- Per-block curvature (seed 003, arXiv 2502.00213): for each batch and block b, the largest eigenvalue
  λ_max(H_bb) on that batch (Lanczos restricted to b, exact to the Ritz tolerance), or the seed's own
  procedure (power iteration with deflation, the first positive of the top 5), and ‖g_b‖.
- Gradient heterogeneity (rayexp's scalar): std of log10 ‖g_b‖ over blocks and the max/min ratio.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from rayexp.hessian.lanczos import first_positive, lanczos_runs, power_runs, select
from rayexp.hessian.operator import Block, HessianOperator, block_products
from rayexp.hessian.probes import generator, probe

L11_METHODS = ("median", "iqr")


def assemble(op: HessianOperator, x: torch.Tensor) -> torch.Tensor:
    """The whole d-vector (on every process) from each process's part ``x`` in ``op.span``."""
    if x.numel() == op.d:
        return x
    full = torch.zeros(op.d, dtype=x.dtype, device=x.device)
    full[op.span] = x
    return op.reduce(full)


def _chunks(n: int, size: int):
    size = max(size, 1)
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


# -- Hutchinson and Frobenius ------------------------------------------------------------------------
def rademacher_samples(op: HessianOperator, probes: int, seed: int = 0, diag: bool = True, chunk: int = 1) -> dict:
    """vᵀHv and ‖Hv‖² per Rademacher probe, and Σ v ⊙ Hv (this process's part), ``chunk`` probes a product."""
    quad, sq = [], []
    diag_sum = torch.zeros(op.span.stop - op.span.start, dtype=torch.float64, device=op.device) if diag else None
    for ids in _chunks(probes, chunk):
        V = torch.stack([probe(op.d, "rademacher", seed, i, "hutchinson", op.span, op.device) for i in ids])
        HV = op.matmat(V)
        sums = op.reduce(torch.cat([(V * HV).sum(1), (HV * HV).sum(1)]))
        quad += sums[:len(ids)].tolist()
        sq += sums[len(ids):].tolist()
        if diag:
            diag_sum += (V * HV).sum(0)
    return {"vhv": np.array(quad), "hv2": np.array(sq), "n": len(quad), "diag_sum": diag_sum}


def summarize_samples(s: dict) -> dict:
    """Trace, ‖H‖_F and ‖H‖_F² (with standard errors over probes) and the diagonal estimate."""
    n = s["n"]
    se = lambda a: float(a.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    fro2 = float(s["hv2"].mean())
    out = {"trace": float(s["vhv"].mean()), "trace_se": se(s["vhv"]), "frobenius": fro2 ** 0.5,
           "frobenius_sq": fro2, "frobenius_sq_se": se(s["hv2"]), "probes": n}
    if s["diag_sum"] is not None:
        out["diag"] = s["diag_sum"] / n
    return out


def hutchinson(op: HessianOperator, probes: int = 100, seed: int = 0, diag: bool = True, chunk: int = 1) -> dict:
    """Hutchinson trace (± standard error), diagonal, and Frobenius norm from ``probes`` Rademacher products."""
    return summarize_samples(rademacher_samples(op, probes, seed, diag, chunk))


# -- 1-1 norm ----------------------------------------------------------------------------------------
def cauchy_samples(op: HessianOperator, k: int, seed: int = 0, chunk: int = 1, store=None) -> torch.Tensor:
    """(Hv_t)ᵢ for this process's rows i and Cauchy vectors t < k: (rows, k) float32 on ``store``."""
    rows = op.span.stop - op.span.start
    out = torch.empty(rows, k, dtype=torch.float32, device=store or op.device)
    for ids in _chunks(k, chunk):
        V = torch.stack([probe(op.d, "cauchy", seed, t, "l11", op.span, op.device) for t in ids])
        out[:, ids.start:ids.stop] = op.matmat(V).T.to(out)
    return out


def row_scales(samples: torch.Tensor | np.ndarray, method: str = "median") -> np.ndarray:
    """Per-row Cauchy scale ‖Hᵢ‖₁ from samples (rows, k): median |x| or half the interquartile range
    (linear interpolation between order statistics, as numpy's), on the samples' device, in row chunks."""
    if method not in L11_METHODS:
        raise ValueError(f"unknown 1-1 norm estimator {method!r}; allowed: {', '.join(L11_METHODS)}")
    x = torch.as_tensor(samples)
    rows = max(1, (1 << 24) // max(x.shape[1], 1))  # torch.quantile's input limit
    out = []
    for lo in range(0, len(x), rows):
        part = x[lo:lo + rows].double()
        if method == "median":
            out.append(torch.quantile(part.abs(), 0.5, dim=1))
        else:
            q = torch.quantile(part, torch.tensor([0.25, 0.75], dtype=torch.float64, device=part.device), dim=1)
            out.append(0.5 * (q[1] - q[0]))
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def l11_summary(row_l1: np.ndarray, blocks: Sequence[Block], prefix: str = "l11") -> dict:
    """Total ‖H‖₁,₁ (= Σ rows), /d, ∞→∞ norm (max row), and per-block row sums."""
    d = len(row_l1)
    out = {prefix: float(row_l1.sum()), f"{prefix}_over_d": float(row_l1.sum() / d),
           f"{prefix}_inf": float(row_l1.max())}
    for b in blocks:
        out[f"{prefix}/{b.name}"] = float(row_l1[b.slice].sum())
    return out


def l11_exact_rows(op: HessianOperator, rows: Sequence[int], chunk: int = 1) -> np.ndarray:
    """‖H eᵢ‖₁ for each i in ``rows``, in that order (one product per row; H symmetric so row = column)."""
    rows, lo, n_local = list(rows), op.span.start, op.span.stop - op.span.start
    out = []
    for ids in _chunks(len(rows), chunk):
        E = torch.zeros(len(ids), n_local, dtype=torch.float64, device=op.device)
        for r, i in enumerate(ids):
            if op.span.start <= rows[i] < op.span.stop:
                E[r, rows[i] - lo] = 1.0
        out += op.reduce(op.matmat(E).abs().sum(1)).tolist()
    return np.array(out)


def l11_row_sample(op: HessianOperator, n_rows: int, seed: int = 0, chunk: int = 1) -> dict:
    """Uniform row sample S (|S| = n_rows, no replacement): (d/|S|) Σ ‖H eᵢ‖₁ and its standard error."""
    d = op.d
    rows = torch.randperm(d, generator=generator(seed, "l11_rows", 0))[:n_rows].tolist()
    vals = l11_exact_rows(op, rows, chunk)
    s = len(vals)
    se = d * vals.std(ddof=1) / np.sqrt(s) * np.sqrt(1 - s / d) if s > 1 else float("nan")
    return {"l11_sample": float(d * vals.mean()), "l11_sample_se": float(se), "l11_sample_rows": s}


# -- per-block curvature and gradient heterogeneity --------------------------------------------------
def block_grad_norms(op: HessianOperator, g: torch.Tensor, blocks: Sequence[Block]) -> np.ndarray:
    """‖g_b‖ for each block, from this process's part ``g`` of the gradient."""
    sq = torch.zeros(len(blocks), dtype=torch.float64, device=g.device)
    for k, b in enumerate(blocks):
        lo, hi = max(b.start, op.span.start), min(b.stop, op.span.stop)
        if hi > lo:
            sq[k] = (g[lo - op.span.start:hi - op.span.start].double() ** 2).sum()
    return op.reduce(sq).sqrt().cpu().numpy()


def grad_heterogeneity(norms: np.ndarray, floor: float = 1e-10) -> dict:
    """Spread of block gradient norms: std of log10 ‖g_b‖ (rayexp's scalar) and max/min ratio, over blocks with
    ‖g_b‖ > floor·max (structurally zero gradients, e.g. attention key biases, are left out)."""
    pos = norms[norms > floor * norms.max()] if len(norms) else norms
    return {"grad_heterogeneity": float(np.log10(pos).std()) if len(pos) > 1 else 0.0,
            "grad_norm_ratio": float(pos.max() / pos.min()) if len(pos) else float("nan")}


def block_top_eigs(op: HessianOperator, blocks: Sequence[Block], steps: int = 20, seed: int = 0,
                   which: str = "largest", chunk: int = 0, callback=None) -> np.ndarray:
    """λ_max(H_bb) of each block (``which='magnitude'``: the largest |λ|), lockstep Lanczos with full
    reorthogonalization, ``chunk`` blocks sharing one product (0 = all)."""
    views, products = block_products(op, blocks)
    v0s = [probe(b.size, "gaussian", seed, 0, f"block_top/{b.name}", v.span, op.device) for b, v in zip(blocks, views)]
    tris = lanczos_runs(op, v0s, steps, "full", products=products, chunk=chunk, dims=[b.size for b in blocks],
                        callback=callback)
    return np.array([select(t.eig()[0], 1, which)[0] for t in tris])


def block_power(op: HessianOperator, blocks: Sequence[Block], top_n: int = 5, iters: int = 100, tol: float = 1e-3,
                seed: int = 0, chunk: int = 0) -> np.ndarray:
    """Seed 003's per-block curvature: PyHessian's power iteration with deflation on each H_bb (``power_runs``,
    blocks in lockstep), the first positive of the top ``top_n`` eigenvalues (else the largest)."""
    views, products = block_products(op, blocks)
    starts = [lambda i, b=b, v=v: probe(b.size, "gaussian", seed, i, f"block_power/{b.name}", v.span, op.device)
              for b, v in zip(blocks, views)]
    runs = power_runs(op, starts, top_n, iters, tol, stop_at_positive=True, products=products, chunk=chunk)
    return np.array([first_positive(e) for e in runs])


def block_curvature(op, blocks: Sequence[Block], steps: int = 20, seed: int = 0, chunk: int = 0,
                    callback=None, method: str = "lanczos", power: Optional[dict] = None) -> np.ndarray:
    """Seed 003's array (batches × blocks × 2): [λ_max(H_bb), ‖g_b‖] on each batch separately
    (``op.for_batch(i)``: the operator of batch i alone). ``method``: ``lanczos`` (the exact largest algebraic
    eigenvalue, ``steps`` steps) or ``power`` (``block_power`` with ``power`` = {top_n, iters, tol})."""
    out = np.zeros((op.n_batches, len(blocks), 2))
    for i in range(op.n_batches):
        one = op.for_batch(i)
        if method == "power":
            out[i, :, 0] = block_power(one, blocks, seed=seed, chunk=chunk, **(power or {}))
        else:
            out[i, :, 0] = block_top_eigs(one, blocks, steps, seed, chunk=chunk, callback=callback)
        out[i, :, 1] = block_grad_norms(one, one.grad(), blocks)
        op.count += one.count
    return out


def default_curvature_blocks(blocks: Sequence[Block]) -> list[Block]:
    """Seed 003's kind of selection: weight tensors (LayerNorm, Q, K, V, MLP, head), no biases, no positions."""
    return [b for b in blocks if ".bias" not in b.name and "wpe" not in b.name]


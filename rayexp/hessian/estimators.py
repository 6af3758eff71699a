"""Randomized and exact Hessian estimators: Hutchinson trace/diagonal, Frobenius norm, the 1-1 norm
(Cauchy sketches and exact rows), per-block curvature vs gradient norms, gradient heterogeneity.

- Hutchinson (Hutchinson 1990): tr H = E[vᵀHv], diag H = E[v ⊙ Hv], v Rademacher.
- Frobenius (seed 000): ‖H‖_F² = E‖Hv‖², v Rademacher (the same HVPs as Hutchinson).
- 1-1 norm (arXiv 2410.08198; seed 000's ``compute_11_norm``): ‖H‖₁,₁ = Σᵢⱼ |Hᵢⱼ| = Σᵢ ‖Hᵢ‖₁. With v of
  i.i.d. standard Cauchy entries, (Hv)ᵢ = Σⱼ Hᵢⱼ vⱼ is Cauchy with scale ‖Hᵢ‖₁ (1-stability), so over k
  vectors ‖Hᵢ‖₁ ≈ median_k |(Hv)ᵢ| or ≈ ½ IQR_k (Hv)ᵢ (Indyk 2006). Summing rows gives ‖H‖₁,₁ and the
  largest row the ∞→∞ norm. The seed scales v by 1/d and reports ‖H‖₁,₁/d; we report the unscaled
  total (``l11``) and ``l11_over_d``. "Per block" = the rows of that block (Σ_{i∈b} ‖Hᵢ‖₁), so blocks
  sum to the total. Exact check: ‖H eᵢ‖₁ for every row, or for a uniform row sample S without
  replacement, (d/|S|) Σ_{i∈S} ‖H eᵢ‖₁ with standard error d·s/√|S|·√(1 − |S|/d).
- Rotated basis: ‖R H Rᵀ‖₁,₁ for the orthogonal R of ``rayexp.optim.rotation`` (per_tensor Kronecker
  rotations U X Vᵀ, or one global Haar matrix), i.e. the operator u ↦ R H R⁻¹ u.
- Per-block curvature (seed 003, arXiv 2502.00213): for each batch and block b, the largest-magnitude
  eigenvalue of H_bb on that batch (Lanczos restricted to b; the seed uses power iteration) and ‖g_b‖.
- Gradient heterogeneity: the standard deviation of log10 ‖g_b‖ over blocks (mean gradient over the
  batches), plus the max/min ratio of ‖g_b‖ (blocks with ‖g_b‖ ≤ 1e-10·max, structurally zero, skipped).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from rayexp.hessian.hvp import HVP, Block
from rayexp.hessian.lanczos import lanczos_batch
from rayexp.hessian.probes import generator, probe

L11_METHODS = ("median", "iqr")
CHUNK = 64


def apply_many(matvec: Callable, vs: Sequence[torch.Tensor]):
    """Yield H v for each v: vmapped ``HVP.many`` in chunks of CHUNK for an HVP operator, else one by one."""
    vs = list(vs)
    if isinstance(matvec, HVP) and matvec.mode == "fwd_rev":
        for i in range(0, len(vs), CHUNK):
            yield from matvec.many(torch.stack(vs[i:i + CHUNK]))
    else:
        for v in vs:
            yield matvec(v)


# -- Hutchinson and Frobenius ------------------------------------------------------------------------
def rademacher_samples(matvec: Callable, d: int, indices: Sequence[int], seed: int = 0, device=None,
                       diag: bool = True) -> dict:
    """For Rademacher probes ``indices``: vᵀHv and ‖Hv‖² per probe, and Σ v ⊙ Hv (mergeable sums)."""
    device = getattr(matvec, "device", device) or "cpu"
    quad, sq = [], []
    diag_sum = torch.zeros(d, dtype=torch.float64, device=device) if diag else None
    vs = [probe(d, "rademacher", seed, i, "hutchinson").to(device) for i in indices]
    for v, hv in zip(vs, apply_many(matvec, vs)):
        hv = hv.to(v)
        quad.append(float(v @ hv))
        sq.append(float(hv @ hv))
        if diag:
            diag_sum += v * hv
    return {"vhv": np.array(quad), "hv2": np.array(sq), "n": len(quad),
            "diag_sum": diag_sum.cpu().numpy() if diag else None}


def merge_samples(parts: Sequence[dict]) -> dict:
    """Concatenate ``rademacher_samples`` of disjoint probe sets (in probe order)."""
    diags = [p["diag_sum"] for p in parts if p["diag_sum"] is not None]
    return {"vhv": np.concatenate([p["vhv"] for p in parts]), "hv2": np.concatenate([p["hv2"] for p in parts]),
            "n": sum(p["n"] for p in parts), "diag_sum": np.sum(diags, axis=0) if diags else None}


def summarize_samples(s: dict) -> dict:
    """Trace, Frobenius norm (with standard errors) and diagonal from Rademacher samples."""
    n = s["n"]
    se = lambda a: float(a.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")  # noqa: E731
    fro2 = float(s["hv2"].mean())
    out = {"trace": float(s["vhv"].mean()), "trace_se": se(s["vhv"]), "frobenius": fro2 ** 0.5,
           "frobenius_sq": fro2, "frobenius_sq_se": se(s["hv2"]), "probes": n}
    if s["diag_sum"] is not None:
        out["diag"] = s["diag_sum"] / n
    return out


def hutchinson(matvec: Callable, d: int, probes: int = 100, seed: int = 0, diag: bool = True) -> dict:
    """Hutchinson trace (± standard error), diagonal, and Frobenius norm from ``probes`` Rademacher HVPs."""
    return summarize_samples(rademacher_samples(matvec, d, range(probes), seed, diag=diag))


# -- 1-1 norm ----------------------------------------------------------------------------------------
def cauchy_rows(matvec: Callable, d: int, vectors: Sequence[int], rows: slice, seed: int = 0, device=None) -> np.ndarray:
    """(Hv_t)[rows] for the standard-Cauchy vectors t in ``vectors``: an array (n_rows, len(vectors))."""
    device = getattr(matvec, "device", device) or "cpu"
    vs = (probe(d, "cauchy", seed, t, "l11").to(device) for t in vectors)
    return np.stack([hv[rows].cpu().numpy() for hv in apply_many(matvec, vs)], axis=1)


def row_scales(samples: np.ndarray, method: str = "median") -> np.ndarray:
    """Per-row Cauchy scale ‖Hᵢ‖₁ from samples (rows, k): median |x| or half the interquartile range."""
    if method == "median":
        return np.median(np.abs(samples), axis=1)
    if method == "iqr":
        q1, q3 = np.quantile(samples, [0.25, 0.75], axis=1)
        return 0.5 * (q3 - q1)
    raise ValueError(f"unknown 1-1 norm estimator {method!r}; allowed: {', '.join(L11_METHODS)}")


def l11_summary(row_l1: np.ndarray, blocks: Sequence[Block], prefix: str = "l11") -> dict:
    """Total ‖H‖₁,₁ (= Σ rows), /d, ∞→∞ norm (max row), and per-block row sums."""
    d = len(row_l1)
    out = {prefix: float(row_l1.sum()), f"{prefix}_over_d": float(row_l1.sum() / d),
           f"{prefix}_inf": float(row_l1.max())}
    for b in blocks:
        out[f"{prefix}/{b.name}"] = float(row_l1[b.slice].sum())
    return out


def l11_cauchy(matvec: Callable, d: int, k: int = 100, seed: int = 0, method: str = "median",
               chunk_rows: Optional[int] = None) -> np.ndarray:
    """Per-row ‖Hᵢ‖₁ estimates from k Cauchy HVPs (rows processed ``chunk_rows`` at a time would need
    k HVPs per chunk; locally we keep all rows: d×k floats)."""
    return row_scales(cauchy_rows(matvec, d, range(k), slice(0, d), seed), method)


def l11_exact_rows(matvec: Callable, d: int, rows: Sequence[int], device=None) -> np.ndarray:
    """‖H eᵢ‖₁ for each i in ``rows`` (one HVP per row; H symmetric so row = column)."""
    device = getattr(matvec, "device", device) or "cpu"
    eye = torch.zeros(len(rows), d, dtype=torch.float64, device=device)
    eye[torch.arange(len(rows)), torch.as_tensor(list(rows), dtype=torch.long)] = 1.0
    return np.array([float(hv.abs().sum()) for hv in apply_many(matvec, eye)])


def l11_row_sample(matvec: Callable, d: int, n_rows: int, seed: int = 0) -> dict:
    """Uniform row sample S (|S| = n_rows, no replacement): (d/|S|) Σ ‖H eᵢ‖₁ and its standard error."""
    rows = torch.randperm(d, generator=generator(seed, "l11_rows", 0))[:n_rows].sort().values.tolist()
    vals = l11_exact_rows(matvec, d, rows)
    s = len(vals)
    se = d * vals.std(ddof=1) / np.sqrt(s) * np.sqrt(1 - s / d) if s > 1 else float("nan")
    return {"l11_sample": float(d * vals.mean()), "l11_sample_se": float(se), "l11_sample_rows": s}


def rotated(op: HVP, kind: str = "per_tensor", seed: int = 0, max_dim: int = 8192) -> Callable:
    """The operator u ↦ R H R⁻¹ u of the Hessian in a rotated basis (``rayexp.optim.rotation``)."""
    from rayexp.optim.rotation import apply_inverse, apply_rotation, haar_orthogonal, matrix_sides, seeded_generator

    if kind == "global":
        q = haar_orthogonal(op.d, seeded_generator(seed, "global", "q")).to(op.device)
        return lambda u: q @ op(q.T @ u.to(q))
    if kind != "per_tensor":
        raise ValueError(f"unknown rotation {kind!r}; allowed: per_tensor, global")
    mats = []
    for i, shape in enumerate(op.shapes):
        m, n = matrix_sides(shape, max_dim)
        mats.append((haar_orthogonal(m, seeded_generator(seed, i, "u")).to(op.device) if m else None,
                     haar_orthogonal(n, seeded_generator(seed, i, "v")).to(op.device) if n else None))

    def apply(u: torch.Tensor, f) -> torch.Tensor:
        parts = op.unflatten(u.to(torch.float64))
        return op.flatten({name: f(parts[name], *uv) for name, uv in zip(op.names, mats)})

    def mv(u):
        return apply(op(apply(u, apply_inverse)).to(u), apply_rotation)
    mv.device = op.device
    return mv


# -- per-block curvature and gradient heterogeneity --------------------------------------------------
def block_grad_norms(grad: torch.Tensor, blocks: Sequence[Block]) -> np.ndarray:
    """‖g_b‖ for each block."""
    return np.array([float(grad[b.slice].norm()) for b in blocks])


def grad_heterogeneity(norms: np.ndarray, floor: float = 1e-10) -> dict:
    """Spread of block gradient norms: std of log10 ‖g_b‖ (our scalar) and max/min ratio, over blocks with
    ‖g_b‖ > floor·max (structurally zero gradients, e.g. attention key biases, are left out)."""
    pos = norms[norms > floor * norms.max()] if len(norms) else norms
    return {"grad_heterogeneity": float(np.log10(pos).std()) if len(pos) > 1 else 0.0,
            "grad_norm_ratio": float(pos.max() / pos.min()) if len(pos) else float("nan")}


def block_top_eigs(op: HVP, blocks: Sequence[Block], steps: int = 20, seed: int = 0,
                   callback: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Largest-magnitude eigenvalue of each H_bb (lockstep Lanczos, one vmapped HVP per step)."""
    v0s = [probe(b.size, "gaussian", seed, 0, f"block_top/{b.name}").to(op.device) for b in blocks]
    tris = lanczos_batch(lambda ids, qs: op.block_many([blocks[i] for i in ids], qs), v0s, steps, callback=callback)
    out = []
    for t in tris:
        lam, _ = t.eig()
        out.append(lam[np.argmax(np.abs(lam))])
    return np.array(out)


def block_curvature(op: HVP, blocks: Sequence[Block], steps: int = 20, seed: int = 0,
                    callback: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Seed 003's array (batches × blocks × 2): [top |eig| of H_bb, ‖g_b‖] on each batch separately."""
    out = np.zeros((len(op.batches), len(blocks), 2))
    for i, batch in enumerate(op.batches):
        one = op.with_batches([batch])
        out[i, :, 0] = block_top_eigs(one, blocks, steps, seed, callback)
        out[i, :, 1] = block_grad_norms(one.grad(), blocks)
        op.count += one.count
    return out


def default_curvature_blocks(blocks: Sequence[Block]) -> list[Block]:
    """Seed 003's kind of selection: weight tensors (LayerNorm, Q, K, V, MLP, head), no biases, no positions."""
    return [b for b in blocks if ".bias" not in b.name and "wpe" not in b.name]

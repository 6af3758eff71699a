"""Curvature estimators sharded over Ray actors (ALGORITHMS.md "Distribution over Ray actors").

Each ``HessianActor`` holds a copy of the model and the full fixed list of batches, plus its *data
shard* (a contiguous slice of the batches). ``ShardedHessian`` (driver side) splits work four ways:

- data (Lanczos / top eigenvalues): Hv = Σ_shards (n_s/n) H_s v, the Lanczos recurrence runs here;
- probes (SLQ, Hutchinson, Frobenius): probe i goes to actor i mod N, results merged in probe order;
- rows (1-1 norm): Cauchy vector t is multiplied on actor t mod N, which returns N row slices as separate
  objects; the slice of rows r goes straight to actor r, so no process ever holds the d×k samples
  (each actor keeps d/N × k) and the driver only gathers the d per-row estimates;
- blocks (blockwise SLQ, per-block curvature): each actor runs the Lanczos of its blocks.

Every probe is drawn from a generator keyed by (seed, kind, probe index), never by actor, so results do
not depend on the number of actors (up to float summation order in data sharding).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import ray
import torch

from rayexp.hessian import estimators as est
from rayexp.hessian.hvp import HVP, check_model
from rayexp.hessian.slq import Quadrature, slq, slq_blocks


def _split(items: Sequence, n: int) -> list[list]:
    """Round-robin split of ``items`` into n lists."""
    return [list(items[i::n]) for i in range(n)]


@ray.remote
class HessianActor:
    """One shard's worker: the model, all batches, and the data shard ``batches[lo:hi]``."""

    def __init__(self, model, batches, lo: int, hi: int, mode: str, dtype: str, use_gpu: bool):
        torch.set_num_threads(1)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.op = HVP(model, batches, mode, dtype, device)
        self.shard = self.op.with_batches(batches[lo:hi]) if hi > lo else None
        self.weight = hi - lo
        self.rows: dict[int, np.ndarray] = {}

    def count(self) -> int:
        """Full HVPs this actor computed (data-shard products are counted once, on the driver)."""
        return self.op.count

    def shard_hvp(self, v: np.ndarray) -> np.ndarray:
        """(n_s) · H_s v: the shard's weighted share of Hv."""
        return self.weight * self.shard(v) if self.shard is not None else np.zeros_like(v)

    def shard_grad(self) -> np.ndarray:
        return self.weight * self.shard.grad().cpu().numpy() if self.shard is not None else 0.0

    def slq(self, indices, steps, seed, reorth) -> Quadrature:
        return slq(self.op, self.op.d, steps=steps, seed=seed, indices=indices, reorth=reorth)

    def slq_blocks(self, names, probes, steps, seed, reorth) -> dict:
        return slq_blocks(self.op, [self.op.block(n) for n in names], probes, steps, seed, reorth=reorth)

    def rademacher(self, indices, seed, diag) -> dict:
        return est.rademacher_samples(self.op, self.op.d, indices, seed, diag=diag)

    def cauchy_slices(self, t: int, seed: int, bounds: list[tuple[int, int]], rotation: Optional[tuple]):
        """H v_t for Cauchy vector t, cut into the row slices ``bounds`` (one returned object each)."""
        mv = est.rotated(self.op, *rotation) if rotation else self.op
        hv = est.cauchy_rows(mv, self.op.d, [t], slice(0, self.op.d), seed)[:, 0]
        parts = [hv[lo:hi] for lo, hi in bounds]
        return parts if len(parts) > 1 else parts[0]

    def keep_rows(self, t: int, values: np.ndarray) -> None:
        self.rows[t] = values

    def row_scales(self, method: str) -> np.ndarray:
        samples = np.stack([self.rows[t] for t in sorted(self.rows)], axis=1)
        self.rows = {}
        return est.row_scales(samples, method)

    def exact_rows(self, rows) -> np.ndarray:
        return est.l11_exact_rows(self.op, self.op.d, rows)

    def block_curvature(self, names, steps, seed) -> np.ndarray:
        return est.block_curvature(self.op, [self.op.block(n) for n in names], steps, seed)


class ShardedHessian:
    """Driver-side view of ``actors`` HessianActors; mirrors the local HVP's estimator calls."""

    def __init__(self, model, batches: Sequence, actors: int = 2, gpus_per_actor: float = 0.0,
                 mode: str = "fwd_rev", dtype: str = "fp64", cpus_per_actor: float = 1.0):
        check_model(model)
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        batches = list(batches)
        self.local = HVP(model, batches[:1], mode, dtype, "cpu")  # shapes and blocks only
        self.d, self.blocks, self.n = self.local.d, self.local.blocks, len(batches)
        self.device = torch.device("cpu")
        bounds = np.linspace(0, self.n, actors + 1).round().astype(int)
        model_ref = ray.put(model.cpu())
        self.actors = [HessianActor.options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor).remote(
            model_ref, batches, int(bounds[i]), int(bounds[i + 1]), mode, dtype, gpus_per_actor > 0)
            for i in range(actors)]
        self._driver_count = 0

    @property
    def count(self) -> int:
        """Full-Hessian HVPs done so far (data-sharded products count once)."""
        return self._driver_count + sum(ray.get([a.count.remote() for a in self.actors]))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    # -- data sharding ---------------------------------------------------------------------------
    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """Hv = (1/n) Σ_shards n_s H_s v."""
        ref = ray.put(v.detach().double().cpu().numpy())
        parts = ray.get([a.shard_hvp.remote(ref) for a in self.actors])
        self._driver_count += 1
        return torch.from_numpy(np.sum(parts, axis=0) / self.n).to(v.device)

    def grad(self) -> torch.Tensor:
        return torch.from_numpy(np.sum(ray.get([a.shard_grad.remote() for a in self.actors]), axis=0) / self.n)

    # -- probe sharding --------------------------------------------------------------------------
    def slq(self, probes: int, steps: int, seed: int = 0, reorth: bool = True) -> Quadrature:
        shares = _split(range(probes), len(self.actors))
        parts = ray.get([a.slq.remote(s, steps, seed, reorth) for a, s in zip(self.actors, shares) if s])
        order = np.argsort(np.concatenate([s for s in shares if s]))
        q = Quadrature.concat(parts)
        return Quadrature(q.nodes[order], q.weights[order])

    def rademacher(self, probes: int, seed: int = 0, diag: bool = True) -> dict:
        shares = _split(range(probes), len(self.actors))
        parts = ray.get([a.rademacher.remote(s, seed, diag) for a, s in zip(self.actors, shares) if s])
        order = np.argsort(np.concatenate([s for s in shares if s]))
        merged = est.merge_samples(parts)
        merged["vhv"], merged["hv2"] = merged["vhv"][order], merged["hv2"][order]
        return merged

    # -- block sharding --------------------------------------------------------------------------
    def slq_blocks(self, blocks, probes: int, steps: int, seed: int = 0, reorth: bool = True) -> dict:
        shares = _split([b.name for b in blocks], len(self.actors))
        parts = ray.get([a.slq_blocks.remote(s, probes, steps, seed, reorth)
                         for a, s in zip(self.actors, shares) if s])
        merged = {k: v for p in parts for k, v in p.items()}
        return {b.name: merged[b.name] for b in blocks}

    def block_curvature(self, blocks, steps: int, seed: int = 0) -> np.ndarray:
        shares = _split([b.name for b in blocks], len(self.actors))
        parts = ray.get([a.block_curvature.remote(s, steps, seed) for a, s in zip(self.actors, shares) if s])
        pos = {n: (i, j) for i, s in enumerate([s for s in shares if s]) for j, n in enumerate(s)}
        return np.stack([parts[pos[b.name][0]][:, pos[b.name][1]] for b in blocks], axis=1)

    # -- row sharding ----------------------------------------------------------------------------
    def row_bounds(self) -> list[tuple[int, int]]:
        cuts = np.linspace(0, self.d, len(self.actors) + 1).round().astype(int)
        return [(int(cuts[i]), int(cuts[i + 1])) for i in range(len(self.actors))]

    def l11_cauchy(self, k: int, seed: int = 0, method: str = "median", rotation: Optional[tuple] = None) -> np.ndarray:
        """Per-row ‖Hᵢ‖₁ estimates; row slice r of every Cauchy HVP lives only on actor r."""
        bounds, n = self.row_bounds(), len(self.actors)
        pending = []
        for t in range(k):
            refs = self.actors[t % n].cauchy_slices.options(num_returns=n).remote(t, seed, bounds, rotation)
            refs = refs if n > 1 else [refs]
            pending += [owner.keep_rows.remote(t, ref) for owner, ref in zip(self.actors, refs)]
        ray.get(pending)
        return np.concatenate(ray.get([a.row_scales.remote(method) for a in self.actors]))

    def exact_rows(self, rows: Sequence[int]) -> np.ndarray:
        shares = _split(list(rows), len(self.actors))
        parts = ray.get([a.exact_rows.remote(s) for a, s in zip(self.actors, shares) if s])
        order = np.argsort(np.concatenate([s for s in shares if s]))
        return np.concatenate(parts)[order]

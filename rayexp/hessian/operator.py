"""The one operator interface of the curvature engine (docs/methods.md "Operators").

Estimators see a ``HessianOperator`` and nothing else: its dimension ``d``, the part ``span`` of every
d-vector this process holds, ``matvec``/``matmat`` on those parts, and ``reduce``, which sums per-process
partial results (dot products) over the group. On one process ``span`` is the whole vector and ``reduce``
the identity; with parameter sharding each of N processes holds 1/N of every vector and ``reduce`` is an
all-reduce, so the same estimator code runs unchanged, SPMD, on every member of the group.

``Operator`` implements it over ``Products`` (``rayexp.hessian.hvp.HVP``: Σ_b H_b v over one data shard)
and a ``Comm`` (how shards combine):

    shard = none:   Hv = (1/n) Σ_b H_b v
    shard = data:   Hv = (1/n) all_reduce_s(Σ_{b∈s} H_b v)             vectors replicated on every process
    shard = params: (Hv)_span = (1/n) reduce_scatter_s(Σ_{b∈s} H_b gather(v_span))   vectors sharded

``n`` is the number of batches over all shards (``reduce: sum`` drops the 1/n).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch
import torch.distributed as dist

SHARDINGS = ("data", "params")


@dataclass(frozen=True)
class Block:
    """A named contiguous slice ``[start, stop)`` of the flat parameter vector (part of tensor ``param``)."""
    name: str
    param: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


class HessianOperator(Protocol):
    """v ↦ Hv on the parts of d-vectors held here (``span``); ``reduce`` sums partial results over the group."""
    d: int
    span: slice
    device: torch.device
    dtype: torch.dtype
    blocks: Sequence[Block]
    count: int

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...

    def matmat(self, V: torch.Tensor) -> torch.Tensor: ...

    def reduce(self, x: torch.Tensor) -> torch.Tensor: ...


def dot(op: HessianOperator, u: torch.Tensor, v: torch.Tensor) -> float:
    """uᵀv over the whole vector (local sum, then ``op.reduce``)."""
    return float(op.reduce((u * v).sum().reshape(1))[0])


class Comm:
    """How per-process products combine: no group, data-sharded (replicated vectors) or parameter-sharded."""

    def __init__(self, shard: Optional[str] = None, group=None):
        self.shard, self.group = shard, group
        self.world = dist.get_world_size(group) if shard else 1
        self.rank = dist.get_rank(group) if shard else 0
        nccl = bool(shard) and dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def bounds(self, d: int) -> list[tuple[int, int]]:
        """Contiguous, balanced ``[lo, hi)`` of each rank's share of a d-vector (params sharding)."""
        cuts = [round(i * d / self.world) for i in range(self.world + 1)]
        return list(zip(cuts[:-1], cuts[1:]))

    def span(self, d: int) -> slice:
        if self.shard != "params":
            return slice(0, d)
        lo, hi = self.bounds(d)[self.rank]
        return slice(lo, hi)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Σ over ranks (on the group's device: NCCL reduces CUDA tensors only)."""
        if not self.shard:
            return x
        y = x.to(self.device).contiguous()
        dist.all_reduce(y, group=self.group)
        return y.to(x.device)

    def gather(self, x: torch.Tensor, d: int) -> torch.Tensor:
        """The whole d-vector (last axis) from every rank's span (params sharding); else x itself."""
        if self.shard != "params":
            return x
        parts = [torch.empty(*x.shape[:-1], hi - lo, dtype=x.dtype, device=self.device) for lo, hi in self.bounds(d)]
        dist.all_gather(parts, x.to(self.device).contiguous(), group=self.group)
        return torch.cat(parts, dim=-1).to(x.device)

    def combine(self, partial: torch.Tensor, d: int) -> torch.Tensor:
        """Σ over ranks of per-rank full products, cut to this rank's span (params) or whole (data)."""
        if self.shard != "params":
            return self.all_reduce(partial)
        total = self.all_reduce(partial)  # gloo has no reduce_scatter; the full sum is transient
        return total[..., self.span(d)].clone()

    def reduce_scalars(self, x: torch.Tensor) -> torch.Tensor:
        """Partial sums of sharded vectors summed over ranks (identity unless params-sharded)."""
        return self.all_reduce(x) if self.shard == "params" else x


class Operator:
    """``HessianOperator`` of the mean (or summed) loss over all shards' batches; see the module docstring."""

    def __init__(self, products, comm: Optional[Comm] = None, n_batches: Optional[int] = None,
                 reduce: str = "mean"):
        self.products, self.comm = products, comm or Comm()
        self.d, self.device, self.dtype = products.d, products.device, torch.float64
        self.blocks, self.precision = products.blocks, products.precision
        self.span = self.comm.span(self.d)
        self.n_batches = n_batches if n_batches is not None else products.n_batches
        self.reduction = reduce
        self.scale = 1.0 / self.n_batches if reduce == "mean" else 1.0
        self.count = 0

    def for_batch(self, i: int) -> "Operator":
        """The operator of global batch i alone (held by one shard; the others contribute zero)."""
        return Operator(self.products.subset([i]), self.comm, 1, self.reduction)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """(Hv)[span] for v[span] (float64 in and out)."""
        return self.matmat(v.reshape(1, -1))[0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """(H Vᵀ)ᵀ[:, span] for the rows of V (n, |span|)."""
        full = self.comm.gather(V.to(self.device, torch.float64), self.d)
        part = self.products.hvp_sum(full)
        self.count += len(V)
        return self.comm.combine(part.to(torch.float64), self.d) * self.scale

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.reduce_scalars(x)

    def grad(self) -> torch.Tensor:
        """∇L[span] (float64)."""
        return self.comm.combine(self.products.grad_sum().to(torch.float64).reshape(1, -1), self.d)[0] * self.scale

    def loss(self) -> float:
        """L(θ) over all shards' batches."""
        total = torch.tensor([self.products.loss_sum()], dtype=torch.float64, device=self.device)
        return float(self.comm.all_reduce(total)[0]) * self.scale

    def rotated(self, rotation: "FlatRotation") -> "Operator":
        """The operator u ↦ R H Rᵀ u in the basis of ``rotation`` (``Rotated`` products; same shards)."""
        other = Operator.__new__(Operator)
        other.__dict__.update(self.__dict__)
        other.products, other.count = Rotated(self.products, rotation), 0
        return other


class _View:
    """An operator derived from ``self.op``: its product count, one-vector products and group reduce."""

    @property
    def count(self) -> int:
        return self.op.count

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.reshape(1, -1))[0]

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.reduce(x)


class BlockView(_View):
    """The diagonal block H_bb of an operator as an operator on vectors supported on block b.

    Its vectors are the part of block b inside ``op.span``; products embed them in zeros, apply H and keep
    block b (one full product per block product, as seed 001 does)."""

    def __init__(self, op: HessianOperator, block: Block):
        self.op, self.block = op, block
        lo, hi = max(block.start, op.span.start), min(block.stop, op.span.stop)
        hi = max(hi, lo)
        self.local = slice(lo - op.span.start, hi - op.span.start)  # in op's local coordinates
        self.span = slice(lo - block.start, hi - block.start)  # in block coordinates
        self.d, self.device, self.dtype, self.blocks = block.size, op.device, op.dtype, [block]
        self.precision = getattr(op, "precision", "fp64")


    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(len(V), self.op.span.stop - self.op.span.start, dtype=torch.float64, device=self.device)
        full[:, self.local] = V
        return self.op.matmat(full)[:, self.local]


def block_products(op: HessianOperator, blocks: Sequence[Block]):
    """``(ids, qs) -> [H_bb q for each]`` for Lanczos runs on blocks ``blocks[i]`` (i in ids): all runs'
    block-supported vectors go through one ``op.matmat`` (vmapped where the products allow)."""
    views = [BlockView(op, b) for b in blocks]

    def products(ids: Sequence[int], qs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        V = torch.zeros(len(ids), op.span.stop - op.span.start, dtype=torch.float64, device=op.device)
        for row, (i, q) in enumerate(zip(ids, qs)):
            V[row, views[i].local] = q
        HV = op.matmat(V)
        return [HV[row, views[i].local] for row, i in enumerate(ids)]
    return views, products


class FlatRotation:
    """A training rotation R on the products' flat vectors: ``rayexp.optim.rotation.FlatRotation`` (the
    optimizer's own map over ``model.named_parameters()`` order, any rotation kind) checked against the
    products' parameter order (docs/methods.md "1-1 norm in the training basis"). ``flat=None`` is the
    identity (a model trained unrotated)."""

    def __init__(self, flat=None):
        self.flat = flat

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the rotation and its kept states hold (what the memory plan counts)."""
        return 0 if self.flat is None else _nbytes(vars(self.flat.rotation)) + _nbytes(self.flat.states or [])

    @classmethod
    def of_kind(cls, kind: str, seed: int, names: Sequence[str], shapes: Sequence, max_dim: int = 8192) -> "FlatRotation":
        """A fresh rotation of ``kind`` over tensors of these shapes and names, as the optimizer builds it with
        ``rotation.seed = seed`` (float64 matrices; no tensor of the shapes is allocated)."""
        from rayexp.config import RotationConfig
        from rayexp.optim.rotation import FlatRotation as OptimFlat, Rotation
        like = [torch.zeros(1, dtype=torch.float64).expand(*s) for s in shapes]  # shape and dtype only
        cfg = RotationConfig(kind=kind, seed=seed, max_dim=max_dim)
        return cls(OptimFlat(Rotation(like, cfg, list(names), torch.float64)))

    @property
    def identity(self) -> bool:
        return self.flat is None or self.flat.kind == "none"

    def to(self, device) -> "FlatRotation":
        """Every tensor the rotation and its states hold, moved to ``device`` once (floating ones as float64, an
        exact widening of fp32 matrices, so products do not cast them per vector)."""
        if self.flat is not None:
            rot = self.flat.rotation
            rot.__dict__.update(_moved(vars(rot), device))
            self.flat.states = _moved(self.flat.states, device) if self.flat.states is not None else None
        return self

    def apply(self, products, V: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """R v (``inverse``: Rᵀ v) for each row of V (n, d), flat in ``products``' parameter order."""
        if self.identity:
            return V
        if list(products.names) != list(self.flat.rotation.names):
            raise ValueError("the training rotation indexes other parameters than the Hessian's products")
        V = V.to(torch.float64)
        return self.flat.apply_t(V) if inverse else self.flat.apply(V)


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size() if obj.stride() and 0 not in obj.stride() else obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _moved(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device, torch.float64) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_moved(v, device) for v in obj)
    return obj


class Rotated:
    """Products in a rotated basis, Σ_b R H_b Rᵀ v, for a ``FlatRotation`` R: the Hessian of θ ↦ L(Rᵀφ) at φ = Rθ."""

    def __init__(self, products, rotation: FlatRotation):
        self.inner, self.rotation, self.precision = products, rotation, products.precision
        self.d, self.device, self.blocks, self.n_batches = products.d, products.device, products.blocks, products.n_batches

    def hvp_sum(self, V: torch.Tensor) -> torch.Tensor:
        inner = self.inner.hvp_sum(self.rotation.apply(self.inner, V, inverse=True)).to(torch.float64)
        return self.rotation.apply(self.inner, inner)

    def grad_sum(self) -> torch.Tensor:
        return self.rotation.apply(self.inner, self.inner.grad_sum().to(torch.float64).reshape(1, -1))[0]

    def loss_sum(self) -> float:
        return self.inner.loss_sum()


class FunctionOperator:
    """A ``HessianOperator`` from any function v ↦ Av on whole float64 torch vectors (a dense matrix, a JAX
    HVP through ``FunctionOperator.numpy``), in one process."""

    def __init__(self, fn, d: int, blocks: Optional[Sequence[Block]] = None, device="cpu", precision: str = "fp64"):
        self.fn, self.d, self.span = fn, d, slice(0, d)
        self.device, self.dtype, self.precision = torch.device(device), torch.float64, precision
        self.blocks = list(blocks) if blocks is not None else [Block("all", "all", 0, d)]
        self.count = 0

    @classmethod
    def numpy(cls, fn, d: int, **kw) -> "FunctionOperator":
        """From a numpy function v ↦ Av (float64 arrays)."""
        import numpy as np
        return cls(lambda v: torch.from_numpy(np.asarray(fn(v.detach().cpu().numpy()), dtype=np.float64)), d, **kw)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.fn(v.to(torch.float64)).to(self.device, torch.float64)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.matvec(v) for v in V])

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Scaled(_View):
    """D H D for a diagonal D (this process's part ``scale`` of it): e.g. P^{-1/2} H P^{-1/2}, whose λ_max is
    the preconditioned sharpness of an adaptive method with preconditioner P."""

    def __init__(self, op: HessianOperator, scale: torch.Tensor):
        self.op, self.scale = op, scale.to(op.device, torch.float64)
        self.d, self.span, self.device, self.dtype, self.blocks = op.d, op.span, op.device, op.dtype, op.blocks
        self.precision = getattr(op, "precision", "fp64")


    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.scale * self.op.matmat(self.scale * V)

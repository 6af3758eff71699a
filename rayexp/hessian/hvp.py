"""Hessian-vector products of any model and loss over a fixed list of batches (docs/methods.md "HVP").

    ℓ_b(θ) = loss_fn(model, batch_b),     Σ_b H_b v = Σ_b d/dε ∇ℓ_b(θ + εv) |_{ε=0}

``loss_fn(model, batch) -> scalar`` is any differentiable function that calls ``model(...)``; the default,
``token_cross_entropy``, is the mean token cross-entropy of ``model(x)`` (or of its first output) against
y. ``HVP`` returns *sums* over its batches; ``rayexp.hessian.operator.Operator`` divides by the number of
batches over all shards. Modes (``MODES``):

- ``cached``: the first-order graph of every batch is built once (∇ℓ_b with ``create_graph``) and each
  product is one backward pass through it (PyHessian's way): fastest, most memory;
- ``double_backward``: ∇_θ (∇ℓ_b · v) from a fresh forward and backward per product;
- ``fwd_rev``: ``torch.func.jvp`` of ``torch.func.grad``; several vectors at once with ``vmap``;
- ``fd``: the central difference (∇L(θ + εv) − ∇L(θ − εv)) / 2ε, ε = ∛eps·(1 + ‖θ‖)/‖v‖ (arXiv
  2602.00816): gradients only, so any engine that computes gradients can provide it.

Precision (``DTYPES``): ``fp64`` (the exact mode), ``fp32`` (strict: TF32 off), ``tf32`` (fp32 storage,
TF32 matrix products on Ampere+). Attention: products run with the math SDPA kernel forced, which is
exact and twice differentiable, so ``sdpa`` models work as well as ``naive`` ones; dropout > 0 is refused.

Vectors are flat: θ is the concatenation of ``model.named_parameters()`` (tied weights once), in that
order. ``blocks`` names contiguous slices of it: one per parameter tensor, with the fused attention
projection, GPT's ``c_attn`` (also HF GPT-2's, as a Linear), split
into Q, K and V (rows 0:C, C:2C, 2C:3C; row-major, so slices stay contiguous).

The products are of the model in eval mode: BatchNorm uses its running statistics, so the loss is a
deterministic function of θ (docs/methods.md "Vision models").
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_map

from rayexp.config import ConfigError
from rayexp.hessian.operator import Block

MODES = ("cached", "double_backward", "fwd_rev", "fd")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp64": torch.float64}
LossFn = Callable[[Any, Any], torch.Tensor]
FUSED_QKV = (".c_attn.",)  # parameter names holding Q, K, V stacked by rows


def token_cross_entropy(model, batch) -> torch.Tensor:
    """Mean token cross-entropy of ``model(x)`` (its first output if it returns a tuple) against ``y``."""
    x, y = batch
    out = model(x)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def check_model(model: nn.Module) -> None:
    """Raise ConfigError unless the model's forward is deterministic (dropout 0), so its Hessian exists."""
    cfg = getattr(model, "config", None)
    p = max([getattr(cfg, "dropout", 0.0) or 0.0] + [m.p for m in model.modules() if isinstance(m, nn.Dropout)])
    if p > 0:
        raise ConfigError(f"model.dropout={p} makes the loss random, so the Hessian is undefined; allowed: 0.0 "
                          f"(load_model(path, dropout=0.0))")


def param_blocks(model: nn.Module, split_qkv: bool = True) -> list[Block]:
    """Blocks of the flat vector: one per parameter tensor, fused QKV (``FUSED_QKV``) split into ``.q/.k/.v``."""
    blocks, start = [], 0
    for name, p in model.named_parameters():
        n = p.numel()
        if split_qkv and any(f in name for f in FUSED_QKV) and p.shape[0] % 3 == 0:
            third = n // 3
            for i, part in enumerate("qkv"):
                blocks.append(Block(f"{name}.{part}", name, start + i * third, start + (i + 1) * third))
        else:
            blocks.append(Block(name, name, start, start + n))
        start += n
    return blocks


class Bound:
    """``model`` evaluated at parameters ``params``: calls go through ``functional_call``, ``parameters()`` and
    ``named_parameters()`` yield ``params`` (so a loss may regularize them), other attributes are the model's."""

    def __init__(self, model: nn.Module, params: dict, buffers: dict):
        self._model, self._state = model, (params, buffers)

    def __call__(self, *args, **kwargs):
        return functional_call(self._model, self._state, args, kwargs)

    def parameters(self):
        return iter(self._state[0].values())

    def named_parameters(self):
        return iter(self._state[0].items())

    def __getattr__(self, name):
        return getattr(self._model, name)


def _exact_kernels(dtype: str):
    """Context of every product: the math SDPA kernel; TF32 on only for ``tf32``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    if torch.cuda.is_available():
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
        stack.callback(lambda: (setattr(torch.backends.cuda.matmul, "allow_tf32", old[0]),
                                setattr(torch.backends.cudnn, "allow_tf32", old[1])))
    return stack


class HVP:
    """Σ_b H_b v, Σ_b ∇ℓ_b and Σ_b ℓ_b over ``batches`` (the products behind ``Operator``).

    ``theta_fn`` (parameter sharding) returns the full parameters for each product instead of a kept copy."""

    def __init__(self, model: nn.Module, batches: Sequence, loss_fn: Optional[LossFn] = None, mode: str = "cached",
                 dtype: str = "fp64", device=None, split_qkv: bool = True, theta_fn: Optional[Callable] = None):
        check_model(model)
        if mode not in MODES:
            raise ConfigError(f"hessian.mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
        if dtype not in DTYPES:
            raise ConfigError(f"hessian.dtype={dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
        if mode == "cached" and theta_fn is not None:
            raise ConfigError("hessian.mode=cached keeps the whole model's graph, so it cannot shard parameters; "
                              "allowed with shard=params: double_backward, fwd_rev, fd")
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.mode, self.precision, self.work = mode, dtype, DTYPES[dtype]
        self.model = copy.deepcopy(model).to(self.device).eval()  # its own copy: the kernel choice below is ours
        for m in self.model.modules():  # rayexp's GPT picks an SDPA kernel itself: make it the exact one
            if getattr(m, "sdpa_backend", None) not in (None, "math"):
                m.sdpa_backend = "math"
        named = list(self.model.named_parameters())
        self.names, self.shapes = [n for n, _ in named], [p.shape for _, p in named]
        self.d = sum(p.numel() for _, p in named)
        self.blocks = param_blocks(self.model, split_qkv)
        self.loss_fn = loss_fn or token_cross_entropy
        cast = lambda t: t.to(self.device, self.work) if t.is_floating_point() else t.to(self.device)  # noqa: E731
        self.buffers = {n: cast(b) for n, b in self.model.named_buffers()}
        self.batches = [tree_map(lambda t: cast(t) if isinstance(t, torch.Tensor) else t, b) for b in batches]
        self.batch_ids = list(range(len(self.batches)))  # global batch indices (a data shard's are a subset)
        self.theta_fn = theta_fn
        self.theta = None if theta_fn else {n: p.detach().to(self.work) for n, p in named}
        self.graphs: Optional[list] = None

    @property
    def n_batches(self) -> int:
        return len(self.batches)

    def subset(self, batch_ids: Sequence[int]) -> "HVP":
        """The same products over the batches with these global ids (those held here; none: zero)."""
        other = copy.copy(self)
        keep = [k for k, i in enumerate(self.batch_ids) if i in set(batch_ids)]
        other.batches, other.batch_ids = [self.batches[k] for k in keep], [self.batch_ids[k] for k in keep]
        if self.graphs is not None:
            other.graphs = (self.graphs[0], [self.graphs[1][k] for k in keep])
        return other

    # -- flat vectors --------------------------------------------------------------------------------
    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat (..., d) → {param name: (..., *shape)} views."""
        out, k, lead = {}, 0, v.shape[:-1]
        for n, s in zip(self.names, self.shapes):
            size = s.numel()
            out[n] = v[..., k:k + size].reshape(*lead, *s)
            k += size
        return out

    def flatten(self, tensors: dict[str, torch.Tensor], lead: int = 0) -> torch.Tensor:
        """{param name: (..., *shape)} → flat (..., d) (``lead`` leading batch dims)."""
        return torch.cat([tensors[n].reshape(*tensors[n].shape[:lead], -1) for n in self.names], dim=-1)

    def params(self) -> dict[str, torch.Tensor]:
        """θ as {name: tensor} in the working dtype (gathered per call under parameter sharding)."""
        if self.theta_fn is None:
            return self.theta
        return {n: t.to(self.work) for n, t in self.unflatten(self.theta_fn()).items()}

    # -- loss and gradient ---------------------------------------------------------------------------
    def _loss(self, params: dict, batch) -> torch.Tensor:
        return self.loss_fn(Bound(self.model, params, self.buffers), batch)

    def loss_sum(self) -> float:
        """Σ_b ℓ_b(θ)."""
        theta = self.params()
        with torch.no_grad(), _exact_kernels(self.precision):
            return float(sum(float(self._loss(theta, b)) for b in self.batches))

    def grad_sum(self, theta: Optional[dict] = None) -> torch.Tensor:
        """Σ_b ∇ℓ_b(θ), flat in the working dtype."""
        theta = self.params() if theta is None else theta
        out = torch.zeros(self.d, dtype=self.work, device=self.device)
        with _exact_kernels(self.precision):
            for b in self.batches:
                out += self.flatten(grad(self._loss)(theta, b))
        return out

    # -- products --------------------------------------------------------------------------------------
    def hvp_sum(self, V: torch.Tensor) -> torch.Tensor:
        """Σ_b H_b vᵢ for each row vᵢ of V (n, d); rows of one call share a vmapped or batched pass."""
        V = V.to(self.device, self.work)
        theta = self.params() if self.mode != "cached" else None  # a collective under sharding: every rank
        if not self.batches:
            return torch.zeros_like(V)
        with _exact_kernels(self.precision):
            if self.mode == "fwd_rev":
                return self._fwd_rev(V, theta)
            if self.mode == "cached":
                return self._cached(V)
            if self.mode == "fd":
                return torch.stack([self._fd(v, theta) for v in V])
            return torch.stack([self._double_backward(v, theta) for v in V])

    def _fwd_rev(self, V: torch.Tensor, theta: dict) -> torch.Tensor:
        out = torch.zeros_like(V)
        for b in self.batches:
            one = lambda t: self.flatten(jvp(lambda p: grad(self._loss)(p, b), (theta,), (self.unflatten(t),))[1])  # noqa: E731
            out += vmap(one)(V) if len(V) > 1 else one(V[0]).unsqueeze(0)
        return out

    def _double_backward(self, v: torch.Tensor, theta: dict) -> torch.Tensor:
        theta = {n: t.detach().requires_grad_() for n, t in theta.items()}
        tangents, out = self.unflatten(v), torch.zeros_like(v)
        with torch.enable_grad():
            for b in self.batches:
                gs = torch.autograd.grad(self._loss(theta, b), list(theta.values()), create_graph=True,
                                         allow_unused=True, materialize_grads=True)
                dot = sum((g * tangents[n]).sum() for g, n in zip(gs, self.names) if g.requires_grad)
                if not torch.is_tensor(dot):  # a loss linear in θ: H = 0
                    continue
                hv = torch.autograd.grad(dot, list(theta.values()), allow_unused=True)
                out += self.flatten({n: h if h is not None else torch.zeros_like(theta[n]) for n, h in zip(self.names, hv)})
        return out

    def build_graphs(self) -> None:
        """The first-order graphs of every batch, kept for ``cached`` products."""
        leaves = {n: t.detach().requires_grad_() for n, t in self.params().items()}
        with torch.enable_grad(), _exact_kernels(self.precision):
            per_batch = [torch.autograd.grad(self._loss(leaves, b), list(leaves.values()), create_graph=True,
                                             allow_unused=True, materialize_grads=True) for b in self.batches]
        self.graphs = (leaves, per_batch)

    def _cached(self, V: torch.Tensor) -> torch.Tensor:
        if self.graphs is None:
            self.build_graphs()
        leaves, per_batch = self.graphs
        outs = [g for gs in per_batch for g in gs]
        rows = []
        for v in V:  # one backward through all batches' graphs: Σ_b H_b v
            tangents = self.unflatten(v)
            cot = [tangents[n] for _ in per_batch for n in self.names]
            used = [(o, c) for o, c in zip(outs, cot) if o.requires_grad]
            if not used:  # a loss linear in θ: H = 0
                rows.append(torch.zeros_like(v))
                continue
            hv = torch.autograd.grad([o for o, _ in used], list(leaves.values()), [c for _, c in used],
                                     retain_graph=True, allow_unused=True)
            rows.append(self.flatten({n: h if h is not None else torch.zeros_like(leaves[n])
                                      for n, h in zip(self.names, hv)}))
        return torch.stack(rows)

    def _fd(self, v: torch.Tensor, theta: dict) -> torch.Tensor:
        flat = self.flatten(theta)
        eps = torch.finfo(self.work).eps ** (1 / 3) * (1 + float(flat.norm())) / max(float(v.norm()), 1e-300)
        plus = self.grad_sum(self.unflatten(flat + eps * v))
        minus = self.grad_sum(self.unflatten(flat - eps * v))
        return (plus - minus) / (2 * eps)

    def free(self) -> None:
        """Drop the cached graphs (memory)."""
        self.graphs = None

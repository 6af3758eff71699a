"""Hessian-vector products of a model's mean loss over a fixed list of batches.

    L(θ) = (1/n) Σ_b ℓ(θ; x_b, y_b),   ℓ = mean token cross-entropy of ``model(x)[0]`` against y,
    Hv   = d/dε ∇L(θ + εv) |_{ε=0}     (ALGORITHMS.md "HVP"; Pearlmutter 1994)

computed either forward-over-reverse (``fwd_rev``: ``torch.func.jvp`` of ``torch.func.grad`` of a
``functional_call``) or by double backward (``double_backward``: ∇_θ (∇ℓ · v)). The loss is computed
here from the logits in the working dtype (the model's own loss may upcast to fp32 only), so fp64 is
fp64 throughout.

Vectors are flat: θ is the concatenation of ``model.named_parameters()`` (tied weights once), in that
order. ``blocks`` names contiguous slices of it: one per parameter tensor, with GPT's fused attention
``c_attn`` weight/bias split into Q, K and V (rows 0:C, C:2C, 2:3C; row-major, so slices stay contiguous).

Models need exact, twice-differentiable forwards with no randomness: dropout > 0 or fused ``sdpa``
attention are refused with a ConfigError (load checkpoints with ``attention="naive", dropout=0.0``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from rayexp.config import ConfigError

MODES = ("fwd_rev", "double_backward")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


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


def check_model(model: nn.Module) -> None:
    """Raise ConfigError unless the model's forward is exact and deterministic (HVP-able)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "attention", "naive") != "naive":
        raise ConfigError(f"model.attention={cfg.attention!r} has no double backward / forward-mode AD, so no "
                          f"Hessian-vector products; allowed: naive (load_model(path, attention='naive'))")
    p = max([getattr(cfg, "dropout", 0.0) or 0.0] + [m.p for m in model.modules() if isinstance(m, nn.Dropout)])
    if p > 0:
        raise ConfigError(f"model.dropout={p} makes the loss random, so the Hessian is undefined; allowed: 0.0 "
                          f"(load_model(path, dropout=0.0))")


def param_blocks(model: nn.Module, split_qkv: bool = True) -> list[Block]:
    """Blocks of the flat vector: one per parameter tensor, ``*.c_attn.*`` split into ``.q/.k/.v``."""
    blocks, start = [], 0
    for name, p in model.named_parameters():
        n = p.numel()
        if split_qkv and ".c_attn." in name and p.shape[0] % 3 == 0:
            third = n // 3
            for i, part in enumerate("qkv"):
                blocks.append(Block(f"{name}.{part}", name, start + i * third, start + (i + 1) * third))
        else:
            blocks.append(Block(name, name, start, start + n))
        start += n
    return blocks


def _as_batches(batches: Iterable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = [(torch.as_tensor(x), torch.as_tensor(y)) for x, y in batches]
    if not out:
        raise ValueError("HVP needs at least one (x, y) batch; got none")
    return out


class HVP:
    """The operator v ↦ Hv of the mean loss over ``batches`` (flat d-vectors), with a call counter.

    ``op(v)`` takes a flat tensor (any dtype/device) or numpy array and returns Hv in float64 on v's device
    (numpy in, numpy out). ``op.count`` is the number of full Hessian-vector products computed.
    """

    def __init__(self, model: nn.Module, batches: Sequence, mode: str = "fwd_rev", dtype: str = "fp64",
                 device: Optional[str | torch.device] = None, split_qkv: bool = True):
        check_model(model)
        if mode not in MODES:
            raise ConfigError(f"hessian.mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
        if dtype not in DTYPES:
            raise ConfigError(f"hessian.dtype={dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.mode, self.dtype = mode, DTYPES[dtype]
        self.model = model if first.device == self.device else copy.deepcopy(model).to(self.device)
        named = list(self.model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.theta = {n: p.detach().to(self.dtype) for n, p in named}
        self.buffers = {n: (b.to(self.dtype) if b.is_floating_point() else b)
                        for n, b in self.model.named_buffers()}
        self.blocks = param_blocks(self.model, split_qkv)
        self.d = sum(p.numel() for _, p in named)
        self.batches = [(x.to(self.device), y.to(self.device)) for x, y in _as_batches(batches)]
        self.count = 0

    # -- views -------------------------------------------------------------------------------------
    def with_batches(self, batches: Sequence) -> "HVP":
        """The same operator (parameters, mode, dtype) over other batches; shares θ, resets the count."""
        other = copy.copy(self)
        other.batches = [(x.to(self.device), y.to(self.device)) for x, y in _as_batches(batches)]
        other.count = 0
        return other

    def block(self, name: str) -> Block:
        """The block called ``name``."""
        for b in self.blocks:
            if b.name == name:
                return b
        raise ValueError(f"unknown block {name!r}; allowed: {', '.join(b.name for b in self.blocks)}")

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat (..., d) → {param name: (..., *shape)} views."""
        out, k = {}, 0
        lead = v.shape[:-1]
        for n, s in zip(self.names, self.shapes):
            size = int(np.prod(s)) if len(s) else 1
            out[n] = v[..., k:k + size].reshape(*lead, *s)
            k += size
        return out

    def flatten(self, tensors: dict[str, torch.Tensor], lead: int = 0) -> torch.Tensor:
        """{param name: (..., *shape)} → flat (..., d) (``lead`` leading batch dims)."""
        return torch.cat([tensors[n].reshape(*tensors[n].shape[:lead], -1) for n in self.names], dim=-1)

    def params_flat(self) -> torch.Tensor:
        """θ as a flat float64 vector."""
        return self.flatten(self.theta).double()

    # -- loss, gradient, HVP -----------------------------------------------------------------------
    def loss_fn(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ(θ; x, y): mean token cross-entropy of the model's logits, in the working dtype."""
        logits = functional_call(self.model, (params, self.buffers), (x,))[0]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).to(self.dtype), y.reshape(-1))

    def loss(self) -> float:
        """L(θ) over the batches."""
        with torch.no_grad():
            return float(sum(self.loss_fn(self.theta, x, y) for x, y in self.batches) / len(self.batches))

    def grad(self) -> torch.Tensor:
        """∇L(θ), flat float64."""
        g = None
        for x, y in self.batches:
            gb = self.flatten(grad(self.loss_fn)(self.theta, x, y))
            g = gb if g is None else g + gb
        return (g / len(self.batches)).double()

    def _hvp_one(self, tangents: dict, x, y) -> dict:
        if self.mode == "fwd_rev":
            return jvp(lambda p: grad(self.loss_fn)(p, x, y), (self.theta,), (tangents,))[1]
        params = {n: t.detach().requires_grad_() for n, t in self.theta.items()}
        with torch.enable_grad():
            gs = torch.autograd.grad(self.loss_fn(params, x, y), list(params.values()), create_graph=True)
            dot = sum((g * tangents[n]).sum() for g, n in zip(gs, self.names))
            hv = torch.autograd.grad(dot, list(params.values()), allow_unused=True)
        return {n: (h if h is not None else torch.zeros_like(self.theta[n])).detach() for n, h in zip(self.names, hv)}

    def _to_work(self, v) -> tuple[torch.Tensor, Callable]:
        if isinstance(v, np.ndarray):
            return torch.from_numpy(v).to(self.device, self.dtype), lambda r: r.double().cpu().numpy()
        dev = v.device
        return v.to(self.device, self.dtype), lambda r: r.double().to(dev)

    def __call__(self, v) -> torch.Tensor | np.ndarray:
        """Hv = (1/n) Σ_b H_b v for a flat d-vector v."""
        w, back = self._to_work(v)
        if w.shape != (self.d,):
            raise ValueError(f"HVP expects a vector of length d={self.d}; got shape {tuple(w.shape)}")
        tangents = self.unflatten(w)
        out = None
        for x, y in self.batches:
            hb = self.flatten(self._hvp_one(tangents, x, y))
            out = hb if out is None else out + hb
        self.count += 1
        return back(out / len(self.batches))

    def many(self, V, chunk: int = 0) -> torch.Tensor | np.ndarray:
        """H V for the rows of V (n, d). ``fwd_rev`` batches rows with ``torch.func.vmap`` (``chunk`` rows
        at a time, 0 = all); ``double_backward`` loops."""
        W, back = self._to_work(V)
        if self.mode != "fwd_rev":
            return back(torch.stack([self(W[i]) for i in range(len(W))]))
        out = torch.zeros_like(W)
        step = chunk or len(W)
        for x, y in self.batches:
            f = vmap(lambda t: self.flatten(self._hvp_one(self.unflatten(t), x, y)))
            for i in range(0, len(W), step):
                out[i:i + step] += f(W[i:i + step])
        self.count += len(W)
        return back(out / len(self.batches))

    # -- blocks ------------------------------------------------------------------------------------
    def block_matvec(self, block: Block) -> Callable:
        """v_b ↦ H_bb v_b: the diagonal block's operator on vectors of length ``block.size``."""
        def mv(vb):
            w, back = self._to_work(vb)
            full = torch.zeros(self.d, dtype=self.dtype, device=self.device)
            full[block.slice] = w
            return back(self(full)[block.slice])
        return mv

    def block_many(self, blocks: Sequence[Block], vs: Sequence, chunk: int = 0) -> list:
        """[H_bb v_b for each (block, v_b)]: one vmapped product over block-supported tangents."""
        V = torch.zeros(len(blocks), self.d, dtype=self.dtype, device=self.device)
        for i, (b, vb) in enumerate(zip(blocks, vs)):
            V[i, b.slice] = self._to_work(vb)[0]
        HV = self.many(V, chunk)
        outs = []
        for i, (b, vb) in enumerate(zip(blocks, vs)):
            r = HV[i, b.slice]
            outs.append(r.cpu().numpy() if isinstance(vb, np.ndarray) else r.double().to(vb.device))
        return outs


def dense_hessian(op: HVP) -> torch.Tensor:
    """The full d×d Hessian from d HVPs with basis vectors (small models only; float64)."""
    return op.many(torch.eye(op.d, dtype=torch.float64, device=op.device), chunk=256).T.contiguous()

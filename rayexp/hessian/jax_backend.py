"""JAX backend of the curvature engine: our torch models ported to pure JAX functions of a params pytree.

    params = params_from_torch(model)                 # {torch parameter name: jnp array}
    loss_fn(params, x, y, arch(model))                # mean token cross-entropy (= GPT.forward's loss)
    hvp = jax_hvp_fn(model, batches)                  # numpy v ↦ Hv, flat d-vectors
    op = Operator(JaxProducts(model, batches, "fp64"))  # what hessian.backend=jax builds (plan.build_operator)
    Hv  = d/dε ∇L(θ + εv)|_{ε=0} = jax.jvp(jax.grad(L), (θ,), (v,))[1]   (docs/methods.md "HVP")

The ports follow ``rayexp.models``: GPT-2 (pre-LN or post-LN blocks, learned positions, exact-erf GELU as
``F.gelu``'s default, explicit causal softmax attention, LayerNorm eps 1e-5, optional biases, ``lm_head``
tied to ``wte``), ``TokenMLP`` and ``TokenCNN``. They are the deterministic (eval) forwards: no dropout,
and the attention kernel setting is irrelevant (JAX always runs the exact softmax).

Flat vectors use torch's ordering: the concatenation of ``model.named_parameters()`` (tied weights once,
as ``model.parameters()`` yields them), each tensor row-major, so they plug into the torch estimators
(``rayexp.hessian.lanczos.numpy_matvec``) and compare entry by entry with ``rayexp.hessian.HVP``.

Float64: JAX computes in float32 unless x64 is enabled. ``jax.config.update("jax_enable_x64", True)``
would switch it for the whole process (every other JAX user, e.g. ``jnp.arange`` turning int64), so we
enable it only around our own work with the thread-local ``jax.enable_x64`` context; jit keys its cache
on that flag, so the compiled float64 functions are reused on every call.

Compilation: ``grad_batch``/``hvp_batch`` are module-level jits with the static ``Arch``, so every operator
over models of one architecture, batch shape and dtype shares one compiled program.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, NamedTuple, Sequence

import copy

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn

from rayexp.config import ConfigError
from rayexp.hessian.hvp import HVP, param_blocks

DTYPES = {"float64": np.float64, "fp64": np.float64, "float32": np.float32, "fp32": np.float32}
LN_EPS = 1e-5  # nn.LayerNorm's default, as in GPT's blocks


def _dtype(dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"hessian.dtype={dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def x64(dtype: str = "float64"):
    """Context in which JAX computes in ``dtype``: x64 on for float64, off for float32 (thread-local)."""
    return jax.enable_x64(_dtype(dtype) == np.float64)


# -- layers ----------------------------------------------------------------------------------------
def linear(x, w, b=None):
    """x Wᵀ + b, as ``nn.Linear`` (W: out × in)."""
    y = x @ w.T
    return y if b is None else y + b


def layer_norm(x, w, b=None, eps: float = LN_EPS):
    """(x − μ) / √(σ² + eps) · w + b over the last axis (biased variance, as ``nn.LayerNorm``)."""
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / jnp.sqrt(var + eps) * w
    return y if b is None else y + b


def gelu(x):
    """Exact GELU x Φ(x) (erf form, ``F.gelu``'s default)."""
    return jax.nn.gelu(x, approximate=False)


def causal_attention(p: dict, pre: str, x, n_head: int):
    """Multi-head causal self-attention with explicit softmax(QKᵀ/√d_h + mask) V, then ``c_proj``."""
    B, T, C = x.shape
    q, k, v = jnp.split(linear(x, p[pre + "c_attn.weight"], p.get(pre + "c_attn.bias")), 3, axis=-1)
    q, k, v = (t.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3) for t in (q, k, v))
    att = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(C // n_head))
    att = jnp.where(jnp.tril(jnp.ones((T, T), dtype=bool)), att, -jnp.inf)
    y = (jax.nn.softmax(att, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return linear(y, p[pre + "c_proj.weight"], p.get(pre + "c_proj.bias"))


# -- models ----------------------------------------------------------------------------------------
class Arch(NamedTuple):
    """The static (hashable) shape of a ported model: which forward, and the sizes not in the weights."""
    kind: str  # gpt | mlp | cnn
    n_layer: int
    n_head: int = 0
    kernel: int = 0
    norm: str = "pre"  # GPT's LayerNorm placement (rayexp.config.NORMS)


def _ln(p: dict, name: str, x):
    """The LayerNorm ``name`` of a ported model (``name.weight``, optional ``name.bias``)."""
    return layer_norm(x, p[name + ".weight"], p.get(name + ".bias"))


def _gpt_mlp(p: dict, pre: str, x):
    """GPT's MLP: c_proj(GELU(c_fc x))."""
    h = gelu(linear(x, p[pre + "mlp.c_fc.weight"], p.get(pre + "mlp.c_fc.bias")))
    return linear(h, p[pre + "mlp.c_proj.weight"], p.get(pre + "mlp.c_proj.bias"))


def gpt_forward(p: dict, idx, a: Arch):
    """GPT-2 logits (B, T, V): wte[idx] + wpe[:T] → blocks → x wteᵀ (tied head). Pre-LN blocks
    x + attn(LN₁ x), x + mlp(LN₂ x), then ln_f; post-LN blocks LN₁(x + attn x), LN₂(x + mlp x), no ln_f."""
    T = idx.shape[1]
    x = p["transformer.wte.weight"][idx] + p["transformer.wpe.weight"][:T]
    for i in range(a.n_layer):
        pre = f"transformer.h.{i}."
        if a.norm == "post":
            x = _ln(p, pre + "ln_1", x + causal_attention(p, pre + "attn.", x, a.n_head))
            x = _ln(p, pre + "ln_2", x + _gpt_mlp(p, pre, x))
        else:
            x = x + causal_attention(p, pre + "attn.", _ln(p, pre + "ln_1", x), a.n_head)
            x = x + _gpt_mlp(p, pre, _ln(p, pre + "ln_2", x))
    if a.norm != "post":
        x = _ln(p, "transformer.ln_f", x)
    return x @ p["transformer.wte.weight"].T


def mlp_forward(p: dict, idx, a: Arch):
    """TokenMLP logits: wte[idx] → residual x + W₂ GELU(W₁ x) blocks → linear head."""
    x = p["wte.weight"][idx]
    for i in range(a.n_layer):
        x = x + linear(gelu(linear(x, p[f"fc.{i}.weight"], p.get(f"fc.{i}.bias"))),
                       p[f"proj.{i}.weight"], p.get(f"proj.{i}.bias"))
    return linear(x, p["lm_head.weight"], p.get("lm_head.bias"))


def cnn_forward(p: dict, idx, a: Arch):
    """TokenCNN logits: wte[idx] → residual x + GELU(causal conv_k(x)) blocks → linear head.

    conv: y[t, o] = b[o] + Σ_{j<k} Σ_c W[o, c, j] x[t − k + 1 + j, c], with x left-padded by k − 1 zeros."""
    x = p["wte.weight"][idx]
    T, k = idx.shape[1], a.kernel
    for i in range(a.n_layer):
        xp = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
        win = jnp.stack([xp[:, j:j + T] for j in range(k)], axis=-1)  # (B, T, C, k)
        y = jnp.einsum("btcj,ocj->bto", win, p[f"convs.{i}.weight"])
        if f"convs.{i}.bias" in p:
            y = y + p[f"convs.{i}.bias"]
        x = x + gelu(y)
    return linear(x, p["lm_head.weight"], p.get("lm_head.bias"))


FORWARDS = {"gpt": gpt_forward, "mlp": mlp_forward, "cnn": cnn_forward}


def arch(model: nn.Module) -> Arch:
    """The Arch of a torch GPT, TokenMLP or TokenCNN (ValueError for anything else)."""
    kind = {"GPT": "gpt", "TokenMLP": "mlp", "TokenCNN": "cnn"}.get(type(model).__name__)
    if kind is None:
        raise ValueError(f"model {type(model).__name__} has no JAX port; allowed: GPT, TokenMLP, TokenCNN")
    c = model.config
    return Arch(kind, c.n_layer, getattr(c, "n_head", 0), getattr(c, "kernel", 0), getattr(c, "norm", "pre"))


def forward(params: dict, idx, a: Arch):
    """Logits (B, T, V) of the ported model ``a`` at ``params``."""
    return FORWARDS[a.kind](params, idx, a)


def loss_fn(params: dict, x, y, a: Arch):
    """ℓ(θ; x, y) = mean over tokens of −log softmax(logits)[y], as ``GPT.forward``'s cross-entropy."""
    logits = forward(params, x, a)
    logp = jax.nn.log_softmax(logits.reshape(-1, logits.shape[-1]), axis=-1)
    return -jnp.take_along_axis(logp, y.reshape(-1, 1), axis=1).mean()


loss_batch = jax.jit(loss_fn, static_argnums=3)  # ℓ(θ; x, y), compiled like grad_batch


@partial(jax.jit, static_argnums=3)
def grad_batch(params: dict, x, y, a: Arch) -> dict:
    """∇ℓ(θ; x, y) as a params pytree (jitted; compiled once per Arch, shapes and dtype)."""
    return jax.grad(loss_fn)(params, x, y, a)


@partial(jax.jit, static_argnums=4)
def hvp_batch(params: dict, v: dict, x, y, a: Arch) -> dict:
    """∇²ℓ(θ; x, y) v = jvp of ∇ℓ at θ along v (forward-over-reverse; jitted like ``grad_batch``)."""
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, x, y, a), (params,), (v,))[1]


# -- torch ↔ JAX -----------------------------------------------------------------------------------
def params_from_torch(model: nn.Module, dtype: str = "float64") -> dict:
    """{name: jnp array} for each of ``model.named_parameters()`` (tied weights once), cast to ``dtype``."""
    arch(model)
    with x64(dtype):
        return {n: jnp.asarray(p.detach().cpu().double().numpy().astype(_dtype(dtype)))
                for n, p in model.named_parameters()}


def flatten(tree: dict, names: Sequence[str]) -> np.ndarray:
    """Concatenate ``tree[n]`` (row-major) in the order ``names`` (torch's), as a float64 numpy vector."""
    return np.concatenate([np.asarray(tree[n], dtype=np.float64).reshape(-1) for n in names])


def unflatten(v: np.ndarray, params: dict) -> dict:
    """Split a flat numpy vector into {name: jnp array} shaped and typed like ``params``; inverse of flatten."""
    out, k = {}, 0
    for n, p in params.items():
        out[n] = jnp.asarray(v[k:k + p.size].reshape(p.shape), dtype=p.dtype)
        k += p.size
    return out


class _Setup(NamedTuple):
    params: dict
    data: list
    arch: Arch
    d: int


def _setup(model: nn.Module, batches: Sequence, dtype: str) -> _Setup:
    params = params_from_torch(model, dtype)
    with x64(dtype):
        data = [(jnp.asarray(np.asarray(x), dtype=jnp.int32), jnp.asarray(np.asarray(y), dtype=jnp.int32))
                for x, y in batches]
    if not data:
        raise ValueError("JAX HVP needs at least one (x, y) batch; got none")
    T, block = max(x.shape[1] for x, _ in data), model.config.block_size
    if T > block:  # JAX clamps wpe[:T] silently; torch raises
        raise ValueError(f"batch sequence length {T} exceeds model.block_size {block}")
    return _Setup(params, data, arch(model), sum(p.size for p in params.values()))


def _sum_over(data: list, fn: Callable) -> dict:
    out = None
    for x, y in data:
        t = fn(x, y)
        out = t if out is None else jax.tree.map(jnp.add, out, t)
    return out


def _mean_over(data: list, fn: Callable) -> dict:
    return jax.tree.map(lambda a: a / len(data), _sum_over(data, fn))


def _vector(v, d: int, what: str) -> np.ndarray:
    v = np.asarray(v)
    if v.shape != (d,):
        raise ValueError(f"JAX {what} expects a vector of length d={d}; got shape {v.shape}")
    return v


def jax_hvp_fn(model: nn.Module, batches: Sequence, dtype: str = "float64") -> Callable[[np.ndarray], np.ndarray]:
    """v ↦ Hv = (1/n) Σ_b ∇²ℓ(θ; x_b, y_b) v at the model's θ, by ``jax.jvp(jax.grad(ℓ))`` (jitted).

    ``batches``: (x, y) pairs of token ids (torch tensors or numpy). v and Hv are flat numpy vectors of
    length d = Σ numel over ``model.parameters()``, in its order; computed in ``dtype``, returned as float64."""
    s = _setup(model, batches, dtype)
    names = list(s.params)

    def hvp(v: np.ndarray) -> np.ndarray:
        v = _vector(v, s.d, "HVP")
        with x64(dtype):
            tangent = unflatten(v, s.params)
            return flatten(_mean_over(s.data, lambda x, y: hvp_batch(s.params, tangent, x, y, s.arch)), names)

    return hvp


def jax_grad_fn(model: nn.Module, batches: Sequence, dtype: str = "float64") -> Callable[..., np.ndarray]:
    """θ ↦ ∇L(θ) = (1/n) Σ_b ∇ℓ(θ; x_b, y_b) by ``jax.grad`` (jitted); flat numpy in and out (float64 out).

    Called with no argument, θ is the model's parameters (torch ordering, as ``jax_hvp_fn``)."""
    s = _setup(model, batches, dtype)
    names = list(s.params)

    def grad(theta: np.ndarray | None = None) -> np.ndarray:
        with x64(dtype):
            params = s.params if theta is None else unflatten(_vector(theta, s.d, "gradient"), s.params)
            return flatten(_mean_over(s.data, lambda x, y: grad_batch(params, x, y, s.arch)), names)

    return grad


# -- the engine's products ---------------------------------------------------------------------------
class JaxProducts:
    """Σ_b H_b v, Σ_b ∇ℓ_b and Σ_b ℓ_b of the JAX port over ``batches``: the products behind
    ``rayexp.hessian.operator.Operator`` with ``hessian.backend=jax`` (docs/methods.md "Backends"), on flat
    float64 torch vectors in torch's parameter order, with the blocks of ``rayexp.hessian.hvp.param_blocks``."""
    mode = "jax"
    graphs = None  # nothing cached between products (the compiled programs are module-level)
    flatten, unflatten = HVP.flatten, HVP.unflatten  # {name: tensor} ↔ flat torch vectors (``Rotated``)

    def __init__(self, model: nn.Module, batches: Sequence, dtype: str = "fp64"):
        if dtype not in ("fp32", "fp64"):
            raise ConfigError(f"hessian.dtype={dtype} has no JAX counterpart; allowed with hessian.backend=jax: "
                              f"fp32, fp64")
        try:
            arch(model)
        except ValueError:
            raise ConfigError(f"hessian.backend=jax: {type(model).__name__} has no JAX port; allowed: model.kind "
                              f"gpt2, cnn, mlp, or hessian.backend=torch") from None
        self.s = _setup(model, batches, dtype)
        self.precision, self.device = dtype, torch.device("cpu")
        self.names = list(self.s.params)
        self.shapes = [torch.Size(p.shape) for p in self.s.params.values()]
        self.d, self.blocks = self.s.d, param_blocks(model)
        self.batch_ids = list(range(len(self.s.data)))
        self.hvp_sum(torch.zeros(1, self.d))  # compile here, so that the memory plan times a compiled product

    @property
    def n_batches(self) -> int:
        return len(self.s.data)

    def subset(self, batch_ids: Sequence[int]) -> "JaxProducts":
        """The same products over the batches with these global ids."""
        other = copy.copy(self)
        keep = [k for k, i in enumerate(self.batch_ids) if i in set(batch_ids)]
        other.s = self.s._replace(data=[self.s.data[k] for k in keep])
        other.batch_ids = [self.batch_ids[k] for k in keep]
        return other

    def _run(self, fn: Callable) -> np.ndarray:
        with x64(self.precision):
            return flatten(_sum_over(self.s.data, fn), self.names)

    def hvp_sum(self, V: torch.Tensor) -> torch.Tensor:
        """Σ_b H_b vᵢ for each row vᵢ of V (n, d), float64."""
        if not self.s.data:
            return torch.zeros_like(V, dtype=torch.float64)
        rows = []
        for v in V.detach().cpu().double().numpy():
            with x64(self.precision):
                t = unflatten(v, self.s.params)
            rows.append(self._run(lambda x, y: hvp_batch(self.s.params, t, x, y, self.s.arch)))
        return torch.from_numpy(np.stack(rows))

    def grad_sum(self) -> torch.Tensor:
        return torch.from_numpy(self._run(lambda x, y: grad_batch(self.s.params, x, y, self.s.arch)))

    def loss_sum(self) -> float:
        with x64(self.precision):
            return float(sum(float(loss_batch(self.s.params, x, y, self.s.arch)) for x, y in self.s.data))

    def free(self) -> None:
        """Nothing to drop (the plan's call for cached graphs)."""

"""Adam / AdamW (Kingma & Ba 2015, Alg. 1; Loshchilov & Hutter 2019, Alg. 2), with the second moment
shared over a group of coordinates and optionally frozen in time.

    m ← β₁ m + (1 − β₁) g
    v ← β₂ v + (1 − β₂) · mean_{group}(g²)        (not updated after step K = freeze_v_after)
    d = (m / (1 − β₁ᵗ)) / (√v / √(1 − β₂^min(t,K)) + ε)  ;   θ ← θ − lr·d

Granularity of v (docs/methods.md, "Second-moment granularity": the "dimensions" axis of arXiv 2410.19964;
arXiv 2410.08198 calls the shared-v case blockwise Adam and the one-scalar case AdaSGD); the "time" axis
is beta2 and ``freeze_v_after``:

- ``coordinate``: one v per coordinate: Adam (the same float operations as torch.optim.Adam).
- ``row``: per output neuron, mean of g² over dims 1.. of the weight (shape (out, in, ...)).
- ``column``: per input neuron, mean of g² over dims 0, 2, 3, ... .
- ``tensor``: one v per parameter tensor.
- ``global``: one scalar for the whole model, mean of g² over every coordinate of every parameter with a
  gradient (all param groups): normalised SGD with momentum.

Tensors with fewer than 2 dims (biases, LayerNorm) have no rows/columns: there ``row`` and ``column``
mean ``tensor`` (one v for the vector). On a one-coordinate problem every granularity is Adam.

Weight decay: ``adam`` couples it (g ← g + wd·θ, as torch.optim.Adam), ``adamw`` decouples it
(θ ← θ(1 − lr·wd) before the step, as torch.optim.AdamW).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from rayexp.config import GRANULARITIES
from rayexp.optim.core import Family


def v_shape(shape: torch.Size, granularity: str) -> list[int]:
    """Shape of v for a parameter of ``shape`` (broadcastable against it)."""
    nd = len(shape)
    if granularity == "coordinate":
        return list(shape)
    if granularity == "global":
        return []
    if granularity == "row" and nd >= 2:
        return [shape[0]] + [1] * (nd - 1)
    if granularity == "column" and nd >= 2:
        return [1, shape[1]] + [1] * (nd - 2)
    if granularity in ("row", "column", "tensor"):
        return [1] * nd
    raise ValueError(f"optimizer.granularity: {granularity!r}; allowed: {', '.join(GRANULARITIES)}")


def mean_square(g: torch.Tensor, granularity: str) -> torch.Tensor:
    """mean(g²) over each group of ``granularity`` (not for coordinate/global), shaped like v."""
    sq, nd = g * g, g.dim()
    if granularity == "row" and nd >= 2:
        return sq.mean(dim=tuple(range(1, nd)), keepdim=True)
    if granularity == "column" and nd >= 2:
        return sq.mean(dim=(0,) + tuple(range(2, nd)), keepdim=True)
    return sq.mean().reshape([1] * nd)


def adam_init(p: torch.Tensor, hp: dict) -> dict:
    """m = 0 like p; v = 0 with the granularity's shape."""
    return {"exp_avg": torch.zeros_like(p),
            "exp_avg_sq": torch.zeros(v_shape(p.shape, hp["granularity"]), dtype=p.dtype, device=p.device)}


def adam_prepare(opt, items, rgrads) -> dict:
    """For ``global`` granularity: the mean of g² over all coordinates with a gradient."""
    if not any(it.group["granularity"] == "global" for it in items):
        return {}
    up = [g.to(torch.promote_types(g.dtype, torch.float32)) for g in rgrads]
    total = sum((g * g).sum() for g in up)
    return {"global_sq": total / sum(g.numel() for g in rgrads)}


def adam_update(g: torch.Tensor, state: dict, hp: dict, ctx: dict) -> torch.Tensor:
    """The Adam direction d (module docstring); m and v are updated in place."""
    beta1, beta2 = hp["betas"]
    gran, freeze = hp["granularity"], hp["freeze_v_after"]
    step = int(state["step"].item())
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    if freeze is None or step <= freeze:
        if gran == "coordinate":
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        elif gran == "global":
            v.mul_(beta2).add_((1 - beta2) * ctx["global_sq"].to(v))
        else:
            v.mul_(beta2).add_(mean_square(g, gran), alpha=1 - beta2)
    t2 = step if freeze is None else min(step, freeze)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** t2
    denom = (v.sqrt() / math.sqrt(bias2)).add_(hp["eps"])
    return (m / bias1) / denom


def adam_update_many(gs: list, states: list, hp: dict, ctx: dict) -> Optional[list]:
    """``adam_update`` for tensors at one step count with coordinate v, in a few foreach kernels (the same
    float operations, so the same bits); None for the other granularities."""
    if hp["granularity"] != "coordinate":
        return None
    beta1, beta2 = hp["betas"]
    freeze, step = hp["freeze_v_after"], int(states[0]["step"].item())
    ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    torch._foreach_lerp_(ms, gs, 1 - beta1)
    if freeze is None or step <= freeze:
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    t2 = step if freeze is None else min(step, freeze)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** t2
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, math.sqrt(bias2))
    torch._foreach_add_(denom, hp["eps"])
    ds = torch._foreach_div(ms, bias1)
    torch._foreach_div_(ds, denom)
    return ds


def _state_floats(cfg) -> float:
    return 2.0 if cfg.granularity == "coordinate" else 1.0  # + one v per row/column/tensor/model


_COMMON = dict(init=adam_init, update=adam_update, update_many=adam_update_many, prepare=adam_prepare,
               state_floats=_state_floats,
               options=("lr", "betas", "eps", "weight_decay", "granularity", "freeze_v_after"),
               linear_state=("exp_avg",))
ADAM = Family(name="adam", decoupled_wd=False,
              description="Adam, L2 weight decay (== torch.optim.Adam); v per coordinate|row|column|tensor|global",
              **_COMMON)
ADAMW = Family(name="adamw", decoupled_wd=True,
               description="AdamW, decoupled weight decay (== torch.optim.AdamW); v granularity as adam",
               **_COMMON)

"""Fused zoo steps: each family's update over a whole bucket of tensors as one compiled function.

``ZooOptimizer`` (``optimizer.fused``, on by default for CUDA parameters) calls ``STEPS[family]`` with
the tensors of one param group at one step count:

    step(ps, gs, states, hp, ctx, apply) -> directions | None

It updates the state in place and, when ``apply`` (no rotation), θ too, returning None; under a rotation
it returns the directions d̃ (the caller un-rotates and applies them). The math is the per-tensor
``update`` of sgd.py / signum.py / adam.py / mada.py written over the list; ``torch.compile`` (inductor)
turns each tensor's chain of element-wise ops into one kernel, so g, state and θ are read and written
once instead of ~10 times. tests/test_optim_fused.py checks it against the per-tensor reference.

Scalars that change every step (lr, bias corrections, MADA's coefficients) are Python floats used in
tensor arithmetic only, never as ``alpha=``/``value=`` (which would make dynamo specialize on them),
so a bucket compiles once, not once per step.
"""
from __future__ import annotations

import functools
import math

import torch

from rayexp.optim.adam import mean_square
from rayexp.optim.mada import LION_BETA1, LION_BETA2, keep_step_state, mada_direction

COMPILE = True  # False runs the same kernels eagerly (tests of the math without inductor)


@functools.cache
def _compiled(fn):
    # dynamic: floats and sizes symbolic from the first call, so one graph per bucket signature, and one
    # shape-generic kernel serves every tensor of a rank (fewer kernels to compile)
    return torch.compile(fn, fullgraph=True, dynamic=True)


def _run(fn, *args):
    if not COMPILE:
        return fn(*args)
    # one graph per bucket signature (list length, shapes, granularity, frozen v): a process that builds
    # several models passes dynamo's default of 8 per function, so allow more here
    with torch._dynamo.config.patch(recompile_limit=64):
        return _compiled(fn)(*args)


def _apply(p: torch.Tensor, d: torch.Tensor, lr: float, keep: float) -> None:
    """θ ← keep·θ − lr·d with keep = 1 − lr·wd (1 for coupled weight decay), as torch's AdamW rounds it.

    ``keep`` comes in computed: torch 2.11's dynamo specialized ``1 − decay`` on a float input and
    recompiled the bucket at every step of an lr schedule (benchmarks/RESULTS.md, issue 14)."""
    p.copy_(p * keep - lr * d)


# -- kernels: lists in, state (and θ) updated in place ----------------------------------------------------
def _sgd_kernel(ps, gs, bufs, lr: float, keep: float, mu: float, nesterov: bool, apply: bool):
    ds = []
    for p, g, b in zip(ps, gs, bufs):
        d = g
        if b is not None:
            b.mul_(mu).add_(g)
            d = g + mu * b if nesterov else b
        if apply:
            _apply(p, d, lr, keep)
        else:
            ds.append(d)
    return ds


def _signum_kernel(ps, gs, bufs, lr: float, keep: float, beta: float, apply: bool):
    ds = []
    for p, g, m in zip(ps, gs, bufs):
        if m is not None:
            m.mul_(beta).add_(g, alpha=1 - beta)
        d = torch.sign(g if m is None else m)
        if apply:
            _apply(p, d, lr, keep)
        else:
            ds.append(d)
    return ds


def _adam_kernel(ps, gs, ms, vs, lr: float, keep: float, beta1: float, beta2: float, bias1: float,
                 bias2_sqrt: float, eps: float, gran: str, update_v: bool, global_sq, apply: bool):
    ds = []
    for p, g, m, v in zip(ps, gs, ms, vs):
        m.lerp_(g, 1 - beta1)
        if update_v:
            if gran == "coordinate":
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            elif gran == "global":
                v.mul_(beta2).add_((1 - beta2) * global_sq.to(v))
            else:
                v.mul_(beta2).add_(mean_square(g, gran), alpha=1 - beta2)
        d = (m / bias1) / (v.sqrt() / bias2_sqrt + eps)
        if apply:
            _apply(p, d, lr, keep)
        else:
            ds.append(d)
    return ds


def _mada_kernel(ps, gs, bufs, k: dict, t: float, lr: float, keep: float, eps: float, apply: bool):
    """bufs[i] = (g_prev, m, v, n, vbar, m_lion); returns per tensor (d or None, m, v, n, vbar, g)."""
    out = []
    for p, g, (g_prev, m, v, n, vbar, m_lion) in zip(ps, gs, bufs):
        m_lion.mul_(LION_BETA2).add_(g, alpha=1 - LION_BETA2)
        u_sign = torch.sign(LION_BETA1 * m_lion + (1 - LION_BETA1) * g)
        d, m2, v2, n2, vbar2 = mada_direction(k, t, g, g_prev, m, v, n, vbar, u_sign, eps)
        if apply:
            _apply(p, d, lr, keep)
            d = None
        out.append((d, m2, v2, n2, vbar2, g))  # cloned by keep_step_state
    return out


# -- steps: the families' state conventions around the kernels ----------------------------------------------
def _keep(hp: dict, decoupled: bool) -> float:
    """``_apply``'s factor on θ: 1 − lr·wd for decoupled weight decay, else 1."""
    return 1 - hp["lr"] * hp["weight_decay"] if decoupled else 1.0


def sgd_step(ps, gs, states, hp, ctx, apply):
    """SGD (sgd.py); the momentum buffer starts at 0, so the first step gives b₁ = 0·μ + g = g."""
    mu = hp["momentum"]
    if mu:
        for p, st in zip(ps, states):
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p)
    bufs = [st.get("momentum_buffer") if mu else None for st in states]
    ds = _run(_sgd_kernel, ps, gs, bufs, hp["lr"], 1.0, mu, hp["nesterov"], apply)
    return None if apply else ds


def signum_step(ps, gs, states, hp, ctx, apply):
    """Signum (signum.py), decoupled weight decay."""
    bufs = [st.get("momentum_buffer") for st in states]
    ds = _run(_signum_kernel, ps, gs, bufs, hp["lr"], _keep(hp, True), hp["momentum"], apply)
    return None if apply else ds


def adam_step(decoupled: bool):
    """Adam (coupled wd) or AdamW (decoupled) at any v granularity, frozen v included (adam.py)."""
    def step(ps, gs, states, hp, ctx, apply):
        beta1, beta2 = hp["betas"]
        freeze, t = hp["freeze_v_after"], int(states[0]["step"].item())
        t2 = t if freeze is None else min(t, freeze)
        ds = _run(_adam_kernel, ps, gs, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                  hp["lr"], _keep(hp, decoupled), beta1, beta2, 1 - beta1 ** t, math.sqrt(1 - beta2 ** t2),
                  hp["eps"], hp["granularity"], freeze is None or t <= freeze, ctx.get("global_sq"), apply)
        return None if apply else ds
    return step


def mada_step(ps, gs, states, hp, ctx, apply):
    """MADA's update (mada.py); keeps the pre-step m, v, n, g_prev for the next hypergradient."""
    t = float(states[0]["step"].item())
    if t == 1:
        for st, g in zip(states, gs):
            st["n"] = g * g  # the seed's start of n (mada.mada_update)
    bufs = [tuple(st[key] for key in ("g_prev", "m", "v", "n", "vbar", "m_lion")) for st in states]
    out = _run(_mada_kernel, ps, gs, bufs, ctx["coefs"], t, hp["lr"], _keep(hp, True), hp["eps"], apply)
    for st, (_, m, v, n, vbar, g) in zip(states, out):
        keep_step_state(st, g, m, v, n, vbar, ctx.get("g_prev_zero", False))
    return None if apply else [o[0] for o in out]


STEPS = {"sgd": sgd_step, "signum": signum_step, "adam": adam_step(False), "adamw": adam_step(True),
         "mada": mada_step}

"""Signum (Bernstein et al. 2018, "signSGD: compressed optimisation for non-convex problems", Alg. 2).

    m ← β m + (1 − β) g;   d = sign(m);   θ ← θ(1 − lr·wd) − lr·d
β = optimizer.momentum; β = 0 is signSGD (d = sign(g)). Weight decay is decoupled.
"""
from __future__ import annotations

import torch

from rayexp.optim.core import Family


def signum_init(p: torch.Tensor, hp: dict) -> dict:
    """Momentum buffer m = 0 (none for signSGD)."""
    return {"momentum_buffer": torch.zeros_like(p)} if hp["momentum"] > 0 else {}


def signum_update(g: torch.Tensor, state: dict, hp: dict, ctx: dict) -> torch.Tensor:
    """d = sign(β m + (1 − β) g), or sign(g) when β = 0."""
    beta = hp["momentum"]
    if beta == 0:
        return torch.sign(g)
    m = state["momentum_buffer"]
    m.mul_(beta).add_(g, alpha=1 - beta)
    return torch.sign(m)


SIGNUM = Family(
    name="signum",
    description="sign of the momentum buffer (momentum 0: signSGD), decoupled weight decay",
    init=signum_init,
    update=signum_update,
    decoupled_wd=True,
    options=("lr", "momentum", "weight_decay"),
    state_floats=lambda cfg: 1.0 if cfg.momentum > 0 else 0.0,
    linear_state=("momentum_buffer",),
)

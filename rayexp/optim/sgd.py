"""SGD with momentum, Nesterov and coupled (L2) weight decay, as torch.optim.SGD (dampening 0).

    b ← μ b + g   (b₁ = g);   d = g + μ b (Nesterov) or b;   θ ← θ − lr·d
Weight decay is added to g before this (done by ZooOptimizer), as in torch.optim.SGD.
"""
from __future__ import annotations

import torch

from rayexp.optim.core import Family


def sgd_init(p: torch.Tensor, hp: dict) -> dict:
    """No state until the first step (the momentum buffer starts as a copy of g, as in torch)."""
    return {}


def sgd_update(g: torch.Tensor, state: dict, hp: dict, ctx: dict) -> torch.Tensor:
    """Direction d of SGD with heavy-ball (or Nesterov) momentum μ = hp["momentum"]."""
    mu = hp["momentum"]
    if mu == 0:
        return g
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = g.clone()
    else:
        buf.mul_(mu).add_(g)
    return g.add(buf, alpha=mu) if hp["nesterov"] else buf


SGD = Family(
    name="sgd",
    description="SGD, heavy-ball/Nesterov momentum, L2 weight decay (== torch.optim.SGD)",
    init=sgd_init,
    update=sgd_update,
    decoupled_wd=False,
    options=("lr", "momentum", "nesterov", "weight_decay"),
    state_floats=lambda cfg: 1.0 if cfg.momentum > 0 else 0.0,
    linear_state=("momentum_buffer",),
)

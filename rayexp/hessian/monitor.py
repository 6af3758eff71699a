"""Curvature during training: every ``hessian.every`` steps, the metrics ``hessian.during`` on one fixed
training batch, logged as ``curv/*`` (docs/methods.md "During training").

- ``lambda_max``: λ_max(H) by ``hessian.during_steps`` Lanczos steps, warm-started from the last call's
  Ritz vector (the first call starts from the gradient);
- ``trace``: Hutchinson tr H with ``hessian.during_probes`` Rademacher probes;
- ``block_lambda_max`` / ``grad_norms``: λ_max(H_bb) and ‖g_b‖ per block (``hessian.blocks``, default the
  weight blocks);
- ``precond_sharpness``: λ_max(P^{-1/2} H P^{-1/2}) for Adam's preconditioner P = (1 − β1ᵗ) diag(√v̂ + ε)
  (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability"), whose stability threshold is
  (2 + 2β1)/((1 − β1) η); λ_max(H) is compared with 2/η for SGD. Adam and AdamW in the native basis only.

A ``CurvatureMonitor`` is what ``rayexp.train.loop.run_training(..., monitors=[...])`` calls after a step;
it knows no Ray and no MLflow.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from rayexp.config import ConfigError, Experiment
from rayexp.hessian import estimators as est
from rayexp.hessian.hvp import HVP
from rayexp.hessian.lanczos import top_ritz
from rayexp.hessian.operator import Operator, Scaled
from rayexp.hessian.tasks import select_blocks

PREFIX = "curv/"


def adam_preconditioner(model: torch.nn.Module, optimizer) -> Optional[torch.Tensor]:
    """Flat P (``model.named_parameters()`` order) of an Adam/AdamW zoo optimizer in the native basis, or None."""
    family = getattr(getattr(optimizer, "family", None), "name", None)
    if family not in ("adam", "adamw") or getattr(optimizer.rotation, "kind", "none") != "none":
        return None
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    eps, freeze, parts = group["eps"], group["freeze_v_after"], []
    for _, p in model.named_parameters():
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" not in st:
            return None
        t = float(st["step"])
        v_hat = st["exp_avg_sq"].double() / (1 - beta2 ** (t if freeze is None else min(t, freeze)))
        parts.append(((1 - beta1 ** t) * (v_hat.sqrt() + eps)).expand(p.shape).reshape(-1))
    return torch.cat(parts)


class CurvatureMonitor:
    """Curvature metrics of ``exp.hessian.during`` every ``exp.hessian.every`` steps (see the module docstring)."""

    def __init__(self, exp: Experiment):
        if exp.model.dropout > 0:
            raise ConfigError(f"hessian.every={exp.hessian.every} needs model.dropout=0 (the loss must be "
                              f"deterministic); got {exp.model.dropout}")
        self.exp, self.cfg = exp, exp.hessian
        self.batch, self.v0 = None, None

    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    def _batch(self, data, device) -> tuple:
        if self.batch is None:
            from rayexp.data import draw
            from rayexp.hessian.probes import generator
            from rayexp.models import block_size
            bs = self.cfg.batch_size or self.exp.train.batch_size
            self.batch = draw(data, "train", block_size(self.exp.model), bs, generator(self.cfg.seed, "during", 0))
        return tuple(t.to(device) for t in self.batch)

    def __call__(self, step: int, model: torch.nn.Module, optimizer, data) -> dict:
        """``curv/*`` metrics at ``step`` (an empty dict between the steps it is due)."""
        if not self.due(step):
            return {}
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        mode = "cached" if device.type == "cuda" else "fwd_rev"
        op = Operator(HVP(model, [self._batch(data, device)], mode=mode, dtype=self.cfg.dtype, device=device))
        out, during = {}, set(self.cfg.during)
        if "lambda_max" in during:
            start = self.v0 if self.v0 is not None and self.v0.numel() == op.d else op.grad()
            lam, self.v0 = top_ritz(op, start, self.cfg.during_steps)
            out["lambda_max"] = lam
        if "trace" in during:
            out["trace"] = est.hutchinson(op, self.cfg.during_probes, self.cfg.seed, diag=False)["trace"]
        blocks = select_blocks(op.blocks, self.cfg.blocks, est.default_curvature_blocks)
        if "block_lambda_max" in during:
            lams = est.block_top_eigs(op, blocks, self.cfg.during_steps, self.cfg.seed)
            out.update({f"block_lambda_max/{b.name}": float(x) for b, x in zip(blocks, lams)})
        if "grad_norms" in during:
            norms = est.block_grad_norms(op, op.grad(), blocks)
            out.update({f"grad_norm/{b.name}": float(x) for b, x in zip(blocks, norms)})
        P = adam_preconditioner(model, optimizer) if "precond_sharpness" in during else None
        if P is not None:
            lam, _ = top_ritz(Scaled(op, P.rsqrt()), op.grad(), self.cfg.during_steps)
            out["precond_sharpness"] = lam
        out["seconds"] = time.perf_counter() - t0
        out["hvps"] = float(op.count)
        return {PREFIX + k: v for k, v in out.items()}

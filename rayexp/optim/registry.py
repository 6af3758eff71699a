"""The optimizer registry: name → family, ``build_optimizer`` and the facts ``--list`` prints."""
from __future__ import annotations

import torch
import torch.nn as nn

from rayexp.config import MADA_COEFS, ConfigError, OptimizerConfig, RotationConfig
from rayexp.optim.adam import ADAM, ADAMW, GRANULARITIES
from rayexp.optim.core import Family, ZooOptimizer
from rayexp.optim.fused import STEPS
from rayexp.optim.mada import MADA
from rayexp.optim.rotation import named_trainable
from rayexp.optim.sgd import SGD
from rayexp.optim.signum import SIGNUM

OPTIMIZERS: dict[str, Family] = {f.name: f for f in (SGD, SIGNUM, ADAM, ADAMW, MADA)}


def state_bytes_per_param(opt_cfg: OptimizerConfig, bytes_per_float: int = 4) -> float:
    """Optimizer state per parameter in bytes (fp32), excluding the rotation and O(rows) terms."""
    return OPTIMIZERS[opt_cfg.name].state_floats(opt_cfg) * bytes_per_float


def param_groups(model: nn.Module, weight_decay: float, decay: str = "matrices") -> list[dict]:
    """Weight-decay groups. ``decay`` ``matrices`` is nanoGPT's grouping (decay on tensors with ≥ 2 dims,
    none on biases/LayerNorm/scalars); ``all`` decays every parameter (seed 000's AdamW)."""
    params = [p for _, p in named_trainable(model)]
    if not weight_decay or decay == "all":
        return [{"params": params, "weight_decay": float(weight_decay)}]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def hyperparameters(opt_cfg: OptimizerConfig) -> tuple[dict, dict]:
    """(param-group defaults, optimizer-wide settings) for ``opt_cfg`` (what the families read)."""
    if opt_cfg.name == "mada":
        mc = opt_cfg.mada
        settings = {"mada_init": {n: getattr(mc, n) for n in MADA_COEFS},
                    "hyper_lr": mc.per_coef("hyper_lr"), "hyper_momentum": mc.per_coef("hyper_momentum"),
                    "clip": opt_cfg.hypergrad_clip, "delay": opt_cfg.hypergrad_delay,
                    "quirks": tuple(mc.seed_quirks)}
        return {"lr": opt_cfg.lr, "weight_decay": 0.0, "eps": mc.eps}, settings
    if opt_cfg.granularity not in GRANULARITIES:
        raise ConfigError(f"optimizer.granularity: {opt_cfg.granularity!r}; allowed: {', '.join(GRANULARITIES)}")
    return {"lr": opt_cfg.lr, "weight_decay": 0.0, "betas": tuple(opt_cfg.betas), "eps": opt_cfg.eps,
            "momentum": opt_cfg.momentum, "nesterov": opt_cfg.nesterov, "granularity": opt_cfg.granularity,
            "freeze_v_after": opt_cfg.freeze_v_after}, {}


def build_optimizer(model: nn.Module, opt_cfg: OptimizerConfig,
                    rotation_cfg: RotationConfig | None = None) -> torch.optim.Optimizer:
    """The torch optimizer for ``model`` described by ``opt_cfg``, run in the basis of ``rotation_cfg``."""
    if opt_cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: {opt_cfg.name!r}; allowed: {', '.join(OPTIMIZERS)}")
    if opt_cfg.lr < 0:
        raise ConfigError(f"optimizer.lr: must be >= 0 (got {opt_cfg.lr})")
    defaults, settings = hyperparameters(opt_cfg)
    return ZooOptimizer(param_groups(model, opt_cfg.weight_decay, opt_cfg.decay), OPTIMIZERS[opt_cfg.name],
                        defaults, rotation_cfg or RotationConfig(), settings,
                        STEPS[opt_cfg.name] if use_fused(model, opt_cfg) else None, named_trainable(model))


def use_fused(model: nn.Module, opt_cfg: OptimizerConfig) -> bool:
    """``optimizer.fused``: true/false as given; auto means on when the parameters live on CUDA."""
    if opt_cfg.fused == "auto":
        return any(p.is_cuda for p in model.parameters())
    return opt_cfg.fused


def is_elementwise(opt_cfg: OptimizerConfig, rotation_cfg: RotationConfig | None = None) -> bool:
    """True when the update of each coordinate needs only that coordinate (safe under ZeRO partitioning).

    False for row/column/tensor/global second moments, any rotation, and MADA (its hypergradient sums
    over all coordinates).
    """
    if rotation_cfg is not None and rotation_cfg.kind != "none":
        return False
    if opt_cfg.name == "mada":
        return False
    if opt_cfg.name in ("adam", "adamw"):
        return opt_cfg.granularity == "coordinate"
    return True

"""The one torch optimizer of the zoo: a family's small update function, a rotation, weight decay.

A *family* (sgd.py, signum.py, adam.py, mada.py) is a few pure-ish functions in the optax spirit:

    init(p, hp) -> state                 per-parameter state tensors
    update(g, state, hp, ctx) -> d       the step direction (state updated in place); θ ← θ − lr·d

``ZooOptimizer.step`` does, for gradients g already averaged by DDP / accumulated by the loop:

    g ← g + wd·θ                         (coupled weight decay: sgd, adam)
    g̃ ← R(g)                             (rotation.py; identity for kind none)
    ctx ← hypergrad(...) / prepare(...)  (family hooks: MADA's coefficient step, Adam's global v)
    d̃ ← update(g̃, state, hp, ctx);  θ ← θ·(1 − lr·wd) [decoupled: signum, adamw, mada];  θ ← θ − lr·R⁻¹(d̃)

The family update runs either per tensor (the reference, ``family.update`` / ``update_many``) or, with
``fused_step`` (``optimizer.fused``, default on CUDA), as one compiled multi-tensor step per (param
group, step count) from ``rayexp.optim.fused``.

Hyperparameters live in ``param_groups`` (the train loop sets ``group["lr"]`` every step), per-parameter
state in ``self.state`` and optimizer-wide state (step count, MADA coefficients) in ``self.extra``; all
three round-trip through ``state_dict()`` / ``load_state_dict()``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from rayexp.config import ConfigError, RotationConfig
from rayexp.optim.rotation import Rotation


@dataclass(frozen=True)
class Family:
    """An optimizer family: its update rule and what the registry prints about it."""
    name: str
    description: str
    init: Callable[[torch.Tensor, dict], dict]
    update: Callable[[torch.Tensor, dict, dict, dict], torch.Tensor]
    decoupled_wd: bool
    options: tuple[str, ...]
    state_floats: Callable[[object], float]  # floats of state per parameter for an OptimizerConfig
    linear_state: tuple[str, ...] = ()  # state that transforms like the gradient (re-projected by eigenbasis)
    prepare: Optional[Callable] = None  # (opt, items, rgrads) -> ctx, after the rotation refresh
    hypergrad: Optional[Callable] = None  # (opt, items, rgrads) -> ctx, before the rotation refresh
    init_extra: Optional[Callable[[dict], dict]] = None  # optimizer-wide state from the settings
    # (opt, items, rgrads, micro, n_micro) -> None, after each micro-batch's backward (ZooOptimizer.after_backward)
    observe: Optional[Callable] = None
    micro_batches: Optional[Callable] = None  # (opt, step, grad_accum) -> micro-batches the loop accumulates
    metrics: Optional[Callable] = None  # (opt) -> dict[str, float]
    # (gs, states, hp, ctx) -> directions | None: ``update`` over tensors at one step count in foreach
    # kernels (same bits, fewer launches); used in the native basis, None means "not for these hp"
    update_many: Optional[Callable] = None


@dataclass
class Item:
    """One parameter taking part in this step."""
    index: int  # position in the flat parameter order (named_parameters under build_optimizer; rotations use it)
    p: torch.Tensor
    group: dict
    g: torch.Tensor
    state: dict = field(default_factory=dict)


class ZooOptimizer(torch.optim.Optimizer):
    """A torch optimizer running ``family`` in the basis given by ``rotation_cfg``.

    ``defaults`` are the param-group hyperparameters; ``settings`` optimizer-wide ones (MADA's initial
    coefficients and hyper learning rates), turned into ``self.extra`` by ``family.init_extra``.
    ``named``: ``(name, parameter)`` in the flat order rotations index (``model.named_parameters()`` under
    ``build_optimizer``, whatever the param groups); default: param-group order.
    """

    def __init__(self, param_groups: list[dict], family: Family, defaults: dict,
                 rotation_cfg: Optional[RotationConfig] = None, settings: Optional[dict] = None,
                 fused_step: Optional[Callable] = None, named: Optional[list[tuple[str, torch.Tensor]]] = None):
        super().__init__(param_groups, defaults)
        self.family = family
        self.fused_step = fused_step  # rayexp.optim.fused.STEPS[family.name], or None: the per-tensor reference
        in_groups = [p for g in self.param_groups for p in g["params"]]
        named = named if named is not None else [(str(i), p) for i, p in enumerate(in_groups)]
        if sorted(map(id, in_groups)) != sorted(id(p) for _, p in named):
            raise ValueError("named must list exactly the parameters of the param groups")
        self.params_flat = [p for _, p in named]
        self.index = {id(p): i for i, p in enumerate(self.params_flat)}
        self.rotation = Rotation(self.params_flat, rotation_cfg or RotationConfig(), [n for n, _ in named])
        if (rotation_cfg or RotationConfig()).init == "rotated":
            self._rotate_init()
        self.extra: dict = {"t": 0}
        if family.init_extra is not None:
            self.extra.update(family.init_extra(settings or {}))

    @torch.no_grad()
    def _rotate_init(self) -> None:
        """θ ← Rᵀ θ (``rotation.init: rotated``): the optimizer's coordinates φ = R θ start at the built θ."""
        if self.rotation.kind == "eigenbasis":
            raise ConfigError("rotation.init: 'rotated' needs a fixed rotation; allowed with per_tensor, global, "
                              "randperm (eigenbasis has no basis before the first gradient)")
        flat = torch.cat([p.reshape(-1) for p in self.params_flat])
        out = self.rotation.apply_flat(flat, inverse=True)
        for p, x in zip(self.params_flat, self.rotation._split(out, self.rotation.shapes)):
            p.copy_(x)

    # ------------------------------------------------------------------------------------------
    def _items(self) -> list[Item]:
        items, pos = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                # DeepSpeed ZeRO swaps its own flat partitions into the groups: they index by position (it runs
                # only unrotated element-wise families; the sweep pre-flight refuses the rest)
                i, pos = self.index.get(id(p), pos), pos + 1
                g = p.grad
                if g is None:
                    if not self.rotation.mixes:
                        continue
                    g = torch.zeros_like(p)  # a global / randperm rotation mixes every coordinate
                if g.is_sparse:
                    raise RuntimeError(f"{self.family.name}: sparse gradients are not supported")
                if group["weight_decay"] and not self.family.decoupled_wd:
                    g = g.add(p, alpha=group["weight_decay"])
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st.update(self.family.init(p, group))
                items.append(Item(i, p, group, g, st))
        return items

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step on the gradients in ``p.grad`` (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = self._items()
        if not items:
            return loss
        t = self.extra["t"] = self.extra["t"] + 1
        rot, fam = self.rotation, self.family
        idx, states = [it.index for it in items], [it.state for it in items]
        rot.accumulate([it.g for it in items], states)
        if t == 1 and rot.due(t):
            rot.refresh(states, fam.linear_state)
        rgrads = rot.rotate(idx, [it.g for it in items], states)
        ctx = fam.hypergrad(self, items, rgrads) if fam.hypergrad else {}
        if t > 1 and rot.due(t):
            rot.refresh(states, fam.linear_state)
            rgrads = rot.rotate(idx, [it.g for it in items], states)
        if fam.prepare:
            ctx.update(fam.prepare(self, items, rgrads))
        (self._step_fused if self.fused_step else self._step_reference)(items, rgrads, ctx)
        for group in self.param_groups:
            group["lr_used"] = group["lr"]  # MADA's hypergradient needs the previous step's lr
        return loss

    @torch.no_grad()
    def after_backward(self, micro: int, n_micro: int) -> None:
        """The train loop calls this after micro-batch ``micro`` (of ``n_micro``) has added its gradient to
        ``p.grad``, before clipping: MADA takes its hypergradient here (``family.observe``)."""
        if self.family.observe is None:
            return
        items = self._items()
        if items:
            rot = self.rotation
            rgrads = rot.rotate([it.index for it in items], [it.g for it in items], [it.state for it in items])
            self.family.observe(self, items, rgrads, micro, n_micro)

    def micro_batches(self, step: int, grad_accum: int) -> int:
        """Micro-batches the loop accumulates for ``step`` (1-based): ``grad_accum`` unless the family says
        otherwise (MADA's seed quirk ``two_micro_batch_start``)."""
        return self.family.micro_batches(self, step, grad_accum) if self.family.micro_batches else grad_accum

    def _step_reference(self, items: list[Item], rgrads: list, ctx: dict) -> None:
        """The per-tensor step: ``family.update`` (or ``update_many``), un-rotate, apply."""
        rot, fam = self.rotation, self.family
        if rot.kind == "none" and fam.update_many is not None:
            items, rgrads = self._step_many(items, rgrads, ctx)
        directions = []
        for it, g in zip(items, rgrads):
            it.state["step"] += 1
            d = fam.update(g, it.state, it.group, ctx)
            if rot.mixes:
                directions.append(d)
            else:
                self._apply(it, rot.unrotate([it.index], [d], [it.state])[0])
        if directions:
            for it, d in zip(items, rot.unrotate([it.index for it in items], directions,
                                                 [it.state for it in items])):
                self._apply(it, d)

    def _step_fused(self, items: list[Item], rgrads: list, ctx: dict) -> None:
        """``fused_step`` once per (param group, step count) bucket; θ updated inside it without a rotation,
        else its directions are un-rotated (global, randperm: all together) and applied here."""
        rot, buckets = self.rotation, {}
        for it, g in zip(items, rgrads):
            buckets.setdefault((id(it.group), int(it.state["step"].item())), []).append((it, g))
        directions = {}
        for pairs in buckets.values():
            its = [it for it, _ in pairs]
            for it in its:
                it.state["step"] += 1
            ds = self.fused_step([it.p for it in its], [g for _, g in pairs], [it.state for it in its],
                                 its[0].group, ctx, rot.kind == "none")
            directions.update(zip((it.index for it in its), ds or ()))
        if rot.kind == "none":
            return
        ds = [directions[it.index] for it in items]
        idx, states = [it.index for it in items], [it.state for it in items]
        if rot.mixes:
            ds = rot.unrotate(idx, ds, states)
        else:
            ds = [rot.unrotate([i], [d], [st])[0] for i, d, st in zip(idx, ds, states)]
        for it, d in zip(items, ds):
            self._apply(it, d)

    def _step_many(self, items: list[Item], grads: list, ctx: dict) -> tuple[list[Item], list]:
        """Step items with ``family.update_many`` per (param group, step count); returns those it left."""
        buckets: dict = {}
        for it, g in zip(items, grads):
            buckets.setdefault((id(it.group), int(it.state["step"].item())), []).append((it, g))
        rest = []
        for pairs in buckets.values():
            its, gs = [it for it, _ in pairs], [g for _, g in pairs]
            for it in its:
                it.state["step"] += 1
            ds = self.family.update_many(gs, [it.state for it in its], its[0].group, ctx)
            if ds is None:
                for it in its:
                    it.state["step"] -= 1
                rest += pairs
                continue
            lr, wd, ps = its[0].group["lr"], its[0].group["weight_decay"], [it.p for it in its]
            if wd and self.family.decoupled_wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_add_(ps, ds, alpha=-lr)
        return [it for it, _ in rest], [g for _, g in rest]

    def _apply(self, it: Item, d: torch.Tensor) -> None:
        lr, wd = it.group["lr"], it.group["weight_decay"]
        if wd and self.family.decoupled_wd:
            it.p.mul_(1 - lr * wd)
        it.p.add_(d, alpha=-lr)

    # ------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Scalars the train loop logs every log step: MADA's six coefficients (``mada/beta1``, ...) and,
        when a rotation is on, its memory (``optim/rotation_bytes``)."""
        out = self.family.metrics(self) if self.family.metrics else {}
        if self.rotation.kind != "none":
            out["optim/rotation_bytes"] = float(self.rotation.memory_bytes())
        return out

    def rotation_memory_bytes(self) -> int:
        """Bytes held by the rotation (0 for kind none)."""
        return self.rotation.memory_bytes()

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["extra"] = copy.deepcopy(self.extra)
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("extra", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.extra = copy.deepcopy(extra)

"""The memory plan and the task loop shared by one process and every actor (docs/methods.md "Memory plan").

Every task keeps a known number of d-vectors (``Task.vectors``: Lanczos vectors, a basis, Hutchinson sums,
the 1-1 norm's per-row samples); one product's working set (activations, a cached first-order graph) is
measured on the first product. A basis or the per-row samples that do not fit the device budget
(``hessian.memory_gib``, default what the device has free) move to the host; a plan that still cannot fit
fails with one line naming the setting to change, before any task runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from rayexp.config import ConfigError, HessianConfig
from rayexp.hessian import estimators as est
from rayexp.hessian.hvp import HVP
from rayexp.hessian.operator import Comm, Operator
from rayexp.hessian.tasks import TASKS, Context, l11_rotation, select_blocks

GIB = 2 ** 30
VMAP_CHUNK_MAX = 64  # vectors per vmapped product (fwd_rev)
LOOP_CHUNK_MAX = 1  # modes that loop over vectors gain nothing from more than one per call, and keep less
VMAP_MAX_PARAMS = 1 << 20  # auto uses vmapped fwd_rev products on the CPU up to this many parameters


def device_of(cfg: HessianConfig) -> torch.device:
    """The device ``hessian.device`` names (auto: CUDA when visible)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hessian.device=cuda but no CUDA device is visible; allowed here: auto, cpu")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def product_mode(cfg: HessianConfig, sharded_params: bool, device: torch.device, own_loss: bool, d: int) -> str:
    """``auto`` → ``cached`` on a GPU (the fastest product of one vector). On the CPU, or with sharded
    parameters (which ``cached`` cannot gather): ``fwd_rev`` for small models with the token cross-entropy
    (vmapped over the lockstep runs), else ``double_backward`` (the least memory; forward-mode AD is missing
    for some losses, e.g. ``F.mse_loss`` in torch 2.13)."""
    if cfg.mode != "auto":
        return cfg.mode
    if device.type == "cuda" and not sharded_params:
        return "cached"
    return "fwd_rev" if not own_loss and d <= VMAP_MAX_PARAMS else "double_backward"


def build_operator(model, batches: Sequence, cfg: HessianConfig, loss_fn=None, comm: Optional[Comm] = None,
                   n_batches: Optional[int] = None, batch_ids: Optional[Sequence[int]] = None,
                   theta_fn=None, device=None) -> Operator:
    """The operator of ``cfg`` over ``batches`` (a data shard when ``comm`` is a group); its products are
    torch's (``HVP``) or, with ``hessian.backend=jax``, the JAX port's (``JaxProducts``)."""
    if cfg.backend == "jax":
        return Operator(_jax_products(model, batches, cfg, loss_fn), None, n_batches, cfg.reduce)
    device = device or device_of(cfg)
    sharded = comm is not None and comm.shard == "params"
    mode = product_mode(cfg, sharded, device, loss_fn is not None, sum(p.numel() for p in model.parameters()))
    products = HVP(model, batches, loss_fn, mode, cfg.dtype, device, theta_fn=theta_fn)
    if batch_ids is not None:
        products.batch_ids = list(batch_ids)
    return Operator(products, comm, n_batches, cfg.reduce)


def _jax_products(model, batches: Sequence, cfg: HessianConfig, loss_fn):
    """``JaxProducts`` of the model (ConfigError where JAX is missing or the loss is the caller's own)."""
    if loss_fn is not None:
        raise ConfigError("hessian.backend=jax computes the token cross-entropy of its ported models only; "
                          "a custom loss needs hessian.backend=torch")
    try:
        from rayexp.hessian.jax_backend import JaxProducts
    except ImportError:
        raise ConfigError("hessian.backend=jax needs JAX: pip install 'rayexp[jax]'; allowed without it: "
                          "hessian.backend=torch") from None
    return JaxProducts(model, batches, cfg.dtype)


# -- memory plan ------------------------------------------------------------------------------------
def budget_bytes(cfg: HessianConfig, device: torch.device) -> float:
    """The device budget: ``hessian.memory_gib``, else free device memory plus what torch holds already."""
    if cfg.memory_gib:
        return cfg.memory_gib * GIB
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device)
    return host_available()


def host_available() -> float:
    """Available host memory (MemAvailable), or +inf where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _used(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0.0


def first_product(op: Operator) -> tuple[float, float]:
    """Seconds of one product in steady state and the extra peak bytes of the first (which builds a cached
    graph): two products, the first one's warm-up (graphs, kernels, allocator) left out of the time."""
    dev = op.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda _: None)
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base = _used(dev)
    if op.products.mode == "cached" and op.products.graphs is None:
        op.products.build_graphs()
    v = torch.ones(op.span.stop - op.span.start, dtype=torch.float64, device=dev)
    op.matvec(v)
    sync(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else 0.0
    t0 = time.perf_counter()
    op.matvec(v)
    sync(dev)
    op.count -= 2  # probes of the plan, not a task's products
    return time.perf_counter() - t0, peak


@dataclass
class Plan:
    """Chunks, basis and sample placement per task, and what the plan expects."""
    hvps: dict = field(default_factory=dict)
    state_gib: dict = field(default_factory=dict)
    chunk: dict = field(default_factory=dict)
    basis_device: dict = field(default_factory=dict)
    store: Optional[torch.device] = None
    product_s: float = 0.0
    product_gib: float = 0.0
    budget_gib: float = 0.0
    mode: str = ""

    def text(self) -> str:
        """The plan as printed before the tasks run."""
        lines = [f"plan: {sum(self.hvps.values())} Hessian-vector products ({self.mode} products, "
                 f"{self.product_s:.3g} s each → about {_duration(sum(self.hvps.values()) * self.product_s)}), "
                 f"one product {self.product_gib:.2f} GiB, budget {self.budget_gib:.1f} GiB"]
        for t in self.hvps:
            where = [f"basis on {self.basis_device[t]}" for _ in [0] if self.basis_device.get(t)]
            where += [f"samples on {self.store}" for _ in [0] if t == "l11" and self.store is not None]
            lines.append(f"  {t:<19} {self.hvps[t]:>7} HVPs  {self.state_gib[t]:8.3f} GiB kept"
                         + (f"  ({', '.join(where)})" if where else ""))
        return "\n".join(lines)


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def make_plan(op: Operator, cfg: HessianConfig, ctx: Context) -> Plan:
    """Measure one product, then place every task's vectors within the budget (see module docstring)."""
    budget = budget_bytes(cfg, op.device)
    secs, peak = _measured(op, budget)
    local = op.span.stop - op.span.start
    rotated = ctx.rotation is not None and not ctx.rotation.identity  # its matrices are whole on every process
    sizes = {"slq_blocks": len(ctx.slq_blocks), "curv_blocks": len(ctx.curv_blocks), "batches": op.n_batches,
             "curv_share": sum(b.size for b in ctx.curv_blocks) / op.d,
             "l11_rotation": ctx.rotation.nbytes / (8 * local) if rotated else None}
    plan = Plan(product_s=secs, product_gib=peak / GIB, budget_gib=budget / GIB, mode=op.products.mode)
    held = _used(op.device)
    vmap = op.products.mode == "fwd_rev"
    for name in dict.fromkeys(cfg.tasks):
        _place(plan, name, cfg, sizes, budget - held - peak, local, vmap, (peak, budget, held), op.device)
    return plan


def _measured(op: Operator, budget: float) -> tuple[float, float]:
    """One product's seconds and extra peak bytes; cached graphs that do not fit give way to double backward."""
    try:
        secs, peak = first_product(op)
        if op.products.mode != "cached" or _used(op.device) + peak <= budget:
            return secs, peak
    except torch.cuda.OutOfMemoryError:
        if op.products.mode != "cached":
            raise ConfigError(f"hessian: one Hessian-vector product does not fit on {op.device} "
                          f"({budget / GIB:.1f} GiB budget); lower hessian.batch_size, or shard=params over more actors") from None
    op.products.free()  # the graphs of every batch do not fit: recompute them per product
    op.products.mode = "double_backward"
    if op.device.type == "cuda":
        torch.cuda.empty_cache()
    return first_product(op)


def _place(plan: Plan, name: str, cfg, sizes: dict, free: float, local: int, vmap: bool, why: tuple, device) -> None:
    """Chunk and placement of task ``name``'s vectors within ``free`` bytes (basis or samples to the host)."""
    t = TASKS[name]
    plan.hvps[name] = t.hvps(cfg, sizes)
    keep = t.vectors(cfg, sizes) * 8 * local
    movable = keep - _base_vectors(name, cfg, sizes) * 8 * local  # a basis or samples
    free -= keep
    if free < 0 < movable and device.type == "cuda":  # the host takes the basis or the samples
        if name == "l11":
            plan.store = torch.device("cpu")
        else:
            plan.basis_device[name] = torch.device("cpu")
        free += movable
    if free < 0:
        raise ConfigError(_does_not_fit(name, cfg, keep, *why))
    per_vec = 32 * local + (why[0] if vmap else 0)
    cap = VMAP_CHUNK_MAX if vmap else LOOP_CHUNK_MAX
    plan.chunk[name] = int(max(1, min(cap, free // max(per_vec, 1))))
    plan.state_gib[name] = keep / GIB


def _base_vectors(name: str, cfg, sizes) -> float:
    """Vectors of a task that must stay on the device (the rest is a basis or samples that may move)."""
    if name == "l11":  # the samples may move; the rotation's matrices and working vectors stay
        return 3 + (sizes["l11_rotation"] + 2 if sizes.get("l11_rotation") is not None else 0)
    return {"top_eigs": 4, "slq": 3, "slq_blocks": 3}.get(name, TASKS[name].vectors(cfg, sizes))


def _does_not_fit(name: str, cfg, keep: float, peak: float, budget: float, held: float) -> str:
    fix = {"top_eigs": "hessian.top_eigs_steps or hessian.reorth.top_eigs=none",
           "slq": "hessian.slq_steps or hessian.reorth.slq=none", "slq_blocks": "hessian.reorth.slq_blocks=none",
           "l11": "hessian.cauchy_vectors"}.get(name, "hessian.batch_size")
    return (f"hessian: task {name} keeps {keep / GIB:.2f} GiB of vectors next to a {peak / GIB:.2f} GiB product and "
            f"{held / GIB:.2f} GiB of model and batches, over the {budget / GIB:.1f} GiB budget "
            f"(hessian.memory_gib); lower {fix} or hessian.batch_size, or shard=params over more actors")


# -- the task loop ----------------------------------------------------------------------------------
def prepare(op: Operator, cfg: HessianConfig, train_rotation=None) -> tuple[Context, Plan]:
    """Block selections, the rotated basis of the 1-1 norm and the memory plan for ``cfg``'s tasks on ``op``."""
    ctx = Context(op, cfg, select_blocks(op.blocks, cfg.blocks),
                  select_blocks(op.blocks, cfg.blocks, est.default_curvature_blocks))
    ctx.rotation = l11_rotation(op, cfg, train_rotation)
    plan = make_plan(op, cfg, ctx)
    ctx.chunk, ctx.basis_device, ctx.store = plan.chunk, plan.basis_device, plan.store
    return ctx, plan


def run_tasks(ctx: Context, on_task: Optional[Callable[[str], None]] = None) -> None:
    """Run every configured task once (trace/diag/frobenius share their products)."""
    for name in dict.fromkeys(ctx.cfg.tasks):
        if on_task:
            on_task(name)
        try:
            TASKS[name].run(ctx)
        except torch.cuda.OutOfMemoryError:
            raise ConfigError(f"hessian: task {name} ran out of device memory despite the plan; set "
                              f"hessian.memory_gib lower than the free memory (others may share the GPU)") from None

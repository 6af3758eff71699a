"""The curvature tasks: name → what it computes, how many Hessian-vector products it needs and how many
d-vectors it keeps (docs/methods.md "Tasks"). ``analyze``, the CLI's help and the memory plan read this
registry; ``rayexp.config.HESSIAN_TASKS`` lists the same names (config cannot import this package).

Every ``run(ctx)`` sees only ``ctx.op`` (a ``HessianOperator``), the config and the plan, and writes scalar
``metrics`` and ``arrays``; the same code runs in one process or SPMD on every actor of a group.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from rayexp.config import BLOCK_RULES, HESSIAN_TASKS, ConfigError
from rayexp.hessian import estimators as est
from rayexp.hessian.lanczos import lanczos, select
from rayexp.hessian.operator import Block, FlatRotation, dot
from rayexp.hessian.slq import NORMALIZATIONS, block_densities, slq, slq_blocks


@dataclass
class Context:
    """What a task run sees: the operator, the config, the block selections, the plan, and the outputs."""
    op: object
    cfg: object
    slq_blocks: list[Block]
    curv_blocks: list[Block]
    chunk: dict = field(default_factory=dict)  # task → vectors per product call
    basis_device: dict = field(default_factory=dict)  # task → where a kept Lanczos basis lives
    store: Optional[torch.device] = None  # where the 1-1 norm's per-row samples live
    rotation: Optional[FlatRotation] = None  # the basis of the rotated 1-1 norm (hessian.l11_rotation)
    metrics: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    name: str
    help: str
    run: Callable[[Context], None]
    hvps: Callable[[object, dict], int]  # (cfg, sizes) → products
    vectors: Callable[[object, dict], float]  # (cfg, sizes) → d-vectors of 8 bytes kept at once (per chunk 1)


TASKS: dict[str, Task] = {}


def task(name: str, help: str, hvps, vectors):
    """Register ``run`` as the task ``name``."""
    def wrap(run):
        TASKS[name] = Task(name, help, run, hvps, vectors)
        return run
    return wrap


def _basis(cfg, name: str, steps: int) -> float:
    """d-vectors (of 8 bytes) a Lanczos basis of ``steps`` keeps: fp32 products keep it in fp32."""
    return 0 if cfg.reorth[name] == "none" else steps * (0.5 if cfg.dtype != "fp64" else 1.0)


# -- tasks ------------------------------------------------------------------------------------------
@task("top_eigs", "extreme eigenvalues by Lanczos from the mean gradient (largest/smallest/both: hessian.which)",
      hvps=lambda c, s: c.top_eigs_steps, vectors=lambda c, s: 4 + _basis(c, "top_eigs", c.top_eigs_steps))
def _top_eigs(ctx: Context) -> None:
    op, cfg = ctx.op, ctx.cfg
    g = op.grad()
    lam, _ = lanczos(op, g, cfg.top_eigs_steps, cfg.reorth["top_eigs"], basis_device=ctx.basis_device.get("top_eigs")).eig()
    ends = {"largest": ["largest"], "smallest": ["smallest"], "both": ["largest", "smallest"]}[cfg.which]
    for end in ends:
        vals = select(lam, cfg.top_k, end)
        key = "top_eig" if end == "largest" else "bottom_eig"
        ctx.arrays[f"{key}s"] = vals
        ctx.metrics.update({f"{key}/{i + 1}": float(x) for i, x in enumerate(vals)})
    ctx.metrics.update(lambda_max=float(lam[-1]), lambda_min=float(lam[0]),
                       lambda_max_abs=float(select(lam, 1, "magnitude")[0]), grad_norm=dot(op, g, g) ** 0.5)


@task("slq", "spectral density by stochastic Lanczos quadrature (hessian.probes × hessian.slq_steps)",
      hvps=lambda c, s: c.probes * c.slq_steps, vectors=lambda c, s: 3 + _basis(c, "slq", c.slq_steps))
def _slq(ctx: Context) -> None:
    cfg = ctx.cfg
    q = slq(ctx.op, cfg.probes, cfg.slq_steps, cfg.seed, reorth=cfg.reorth["slq"], chunk=ctx.chunk.get("slq", 1),
            basis_device=ctx.basis_device.get("slq"))
    grid, phi = q.density(np.linspace(*q.range(), cfg.grid_points), cfg.slq_sigma2)
    ctx.arrays.update(slq_nodes=q.nodes, slq_weights=q.weights, slq_grid=grid, slq_density=phi)
    ctx.metrics.update(slq_moment1=q.moment(1), slq_moment2=q.moment(2), slq_min=float(q.nodes.min()),
                       slq_max=float(q.nodes.max()))


@task("slq_blocks", "SLQ density of each diagonal block H_bb and their Jensen-Shannon heterogeneity",
      hvps=lambda c, s: s["slq_blocks"] * c.probes * c.slq_steps,
      vectors=lambda c, s: 3 + _basis(c, "slq_blocks", c.slq_steps))
def _slq_blocks(ctx: Context) -> None:
    cfg = ctx.cfg
    quads = slq_blocks(ctx.op, ctx.slq_blocks, cfg.probes, cfg.slq_steps, cfg.seed, reorth=cfg.reorth["slq_blocks"],
                       chunk=ctx.chunk.get("slq_blocks", 1), basis_device=ctx.basis_device.get("slq_blocks"))
    grid, dens, mat, het = block_densities(quads, cfg.slq_sigma2, cfg.grid_points)
    ctx.arrays.update(block_names=np.array(list(quads)), block_grid=grid, block_densities=dens, js_matrix=mat,
                      block_nodes=_stack_padded([q.nodes for q in quads.values()]),
                      block_weights=_stack_padded([q.weights for q in quads.values()]))
    ctx.metrics["js_heterogeneity"] = het
    for by in NORMALIZATIONS:  # the same quadratures, each block's nodes on its own scale
        shape = {n: q.normalized(by) for n, q in quads.items()}
        ctx.metrics[f"js_heterogeneity_{by}"] = block_densities(shape, cfg.slq_sigma2, cfg.grid_points)[3]
    ctx.metrics.update({f"block_moment1/{n}": q.moment(1) for n, q in quads.items()})


def _hutchinson(ctx: Context) -> None:
    if "hutchinson" in ctx.cache:
        return
    cfg = ctx.cfg
    s = est.summarize_samples(est.rademacher_samples(ctx.op, cfg.hutchinson_probes, cfg.seed,
                                                     diag="diag" in cfg.tasks, chunk=ctx.chunk.get("trace", 1)))
    ctx.cache["hutchinson"] = s
    ctx.metrics.update(hutchinson_trace=s["trace"], hutchinson_trace_se=s["trace_se"], frobenius=s["frobenius"],
                       frobenius_sq=s["frobenius_sq"], frobenius_sq_se=s["frobenius_sq_se"])
    if "diag" in s:
        ctx.arrays["hutchinson_diag"] = est.assemble(ctx.op, s["diag"]).cpu().numpy()


_HUTCH = dict(hvps=lambda c, s: c.hutchinson_probes, vectors=lambda c, s: 3)
task("trace", "tr H by Hutchinson (hessian.hutchinson_probes Rademacher products; shared with diag/frobenius)",
     **_HUTCH)(_hutchinson)
task("diag", "diag H by Hutchinson (same products as trace)", **_HUTCH)(_hutchinson)
task("frobenius", "‖H‖_F and ‖H‖_F² = E‖Hv‖² (same products as trace)", **_HUTCH)(_hutchinson)


def _l11_hvps(c, s) -> int:
    return c.cauchy_vectors * (2 if s.get("l11_rotation") is not None else 1) + c.l11_rows


def _l11_vectors(c, s) -> float:
    """3 + k/2 (the fp32 samples); a rotated basis adds its matrices and 2 vectors of each rotated product."""
    return 3 + c.cauchy_vectors / 2 + (s["l11_rotation"] + 2 if s.get("l11_rotation") is not None else 0)


@task("l11", "‖H‖₁,₁ by Cauchy sketches (hessian.cauchy_vectors), per block, native and rotated basis "
      "(hessian.l11_rotation; train: the checkpoint's training rotation)", hvps=_l11_hvps, vectors=_l11_vectors)
def _l11(ctx: Context) -> None:
    op, cfg, rot = ctx.op, ctx.cfg, ctx.rotation
    variants = [("l11", op)] + ([("l11_rotated", op.rotated(rot))] if rot is not None and not rot.identity else [])
    for prefix, o in variants:
        samples = est.cauchy_samples(o, cfg.cauchy_vectors, cfg.seed, ctx.chunk.get("l11", 1), ctx.store)
        for method in est.L11_METHODS:
            rows = est.assemble(op, torch.from_numpy(est.row_scales(samples, method)).to(op.device)).cpu().numpy()
            name = prefix if method == cfg.l11_estimator else f"{prefix}_{method}"
            ctx.arrays[f"{name}_rows"] = rows
            ctx.metrics.update(est.l11_summary(rows, op.blocks, name) if name == prefix else
                               {name: float(rows.sum()), f"{name}_over_d": float(rows.sum() / len(rows))})
        op.count += o.count if o is not op else 0
        del samples
    if rot is not None and rot.identity:  # trained unrotated: the training basis is the native one
        ctx.metrics.update({k.replace("l11", "l11_rotated", 1): v for k, v in list(ctx.metrics.items())
                            if k.startswith("l11") and not k.startswith("l11_sample")})
    if cfg.l11_rows:
        ctx.metrics.update(est.l11_row_sample(op, cfg.l11_rows, cfg.seed, ctx.chunk.get("l11", 1)))


def l11_rotation(op, cfg, train_rotation: Optional[FlatRotation]) -> Optional[FlatRotation]:
    """The basis of the rotated 1-1 norm: a fresh ``per_tensor``/``global`` rotation keyed by hessian.seed, the
    training rotation (``train``), or None (``none``)."""
    if "l11" not in cfg.tasks or cfg.l11_rotation == "none":
        return None
    if cfg.l11_rotation != "train":
        return FlatRotation.of_kind(cfg.l11_rotation, cfg.seed, op.products.names, op.products.shapes).to(op.device)
    if train_rotation is None:
        raise ConfigError("hessian.l11_rotation=train needs the rotation the model was trained in: analyze a "
                          "checkpoint (python -m rayexp.hessian --checkpoint DIR), or set hessian.l11_rotation to "
                          "none, per_tensor or global")
    return train_rotation.to(op.device)


def _curvature_hvps(c, s) -> int:
    """Lanczos: curvature_steps per block; power: at most power_iters per eigenvalue, power_top_n of them."""
    per = c.power_iters * c.power_top_n if c.curvature_method == "power" else c.curvature_steps
    return s["batches"] * s["curv_blocks"] * per


def _curvature_vectors(c, s) -> float:
    """4, plus what the lockstep runs keep over the blocks' share of d: a Lanczos basis of curvature_steps
    vectors, or the power iterate and up to power_top_n deflation vectors."""
    if c.curvature_method == "power":
        return 4 + (c.power_top_n + 1) * s["curv_share"]
    return 4 + c.curvature_steps * s["curv_share"] * (0.5 if c.dtype != "fp64" else 1.0)


@task("block_curvature", "seed 003's per-batch, per-block [λ_max(H_bb), ‖g_b‖] (hessian.curvature_method: lanczos, "
      "exact; power, the seed's power iteration)", hvps=_curvature_hvps, vectors=_curvature_vectors)
def _block_curvature(ctx: Context) -> None:
    cfg = ctx.cfg
    power = dict(top_n=cfg.power_top_n, iters=cfg.power_iters, tol=cfg.power_tol)
    arr = est.block_curvature(ctx.op, ctx.curv_blocks, cfg.curvature_steps, cfg.seed,
                              chunk=ctx.chunk.get("block_curvature", 0), method=cfg.curvature_method, power=power)
    ctx.arrays.update(block_curvature=arr, block_curvature_names=np.array([b.name for b in ctx.curv_blocks]))
    pos = arr[..., 0] > 0
    corr = np.corrcoef(np.log10(arr[..., 0][pos]), np.log10(arr[..., 1][pos] + 1e-30))[0, 1] if pos.sum() > 2 else np.nan
    ctx.metrics["curvature_gradnorm_logcorr"] = float(corr)


@task("grad_heterogeneity", "spread of per-block gradient norms (std of log10 ‖g_b‖, max/min)",
      hvps=lambda c, s: 0, vectors=lambda c, s: 1)
def _grad_heterogeneity(ctx: Context) -> None:
    norms = est.block_grad_norms(ctx.op, ctx.op.grad(), ctx.slq_blocks)
    ctx.arrays.update(block_grad_norms=norms, block_grad_names=np.array([b.name for b in ctx.slq_blocks]))
    ctx.metrics.update(est.grad_heterogeneity(norms))


assert set(TASKS) == set(HESSIAN_TASKS), "rayexp.config.HESSIAN_TASKS and the registry must list the same tasks"


# -- helpers ----------------------------------------------------------------------------------------
# A seed's block list (hessian.blocks: NAME), for GPT-2: the tensors of each sampled layer, the layers the seed
# samples from its 12-layer model (mapped to n_layer layers at the same relative depth), and the extra blocks.
BLOCK_RULES_SPEC = {
    # seed 001: config/train_gpt2_small.py:44-69 (wq/wk/wv/wo, c_fc, c_proj of layers 0, 3, 7, 11, and wte)
    "seed001": (("attn.c_attn.weight.q", "attn.c_attn.weight.k", "attn.c_attn.weight.v", "attn.c_proj.weight",
                 "mlp.c_fc.weight", "mlp.c_proj.weight"), (0, 3, 7, 11), ("transformer.wte.weight",)),
    # seed 003: hessian_per_param.py:28-50 (roberta: LayerNorms, query/key/value, intermediate and output dense
    # of layers 0, 6, 11, and the head; in GPT-2: ln_1, q/k/v, c_fc, ln_2, mlp.c_proj, and the tied head wte)
    "seed003": (("ln_1.weight", "attn.c_attn.weight.q", "attn.c_attn.weight.k", "attn.c_attn.weight.v",
                 "mlp.c_fc.weight", "ln_2.weight", "mlp.c_proj.weight"), (0, 6, 11), ("transformer.wte.weight",)),
}
SEED_LAYERS = 12  # the seeds' GPT-2 / RoBERTa depth their layer lists refer to
assert set(BLOCK_RULES_SPEC) == set(BLOCK_RULES), "rayexp.config.BLOCK_RULES and BLOCK_RULES_SPEC must agree"


def rule_blocks(blocks: Sequence[Block], rule: str) -> list[Block]:
    """The blocks of a seed's list (``BLOCK_RULES_SPEC``): layer s of the seed's 12 is layer
    round(s (L − 1) / 11) of this model's L, duplicates once; block order follows the model."""
    tensors, seed_layers, extra = BLOCK_RULES_SPEC[rule]
    depth = 1 + max([int(m.group(1)) for b in blocks if (m := re.match(r"transformer\.h\.(\d+)\.", b.name))],
                    default=-1)
    if depth == 0:
        raise ConfigError(f"hessian.blocks={rule} names GPT-2 blocks (transformer.h.N.*) and this model has none; "
                          f"allowed here: a list of fnmatch patterns, e.g. ['*weight*']")
    layers = sorted({int(s * (depth - 1) / (SEED_LAYERS - 1) + 0.5) for s in seed_layers})
    wanted = {f"transformer.h.{i}.{t}" for i in layers for t in tensors} | set(extra)
    return [b for b in blocks if b.name in wanted]


def select_blocks(blocks: Sequence[Block], patterns, default=None) -> list[Block]:
    """Blocks whose names match any fnmatch pattern, or a seed's rule (a name in ``BLOCK_RULES``; None:
    ``default(blocks)`` or all)."""
    if isinstance(patterns, str):
        return rule_blocks(blocks, patterns)
    if not patterns:
        return list(default(blocks) if default else blocks)
    chosen = [b for b in blocks if any(fnmatch.fnmatch(b.name, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"hessian.blocks={patterns} matches no block; blocks are e.g. "
                          f"{', '.join(b.name for b in blocks[:6])}, ...")
    return chosen


def _stack_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack (n_v, m_b) arrays into (n_blocks, n_v, max m_b), zero-padded (zero weight = no node)."""
    m = max(a.shape[1] for a in arrays)
    return np.stack([np.pad(a, ((0, 0), (0, m - a.shape[1]))) for a in arrays])


def task_help() -> str:
    """One line per task, for ``--help``."""
    return "\n".join(f"  {t.name:<19} {t.help}" for t in TASKS.values())

"""``analyze(model, batches, cfg, loss_fn)``: plan memory (``rayexp.hessian.plan``), then run the configured
curvature tasks (``rayexp.hessian.tasks``), in this process or SPMD on Ray actors
(``rayexp.hessian.distributed``). ``analyze_checkpoint`` does the same for a checkpoint on fixed batches.

Returns ``{"metrics": {name: float}, "arrays": {name: ndarray}, "hvps": int, "seconds": float, "plan": str}``.
No MLflow here: the CLI and the sweep log the results.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from rayexp.config import ConfigError, HessianConfig
from rayexp.hessian.hvp import check_model
from rayexp.hessian.io import Progress, save_results
from rayexp.hessian.operator import FlatRotation
from rayexp.hessian.plan import build_operator, prepare, run_tasks


def analyze(model: torch.nn.Module, batches: Sequence, hessian_cfg: HessianConfig, loss_fn=None,
            progress: bool = True, echo: Optional[Callable[[str], None]] = None,
            train_rotation: Optional[FlatRotation] = None) -> dict:
    """Run ``hessian_cfg.tasks`` on the mean loss ``loss_fn`` (default token cross-entropy) over ``batches``;
    ``train_rotation`` (``training_rotation``) is the basis of ``hessian.l11_rotation: train``."""
    cfg = hessian_cfg
    check_model(model)
    batches = list(batches)
    if cfg.actors > 1:
        from rayexp.hessian.distributed import analyze_sharded
        return analyze_sharded(model, batches, cfg, loss_fn, progress, echo, train_rotation)
    start = time.perf_counter()
    op = build_operator(model, batches, cfg, loss_fn)
    ctx, plan = prepare(op, cfg, train_rotation)
    if echo:
        echo(plan.text())
    with Progress(lambda: op.count, sum(plan.hvps.values()), progress) as bar:
        run_tasks(ctx, bar.describe)
    return {"metrics": ctx.metrics, "arrays": ctx.arrays, "hvps": op.count, "seconds": time.perf_counter() - start,
            "tasks": list(cfg.tasks), "plan": plan.text()}


# -- checkpoints -------------------------------------------------------------------------------------
def fixed_batches(exp, hessian_cfg: HessianConfig, data=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``hessian.batches`` training batches of ``hessian.batch_size`` (default ``train.batch_size``) drawn
    from ``exp``'s data (windows or examples) with a generator keyed by ``hessian.seed``: the same fixed
    batches every time."""
    from rayexp.data import draw, load_data
    from rayexp.hessian.probes import generator
    from rayexp.models import block_size

    block = block_size(exp.model)
    data = data if data is not None else load_data(exp.data, block)
    g = generator(hessian_cfg.seed, "batches", 0)
    bs = hessian_cfg.batch_size or exp.train.batch_size
    return [draw(data, "train", block, bs, g) for _ in range(hessian_cfg.batches)]


def training_rotation(model: torch.nn.Module, exp, path=None) -> FlatRotation:
    """The rotation R that ``exp``'s optimizer ran in on ``model``, as a flat map in named_parameters order
    (``rayexp.optim.rotation.training_rotation``, float64: the optimizer's own draws from ``rotation.seed``);
    eigenbasis bases are optimizer state, read from the checkpoint's ``optim.pt``."""
    from rayexp.optim import build_optimizer
    from rayexp.optim.rotation import training_rotation as optimizer_rotation
    if exp.rotation.kind == "none":
        return FlatRotation(None)
    opt = None
    if exp.rotation.kind == "eigenbasis":
        if path is None or not (Path(path) / "optim.pt").is_file():
            raise ConfigError("hessian.l11_rotation=train with rotation.kind=eigenbasis needs the checkpoint's "
                              "optim.pt (its bases are learned)")
        opt = build_optimizer(model, exp.optimizer.model_copy(update={"fused": False}), exp.rotation)
        opt.load_state_dict(torch.load(Path(path) / "optim.pt", map_location="cpu", weights_only=False))
    flat = optimizer_rotation(model, exp.rotation, opt, dtype=torch.float64)
    if flat.states is not None:  # keep only the bases (the plan counts what is kept)
        flat.states = [{k: v for k, v in st.items() if k.startswith("rot_")} for st in flat.states]
    return FlatRotation(flat)


def analyze_checkpoint(path: str, hessian_cfg: Optional[HessianConfig] = None, out_dir: Optional[str] = None,
                       progress: bool = True, echo: Optional[Callable[[str], None]] = None,
                       title: str = "") -> tuple[dict, list[str]]:
    """Load a checkpoint (``hessian.attention``, no dropout), analyze it on fixed batches and save the files
    under ``out_dir`` (default ``<checkpoint>/hessian``), their plots titled with the run (``title``, default
    the checkpoint's folder), its step and its optimizer. Returns (results, files)."""
    from rayexp.train.checkpoint import load_model, load_state

    cfg0 = hessian_cfg
    try:
        model, exp, _ = load_model(path, attention=(cfg0.attention if cfg0 else "naive"), dropout=0.0)
    except ConfigError:
        raise
    except Exception as e:  # a truncated or corrupt file: one line naming it
        raise ConfigError(f"checkpoint {Path(path) / 'model.pt'} does not load ({type(e).__name__}): it may be "
                          f"truncated; use an earlier checkpoint") from None
    cfg = cfg0 or exp.hessian
    rotation = training_rotation(model, exp, path) if cfg.l11_rotation == "train" and "l11" in cfg.tasks else None
    results = analyze(model, fixed_batches(exp, cfg), cfg, progress=progress, echo=echo, train_rotation=rotation)
    step = load_state(path)["step"] if (Path(path) / "state.pt").is_file() else "?"
    run = title or f"{Path(path).resolve().parent.name}/{Path(path).name}"
    name = f"{run}: step {step}, {exp.optimizer.name} lr={exp.optimizer.lr:.3g}"
    files = save_results(results, out_dir or Path(path) / "hessian", name)
    return results, files


"""``analyze(model, batches, hessian_cfg)``: run the configured curvature tasks, locally or on Ray actors.

Returns ``{"metrics": {name: float}, "arrays": {name: ndarray}, "hvps": int, "seconds": float}``;
``save_results`` writes them as ``hessian.npz`` plus density / scatter PNGs, ``format_table`` prints them.
Tasks (``rayexp.config.HESSIAN_TASKS``):

- ``top_eigs``: Lanczos from the normalized mean gradient (seed 000), top_k Ritz values and max |λ|;
- ``slq``: full SLQ density; metrics ``slq_moment1`` (≈ tr H / d), ``slq_moment2`` (≈ tr H² / d);
- ``slq_blocks``: blockwise densities, JS-distance matrix, ``js_heterogeneity`` (JS₀);
- ``trace``/``diag``/``frobenius``: Hutchinson with ``hutchinson_probes`` Rademacher probes (shared HVPs);
- ``l11``: Cauchy-sketch ‖H‖₁,₁ (unscaled; also /d as seed 000 reports it), per block, ∞→∞ norm, in the
  native basis and in ``l11_rotation``; optional exact row sample of ``l11_rows`` rows;
- ``block_curvature``: seed 003's (batches × blocks × 2) [top |eig| of H_bb, ‖g_b‖];
- ``grad_heterogeneity``: std of log10 ‖g_b‖ over the selected blocks, and the max/min ratio.
"""
from __future__ import annotations

import fnmatch
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from rayexp.config import HESSIAN_TASKS, ConfigError, HessianConfig
from rayexp.hessian import estimators as est
from rayexp.hessian.hvp import HVP, Block, check_model
from rayexp.hessian.lanczos import lanczos
from rayexp.hessian.slq import block_densities, slq, slq_blocks


class _Local:
    """The single-process engine, with the same estimator calls as ``ShardedHessian``."""

    def __init__(self, op: HVP):
        self.op, self.d, self.blocks, self.device = op, op.d, op.blocks, op.device

    @property
    def count(self) -> int:
        return self.op.count

    def __call__(self, v):
        return self.op(v)

    def grad(self):
        return self.op.grad()

    def slq(self, probes, steps, seed=0, reorth=True):
        return slq(self.op, self.d, probes, steps, seed, reorth=reorth)

    def slq_blocks(self, blocks, probes, steps, seed=0, reorth=True):
        return slq_blocks(self.op, blocks, probes, steps, seed, reorth=reorth)

    def rademacher(self, probes, seed=0, diag=True):
        return est.rademacher_samples(self.op, self.d, range(probes), seed, diag=diag)

    def l11_cauchy(self, k, seed=0, method="median", rotation=None):
        mv = est.rotated(self.op, *rotation) if rotation else self.op
        return est.row_scales(est.cauchy_rows(mv, self.d, range(k), slice(0, self.d), seed), method)

    def exact_rows(self, rows):
        return est.l11_exact_rows(self.op, self.d, rows)

    def block_curvature(self, blocks, steps, seed=0):
        return est.block_curvature(self.op, blocks, steps, seed)

    def shutdown(self):
        pass


def select_blocks(blocks: Sequence[Block], patterns: Optional[list[str]], default=None) -> list[Block]:
    """Blocks whose names match any fnmatch pattern (None: ``default(blocks)`` or all)."""
    if not patterns:
        return list(default(blocks) if default else blocks)
    chosen = [b for b in blocks if any(fnmatch.fnmatch(b.name, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"hessian.blocks={patterns} matches no block; blocks are e.g. "
                          f"{', '.join(b.name for b in blocks[:6])}, ...")
    return chosen


def _device(cfg: HessianConfig) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hessian.device=cuda but no CUDA device is visible; allowed here: auto, cpu")
    return "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"


def planned_hvps(cfg: HessianConfig, n_blocks: int, n_curv: int, n_batches: int) -> int:
    """Rough number of full HVPs the tasks need (for the progress bar's ETA)."""
    per = {"top_eigs": cfg.lanczos_steps, "slq": cfg.probes * cfg.lanczos_steps,
           "slq_blocks": n_blocks * cfg.probes * cfg.lanczos_steps,
           "block_curvature": n_batches * n_curv * cfg.curvature_steps,
           "l11": cfg.cauchy_vectors * (2 if cfg.l11_rotation != "none" else 1) + cfg.l11_rows}
    total = sum(per.get(t, 0) for t in cfg.tasks)
    if {"trace", "diag", "frobenius"} & set(cfg.tasks):
        total += cfg.hutchinson_probes
    return max(total, 1)


class _Progress:
    """A rich progress bar (HVPs done / planned, ETA) polling ``engine.count`` from a thread."""

    def __init__(self, engine, total: int, enabled: bool):
        self.engine, self.total, self.enabled = engine, total, enabled
        self.stop = threading.Event()

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("HVPs"), TimeRemainingColumn(), console=Console(file=sys.stderr))
            self.task = self.bar.add_task("hessian", total=self.total)
            self.bar.start()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def describe(self, text: str) -> None:
        if self.enabled:
            self.bar.update(self.task, description=text)

    def _poll(self):
        while not self.stop.wait(0.5):
            try:
                done = self.engine.count
            except Exception:  # an engine shutting down
                return
            self.bar.update(self.task, completed=done, total=max(self.total, done))

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join(timeout=5)
            try:
                self.bar.update(self.task, completed=self.engine.count)
            except Exception:
                pass
            self.bar.stop()


def analyze(model: torch.nn.Module, batches: Sequence, hessian_cfg: HessianConfig, progress: bool = True) -> dict:
    """Run ``hessian_cfg.tasks`` on the mean loss over ``batches`` and return metrics and arrays."""
    cfg = hessian_cfg
    bad = [t for t in cfg.tasks if t not in HESSIAN_TASKS]
    if bad:
        raise ConfigError(f"hessian.tasks: unknown task {bad[0]!r}; allowed: {', '.join(HESSIAN_TASKS)}")
    check_model(model)
    batches = list(batches)
    if cfg.actors > 1:
        from rayexp.hessian.distributed import ShardedHessian
        engine = ShardedHessian(model, batches, cfg.actors, cfg.gpus_per_actor, cfg.mode, cfg.dtype)
    else:
        engine = _Local(HVP(model, batches, cfg.mode, cfg.dtype, _device(cfg)))
    slq_sel = select_blocks(engine.blocks, cfg.blocks)
    curv_sel = select_blocks(engine.blocks, cfg.blocks, est.default_curvature_blocks)
    metrics, arrays = {}, {}
    start = time.perf_counter()
    total = planned_hvps(cfg, len(slq_sel), len(curv_sel), len(batches))
    try:
        with _Progress(engine, total, progress) as bar:
            for task in dict.fromkeys(cfg.tasks):
                bar.describe(task)
                _run_task(task, engine, cfg, slq_sel, curv_sel, metrics, arrays)
        hvps = engine.count
    finally:
        engine.shutdown()
    return {"metrics": metrics, "arrays": arrays, "hvps": hvps, "seconds": time.perf_counter() - start,
            "tasks": list(cfg.tasks)}


def _run_task(task, engine, cfg, slq_sel, curv_sel, metrics, arrays) -> None:
    if task == "top_eigs":
        g = engine.grad()
        lam, _ = lanczos(engine, g.double().to(engine.device), cfg.lanczos_steps, cfg.reorth).eig()
        top = lam[::-1][:cfg.top_k]
        arrays["top_eigs"] = top
        metrics.update({f"top_eig/{i + 1}": float(x) for i, x in enumerate(top)})
        metrics["lambda_max_abs"] = float(lam[np.argmax(np.abs(lam))])
        metrics["lambda_min"] = float(lam[0])
        metrics["grad_norm"] = float(g.norm())
    elif task == "slq":
        q = engine.slq(cfg.probes, cfg.lanczos_steps, cfg.seed, cfg.reorth)
        grid, phi = q.density(np.linspace(*q.range(), cfg.grid_points), cfg.slq_sigma2)
        arrays.update(slq_nodes=q.nodes, slq_weights=q.weights, slq_grid=grid, slq_density=phi)
        metrics.update(slq_moment1=q.moment(1), slq_moment2=q.moment(2), slq_min=float(q.nodes.min()),
                       slq_max=float(q.nodes.max()))
    elif task == "slq_blocks":
        quads = engine.slq_blocks(slq_sel, cfg.probes, cfg.lanczos_steps, cfg.seed, cfg.reorth)
        grid, dens, mat, het = block_densities(quads, cfg.slq_sigma2, cfg.grid_points)
        arrays.update(block_names=np.array(list(quads)), block_grid=grid, block_densities=dens, js_matrix=mat,
                      block_nodes=_stack_padded([q.nodes for q in quads.values()]),
                      block_weights=_stack_padded([q.weights for q in quads.values()]))
        metrics["js_heterogeneity"] = het
        metrics.update({f"block_moment1/{n}": q.moment(1) for n, q in quads.items()})
    elif task in ("trace", "diag", "frobenius"):
        if "hutchinson_trace" in metrics:
            return
        s = est.summarize_samples(engine.rademacher(cfg.hutchinson_probes, cfg.seed, diag="diag" in cfg.tasks))
        metrics.update(hutchinson_trace=s["trace"], hutchinson_trace_se=s["trace_se"], frobenius=s["frobenius"],
                       frobenius_sq_se=s["frobenius_sq_se"])
        if "diag" in s:
            arrays["hutchinson_diag"] = s["diag"]
    elif task == "l11":
        rows = engine.l11_cauchy(cfg.cauchy_vectors, cfg.seed, cfg.l11_estimator)
        arrays["l11_rows"] = rows
        metrics.update(est.l11_summary(rows, engine.blocks, "l11"))
        if cfg.l11_rotation != "none":
            rot = engine.l11_cauchy(cfg.cauchy_vectors, cfg.seed, cfg.l11_estimator, (cfg.l11_rotation, cfg.seed))
            arrays["l11_rows_rotated"] = rot
            metrics.update(est.l11_summary(rot, engine.blocks, "l11_rotated"))
        if cfg.l11_rows:
            from rayexp.hessian.probes import generator
            sample = torch.randperm(engine.d, generator=generator(cfg.seed, "l11_rows", 0))[:cfg.l11_rows]
            vals = engine.exact_rows(sample.sort().values.tolist())
            s, d = len(vals), engine.d
            metrics["l11_sample"] = float(d * vals.mean())
            metrics["l11_sample_se"] = float(d * vals.std(ddof=1) / np.sqrt(s) * np.sqrt(1 - s / d)) if s > 1 else 0.0
    elif task == "block_curvature":
        arr = engine.block_curvature(curv_sel, cfg.curvature_steps, cfg.seed)
        arrays.update(block_curvature=arr, block_curvature_names=np.array([b.name for b in curv_sel]))
        corr = np.corrcoef(np.log10(np.abs(arr[..., 0]).ravel() + 1e-30), np.log10(arr[..., 1].ravel() + 1e-30))[0, 1]
        metrics["curvature_gradnorm_logcorr"] = float(corr)
    elif task == "grad_heterogeneity":
        norms = est.block_grad_norms(engine.grad(), slq_sel)
        arrays.update(block_grad_norms=norms, block_grad_names=np.array([b.name for b in slq_sel]))
        metrics.update(est.grad_heterogeneity(norms))


def _stack_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack (n_v, m_b) arrays into (n_blocks, n_v, max m_b), zero-padded (zero weight = no node)."""
    m = max(a.shape[1] for a in arrays)
    return np.stack([np.pad(a, ((0, 0), (0, m - a.shape[1]))) for a in arrays])


# -- output ------------------------------------------------------------------------------------------
def save_results(results: dict, out_dir: str | Path) -> list[str]:
    """Write ``hessian.npz`` (all arrays and metrics) and PNG plots; returns the file paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = dict(results["arrays"])
    arrays["metric_names"] = np.array(list(results["metrics"]))
    arrays["metric_values"] = np.array(list(results["metrics"].values()), dtype=float)
    files = [str(out / "hessian.npz")]
    np.savez_compressed(files[0], **arrays)
    files += _plots(results["arrays"], out)
    return files


def _plots(a: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "slq_density" in a:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogy(a["slq_grid"], a["slq_density"] + 1e-12)
        ax.set(xlabel="eigenvalue", ylabel="density", title="SLQ spectral density")
        files.append(str(out / "density.png"))
        fig.savefig(files[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if "block_densities" in a:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name, dens in zip(a["block_names"], a["block_densities"]):
            ax.semilogy(a["block_grid"], dens + 1e-12, lw=0.8, label=str(name))
        ax.set(xlabel="eigenvalue", ylabel="density", title="blockwise SLQ densities")
        if len(a["block_names"]) <= 12:
            ax.legend(fontsize=6)
        im = ax2.imshow(a["js_matrix"], cmap="viridis")
        ax2.set_title("JS distance between blocks")
        fig.colorbar(im, ax=ax2)
        files.append(str(out / "block_densities.png"))
        fig.savefig(files[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if "block_curvature" in a:
        arr = a["block_curvature"]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.loglog(np.abs(arr[..., 0]).ravel() + 1e-30, arr[..., 1].ravel() + 1e-30, "o", ms=3)
        ax.set(xlabel="top |eigenvalue| of H_bb", ylabel="‖g_b‖", title="per-block curvature vs gradient")
        files.append(str(out / "block_curvature.png"))
        fig.savefig(files[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return files


def format_table(results: dict, max_rows: int = 40) -> str:
    """The scalar metrics as an aligned text table (per-block entries after the totals)."""
    per_block = lambda k: "/" in k and not k.startswith("top_eig/")  # noqa: E731
    items = sorted(results["metrics"].items(), key=lambda kv: (per_block(kv[0]), kv[0]))
    width = max([len(k) for k, _ in items] + [6])
    lines = [f"{'metric':<{width}}  value", "-" * (width + 14)]
    lines += [f"{k:<{width}}  {v:.6g}" for k, v in items[:max_rows]]
    if len(items) > max_rows:
        lines.append(f"... {len(items) - max_rows} more in hessian.npz")
    lines.append(f"{'HVPs':<{width}}  {results['hvps']}  ({results['seconds']:.1f} s)")
    return "\n".join(lines)


# -- checkpoints -------------------------------------------------------------------------------------
def fixed_batches(exp, hessian_cfg: HessianConfig, data=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``hessian.batches`` training batches of ``hessian.batch_size`` (default ``train.batch_size``) drawn
    from ``exp``'s corpus with a generator keyed by ``hessian.seed``: the same fixed batches every time."""
    from rayexp.data import load_tokens, sample_batch
    from rayexp.hessian.probes import generator
    from rayexp.models import block_size

    block = block_size(exp.model)
    data = data if data is not None else load_tokens(exp.data, block)
    g = generator(hessian_cfg.seed, "batches", 0)
    bs = hessian_cfg.batch_size or exp.train.batch_size
    return [sample_batch(data.train, block, bs, g) for _ in range(hessian_cfg.batches)]


def analyze_checkpoint(path: str, hessian_cfg: Optional[HessianConfig] = None, run_id: Optional[str] = None,
                       uri: Optional[str] = None, out_dir: Optional[str] = None, progress: bool = True) -> tuple[dict, list[str]]:
    """Load a checkpoint (naive attention, no dropout), analyze it on fixed batches, save the files, and log
    them to MLflow run ``run_id`` when given (``hessian.after_training`` in sweeps). Returns (results, files)."""
    from rayexp.train.checkpoint import load_model

    model, exp, _ = load_model(path, attention="naive", dropout=0.0)
    cfg = hessian_cfg or exp.hessian
    results = analyze(model, fixed_batches(exp, cfg), cfg, progress=progress)
    files = save_results(results, out_dir or Path(path) / "hessian")
    if run_id is not None:
        from rayexp.tracking import log_hessian_results
        log_hessian_results(run_id, uri, results["metrics"], files)
    return results, files

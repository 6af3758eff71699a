"""Outputs of a curvature analysis: ``hessian.npz``, density / scatter PNGs, the printed table, progress.

The table groups metrics by task, at most ``MAX_ROWS`` lines with units (eigenvalues are in loss units
per parameter², i.e. those of H); per-block entries stay in the npz. Progress is a rich bar on a terminal
and plain lines (count, rate, ETA) every ``LINE_EVERY_S`` seconds otherwise (a log file, CI, Ray).
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

MAX_ROWS = 20
LINE_EVERY_S = 30.0
TABLE = [  # (task, metric, label, unit)
    ("top_eigs", "top_eig/1", "λ_max", "H"), ("top_eigs", "lambda_min", "λ_min (Ritz)", "H"),
    ("top_eigs", "bottom_eig/1", "λ_min", "H"), ("top_eigs", "grad_norm", "‖∇L‖", "loss/param"),
    ("slq", "slq_moment1", "∫λφ ≈ tr H/d", "H"), ("slq", "slq_min", "min node", "H"), ("slq", "slq_max", "max node", "H"),
    ("slq_blocks", "js_heterogeneity", "JS₀ (mean pairwise JS distance)", "nats^½"),
    ("trace", "hutchinson_trace", "tr H", "H"), ("trace", "hutchinson_trace_se", "± s.e.", "H"),
    ("frobenius", "frobenius", "‖H‖_F", "H"), ("l11", "l11", "‖H‖₁,₁", "H"), ("l11", "l11_over_d", "‖H‖₁,₁ / d", "H"),
    ("l11", "l11_rotated_over_d", "‖RHRᵀ‖₁,₁ / d", "H"), ("l11", "l11_sample", "‖H‖₁,₁ (exact rows)", "H"),
    ("block_curvature", "curvature_gradnorm_logcorr", "corr(log λ_b, log ‖g_b‖)", "1"),
    ("grad_heterogeneity", "grad_heterogeneity", "std log10 ‖g_b‖", "decades"),
    ("grad_heterogeneity", "grad_norm_ratio", "max/min ‖g_b‖", "1"),
]


def format_table(results: dict) -> str:
    """The headline metrics grouped by task, with units; the rest is in ``hessian.npz``."""
    m = results["metrics"]
    rows = [(t, label, m[k], unit) for t, k, label, unit in TABLE if k in m and t in results.get("tasks", [t])]
    rows = rows[:MAX_ROWS - 3]
    width = max([len(label) for _, label, _, _ in rows] + [12])
    lines, last = [f"{'task':<18} {'metric':<{width}}  {'value':>12}  unit", "-" * (width + 40)], None
    for t, label, v, unit in rows:
        lines.append(f"{t if t != last else '':<18} {label:<{width}}  {v:>12.4g}  {unit}")
        last = t
    shown = len(rows)
    lines.append(f"{results['hvps']} Hessian-vector products in {results['seconds']:.1f} s; "
                 f"{len(m) - shown} more metrics in hessian.npz")
    return "\n".join(lines)


def save_results(results: dict, out_dir: str | Path, title: str = "") -> list[str]:
    """Write ``hessian.npz`` (all arrays and metrics) and PNG plots titled ``title``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = dict(results["arrays"])
    arrays["metric_names"] = np.array(list(results["metrics"]))
    arrays["metric_values"] = np.array(list(results["metrics"].values()), dtype=float)
    arrays["title"] = np.array(title)  # which run, step and optimizer the file describes
    files = [str(out / "hessian.npz")]
    np.savez_compressed(files[0], **arrays)
    return files + _plots(results["arrays"], out, title)


def _save(fig, path: Path, files: list) -> None:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    files.append(str(path))


def _plots(a: dict, out: Path, title: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[str] = []
    suffix = f"\n{title}" if title else ""
    if "slq_density" in a:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogy(a["slq_grid"], a["slq_density"] + 1e-12)
        ax.set(xlabel="eigenvalue of H", ylabel="density", title="SLQ spectral density" + suffix)
        _save(fig, out / "density.png", files)
    if "block_densities" in a:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name, dens in zip(a["block_names"], a["block_densities"]):
            ax.semilogy(a["block_grid"], dens + 1e-12, lw=0.8, label=str(name))
        ax.set(xlabel="eigenvalue of H_bb", ylabel="density", title="blockwise SLQ densities" + suffix)
        if len(a["block_names"]) <= 12:
            ax.legend(fontsize=6)
        im = ax2.imshow(a["js_matrix"], cmap="viridis")
        ax2.set_title("JS distance between blocks")
        fig.colorbar(im, ax=ax2)
        _save(fig, out / "block_densities.png", files)
    if "block_curvature" in a:
        arr = a["block_curvature"]
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.loglog(np.abs(arr[..., 0]).ravel() + 1e-30, arr[..., 1].ravel() + 1e-30, "o", ms=3)
        ax.set(xlabel="λ_max(H_bb)", ylabel="‖g_b‖", title="per-block curvature vs gradient" + suffix)
        _save(fig, out / "block_curvature.png", files)
    return files


class Progress:
    """Progress of ``count()`` against ``total`` products: a rich bar on a terminal, else plain lines."""

    def __init__(self, count: Callable[[], int], total: int, enabled: bool = True, stream=None):
        self.count, self.total, self.enabled = count, max(total, 1), enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.label, self.stop = "hessian", threading.Event()

    def __enter__(self):
        if not self.enabled:
            return self
        self.t0 = time.perf_counter()
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn
            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("HVPs"),
                           TimeRemainingColumn(), console=Console(file=self.stream))
            self.task = self.bar.add_task(self.label, total=self.total)
            self.bar.start()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def describe(self, label: str) -> None:
        self.label = label
        if self.tty:
            self.bar.update(self.task, description=label)

    def line(self, done: Optional[int] = None) -> str:
        """``hessian [slq]: 120/1030 HVPs (12%), 3.2 HVP/s, ETA 4m45s``."""
        done = self.count() if done is None else done
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        eta_s = f"{int(eta // 60)}m{int(eta % 60):02d}s" if eta == eta else "?"
        return f"hessian [{self.label}]: {done}/{self.total} HVPs ({100 * done / self.total:.0f}%), {rate:.3g} HVP/s, ETA {eta_s}"

    def _poll(self) -> None:
        last = time.perf_counter()
        while not self.stop.wait(0.5):
            try:
                done = self.count()
            except Exception:  # an engine shutting down
                return
            if self.tty:
                self.bar.update(self.task, completed=done, total=max(self.total, done))
            elif time.perf_counter() - last >= LINE_EVERY_S:
                print(self.line(done), file=self.stream, flush=True)
                last = time.perf_counter()

    def __exit__(self, *exc):
        if not self.enabled:
            return
        self.stop.set()
        self.thread.join(timeout=5)
        if self.tty:
            self.bar.stop()
        else:
            try:
                print(self.line(), file=self.stream, flush=True)
            except Exception:
                pass

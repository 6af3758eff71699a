"""The report's figures. Each ``plot_*`` returns ``(Figure, data)`` so callers and tests can check what
was drawn; ``(None, {})`` when its data is absent."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from rayexp.report.runs import HISTORY_KEYS, Config, HessianResult

BANDS = ("std", "minmax")
DENSITY_FLOOR = 1e-7  # spectra plots show densities down to this fraction of their peak
TICK_GAP_PX = 6  # the least gap between two tick labels of a thinned axis, in pixels at the figure's dpi


def spread(vals: np.ndarray, band: str) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of finite seed values: mean ± sample std (ddof=1; 0 for one seed) or min..max."""
    if band not in BANDS:
        raise ValueError(f"band={band!r}; allowed: {', '.join(BANDS)}")
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return np.nan, np.nan, np.nan
    mean = vals.mean()
    if band == "minmax":
        return mean, vals.min(), vals.max()
    sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
    return mean, mean - sd, mean + sd


def seed_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], band: str = "std"):
    """Mean over seeds at each step, with a band (``spread``): mean ± sample std or the min..max over seeds.

    Steps are the union over curves; each step averages the curves that logged it (runs stopped early
    drop out). Returns ``(steps, mean, lo, hi, n)``; non-finite values are ignored.
    """
    if band not in BANDS:
        raise ValueError(f"band={band!r}; allowed: {', '.join(BANDS)}")
    steps = np.unique(np.concatenate([s for s, _ in curves])) if curves else np.array([])
    mean, lo, hi, n = (np.full(len(steps), np.nan) for _ in range(4))
    for i, st in enumerate(steps):
        vals = np.array([v[s == st][-1] for s, v in curves if np.any(s == st)])
        n[i] = np.isfinite(vals).sum() if len(vals) else 0
        mean[i], lo[i], hi[i] = spread(vals, band)
    n[n == 0] = np.nan
    return steps, mean, lo, hi, n


def band_label(band: str) -> str:
    return "mean ± std over seeds" if band == "std" else "mean, min..max over seeds"


def plot_loss_curves(best: dict[str, Config], band: str = "std"):
    """Train and val loss vs step per series (its best config): mean over seeds with a shaded band."""
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    data = {}
    for ax, key in zip(axes, HISTORY_KEYS):
        for i, (series, cfg) in enumerate(best.items()):
            curves = [r.histories[key] for r in cfg.runs if key in r.histories]
            if not curves:
                continue
            steps, mean, lo, hi, n = seed_band(curves, band)
            color = f"C{i % 10}"
            ax.plot(steps, mean, color=color, label=f"{series} ({'' if cfg.label == '-' else cfg.label + ', '}{int(np.nanmax(n))} seeds)")
            ax.fill_between(steps, lo, hi, color=color, alpha=0.25, linewidth=0)
            data[(key, series)] = {"steps": steps, "mean": mean, "lo": lo, "hi": hi, "n": n}
        ax.set_xlabel("step")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(f"{key.replace('_', ' ')}: {band_label(band)}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, data


def _outcome(config: Config) -> str:
    """``failed`` when a seed of a config without a finite result raised, else ``diverged``."""
    return "failed" if any(r.status == "failed" for r in config.runs) else "diverged"


def thin_log_ticks(ax, values: Sequence[float]) -> None:
    """x ticks at ``values`` (the learning rates tried), labelled with 3 significant digits, no minor labels;
    from the left, a label that would come within ``TICK_GAP_PX`` of the last one kept is dropped (extents as
    the Agg renderer draws them), so labels never overlap however close the values lie."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ticks = sorted({float(v) for v in values if np.isfinite(v) and v > 0})
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    canvas = FigureCanvasAgg(ax.figure)
    canvas.draw()
    kept, right = [], -np.inf
    for label in ax.xaxis.get_majorticklabels():
        box = label.get_window_extent(canvas.get_renderer())
        if box.x0 >= right + TICK_GAP_PX:
            kept.append(label.get_position()[0])
            right = box.x1
    ax.xaxis.set_major_locator(FixedLocator(kept))


def plot_lr_sensitivity(configs: Sequence[Config], band: str = "std"):
    """Final val loss (mean with a seed band, as ``spread``) vs learning rate, log x, one line per series."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    data, diverged = {}, []
    by_series: dict[str, list[Config]] = {}
    for c in configs:
        by_series.setdefault(c.series, []).append(c)
    for i, (series, cs) in enumerate(by_series.items()):
        cs = sorted(cs, key=lambda c: c.lr)
        lrs = np.array([c.lr for c in cs])
        # mean and std as the summary has them (inf when every seed diverged), the band's lo..hi
        stats = np.array([[*c.final_stats()[:1], *spread(c.finals(), band)[1:], c.final_stats()[1]] for c in cs])
        ok = np.isfinite(stats[:, 0])
        color = f"C{i % 10}"
        yerr = np.nan_to_num([stats[ok, 0] - stats[ok, 1], stats[ok, 2] - stats[ok, 0]])
        ax.errorbar(lrs[ok], stats[ok, 0], yerr=yerr, color=color, marker="o", capsize=3, label=series)
        diverged += [(lr, color, _outcome(c)) for lr, c in zip(lrs[~ok], np.array(cs, dtype=object)[~ok])]
        data[series] = {"lr": lrs, "mean": stats[:, 0], "lo": stats[:, 1], "hi": stats[:, 2], "std": stats[:, 3]}
    if diverged:
        top, shown = ax.get_ylim()[1], set()
        for lr, color, outcome in diverged:  # × diverged, ▽ failed (raised): they are not the same story
            ax.plot([lr], [top], marker="x" if outcome == "diverged" else "v", color=color, ms=9, mew=2,
                    linestyle="none", clip_on=False, label=None if outcome in shown else f"{outcome} (all seeds)")
            shown.add(outcome)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optimizer.lr)")
    ax.set_ylabel("final val loss")
    ax.set_title(f"LR sensitivity: {band_label(band)}")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    thin_log_ticks(ax, [c.lr for c in configs])
    return fig, data


def plot_mada(configs: Sequence[Config], band: str = "std"):
    """MADA coefficient trajectories (``mada/<coef>``) of each MADA config, mean ± band over seeds."""
    mada = [c for c in configs if any(k.startswith("mada/") for r in c.runs for k in r.histories)]
    if not mada:
        return None, {}
    coefs = sorted({k for c in mada for r in c.runs for k in r.histories if k.startswith("mada/")})
    ncol = min(3, len(coefs))
    nrow = math.ceil(len(coefs) / ncol)
    fig = Figure(figsize=(4.2 * ncol, 3.2 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    data = {}
    for ax, coef in zip(axes, coefs):
        for i, c in enumerate(mada):
            curves = [r.histories[coef] for r in c.runs if coef in r.histories]
            steps, mean, lo, hi, _ = seed_band(curves, band)
            ax.plot(steps, mean, color=f"C{i % 10}", label=c.series if c.label == "-" else f"{c.series} {c.label}")
            ax.fill_between(steps, lo, hi, color=f"C{i % 10}", alpha=0.25, linewidth=0)
            data[(coef, c.label)] = {"steps": steps, "mean": mean, "lo": lo, "hi": hi}
        ax.set_xlabel("step")
        ax.set_ylabel(coef.split("/", 1)[1])
        ax.set_title(coef)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[len(coefs):]:
        ax.set_visible(False)
    fig.suptitle(f"MADA coefficients: {band_label(band)}")
    fig.tight_layout()
    return fig, data


def stability_thresholds(lr: np.ndarray, beta1: Optional[float]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """2/η (gradient descent) and (2 + 2β1)/((1 − β1)η) (Adam, preconditioned; Cohen et al. 2022) per step."""
    with np.errstate(divide="ignore"):
        sgd = 2.0 / lr
        adam = (2 + 2 * beta1) / ((1 - beta1) * lr) if beta1 is not None else None
    return sgd, adam


def plot_sharpness(configs: Sequence[Config], band: str = "std"):
    """λ_max(H) and Adam's preconditioned sharpness λ_max(P⁻¹H) against step (``curv/*``, mean over seeds with
    a seed band), each with its stability threshold from the logged learning rate."""
    have = [c for c in configs if any("curv/lambda_max" in r.histories for r in c.runs)]
    if not have:
        return None, {}
    fig = Figure(figsize=(11, 4))
    ax_h, ax_p = fig.subplots(1, 2)
    data = {}
    for i, c in enumerate(have):
        name, color = c.series if c.label == "-" else f"{c.series} {c.label}", f"C{i % 10}"
        run = next(r for r in c.runs if "curv/lambda_max" in r.histories)
        betas = run.params.get("optimizer.betas")
        beta1 = float(str(betas).strip("[]()").split(",")[0]) if betas and "adam" in name else None
        for key, ax, which in (("curv/lambda_max", ax_h, 0), ("curv/precond_sharpness", ax_p, 1)):
            curves = [r.histories[key] for r in c.runs if key in r.histories]
            if not curves:
                continue
            steps, mean, lo, hi, _ = seed_band(curves, band)
            ax.semilogy(steps, mean, color=color, label=name)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.25, linewidth=0)
            if "lr" in run.histories:
                lr = np.interp(steps, *run.histories["lr"])
                threshold = stability_thresholds(lr, beta1)[which]
                if threshold is not None:
                    ax.semilogy(steps, threshold, color=color, ls="--", lw=0.8)
            data[(key, name)] = {"steps": steps, "mean": mean, "lo": lo, "hi": hi}
    fig.suptitle(f"λ_max: {band_label(band)}")
    ax_h.set(xlabel="step", ylabel="λ_max(H)", title="sharpness; dashed: 2/η")
    ax_p.set(xlabel="step", ylabel="λ_max(P⁻¹H)", title="preconditioned sharpness; dashed: (2+2β₁)/((1−β₁)η)")
    for ax in (ax_h, ax_p):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, data


def _colors(n: int) -> list:
    """n distinguishable colours: matplotlib's default cycle up to 10, tab20 up to 20, then turbo."""
    from matplotlib import colormaps
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / (n - 1)) for i in range(n)]


def plot_spectra(results: Sequence[HessianResult]):
    """Full-Hessian SLQ densities (log y) of each run with one, overlaid."""
    have = [h for h in results if "slq_density" in h.arrays]
    if not have:
        return None, {}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for i, h in enumerate(have):
        ax.semilogy(h.arrays["slq_grid"], h.arrays["slq_density"] + 1e-12, color=f"C{i % 10}", label=h.label)
    ax.set_ylim(bottom=DENSITY_FLOOR * max(float(h.arrays["slq_density"].max()) for h in have))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ, Gaussian σ² smoothing)")
    ax.set_title("Full Hessian spectrum")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, {h.label: h.arrays["slq_density"] for h in have}


def plot_block_spectra(results: Sequence[HessianResult], max_legend: int = 12):
    """Blockwise SLQ densities, one panel per run (each block a line)."""
    have = [h for h in results if "block_densities" in h.arrays]
    if not have:
        return None, {}
    fig = Figure(figsize=(6.5 * len(have), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(have)))
    for ax, h in zip(axes, have):
        a = h.arrays
        colors = _colors(len(a["block_names"]))
        for j, (name, dens) in enumerate(zip(a["block_names"], a["block_densities"])):
            ax.semilogy(a["block_grid"], dens + 1e-12, lw=0.8, color=colors[j], label=str(name))
        ax.set_ylim(bottom=DENSITY_FLOOR * float(np.max(a["block_densities"])))
        js = h.metrics.get("js_heterogeneity")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"{h.label}: blockwise spectra" + (f" (JS₀ = {js:.3g})" if js is not None else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5, ncol=2 if len(a["block_names"]) > max_legend else 1,
                  handles=ax.get_legend_handles_labels()[0][:2 * max_legend])
    fig.tight_layout()
    return fig, {h.label: len(h.arrays["block_names"]) for h in have}


def plot_heterogeneity(results: Sequence[HessianResult]):
    """Jensen–Shannon distance matrices between blockwise densities, one heatmap per run."""
    have = [h for h in results if "js_matrix" in h.arrays]
    if not have:
        return None, {}
    fig = Figure(figsize=(6 * len(have), 5.2))
    axes = np.atleast_1d(fig.subplots(1, len(have)))
    vmax = max(float(np.max(h.arrays["js_matrix"])) for h in have) or 1.0
    for ax, h in zip(axes, have):
        mat, names = h.arrays["js_matrix"], [str(n) for n in h.arrays.get("block_names", [])]
        im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=vmax)
        if names and len(names) <= 30:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=5)
            ax.set_yticks(range(len(names)), names, fontsize=5)
        ax.set_xlabel("block")
        ax.set_ylabel("block")
        js = h.metrics.get("js_heterogeneity", float(mat[np.triu_indices(len(mat), 1)].mean()) if len(mat) > 1 else 0.0)
        ax.set_title(f"{h.label}: JS distance (mean {js:.3g})")
        fig.colorbar(im, ax=ax, label="JS distance")
    fig.tight_layout()
    return fig, {h.label: h.arrays["js_matrix"] for h in have}


def plot_l11(results: Sequence[HessianResult]):
    """‖H‖₁,₁/d in the native and the rotated basis, grouped bars per run."""
    have = [h for h in results if "l11_over_d" in h.metrics]
    if not have:
        return None, {}
    fig = Figure(figsize=(max(5.0, 1.6 * len(have) + 2), 4.5))
    ax = fig.subplots()
    x = np.arange(len(have))
    native = np.array([h.metrics["l11_over_d"] for h in have])
    rotated = np.array([h.metrics.get("l11_rotated_over_d", np.nan) for h in have])
    ax.bar(x - 0.2, native, 0.4, label="native basis", color="C0")
    if np.isfinite(rotated).any():
        ax.bar(x + 0.2, rotated, 0.4, label="rotated basis", color="C3")
    ax.set_xticks(x, [h.label for h in have], rotation=20, fontsize=8)
    ax.set_xlabel("run")
    ax.set_ylabel("‖H‖₁,₁ / d  (Cauchy-sketch estimate)")
    ax.set_title("1-1 norm of the Hessian: native vs rotated")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    return fig, {h.label: {"native": n, "rotated": r} for h, n, r in zip(have, native, rotated)}


def plot_grad_norms(results: Sequence[HessianResult]):
    """Per-block gradient norms ‖g_b‖ (log y, blocks in model order) of each run, with the
    heterogeneity scalar std(log10 ‖g_b‖)."""
    have = [h for h in results if "block_grad_norms" in h.arrays]
    if not have:
        return None, {}
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for i, h in enumerate(have):
        norms = h.arrays["block_grad_norms"]
        het = h.metrics.get("grad_heterogeneity")
        ax.semilogy(np.arange(len(norms)) / max(len(norms) - 1, 1), norms + 1e-30, "o-", ms=3, color=f"C{i % 10}",
                    label=h.label + (f" (std log10 = {het:.2f})" if het is not None else ""))
    ax.set_xlabel("block position in the model (0 = first, 1 = last)")
    ax.set_ylabel("‖g_b‖ (gradient norm of block)")
    ax.set_title("Gradient heterogeneity across parameter blocks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, {h.label: h.arrays["block_grad_norms"] for h in have}

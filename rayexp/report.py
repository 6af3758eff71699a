"""``python -m rayexp.report EXPERIMENT [--uri URI] [--out DIR]``: figures and tables from MLflow alone.

Reads the runs of one sweep (the latest parent run of ``EXPERIMENT``, or ``--parent RUN_ID``) with
``MlflowClient``; nothing is re-trained. Runs are grouped into *configs* (equal params except the seed)
and configs into *series* (equal categorical params: optimizer, rotation, granularity, model kind...;
numeric params such as ``optimizer.lr`` are what a series is tuned over). Writes:

- ``loss_curves.png``: train / val loss vs step of each series' best config, mean over seeds with a
  band of ± one sample standard deviation (ddof=1; ``--band minmax``: min..max over seeds);
- ``lr_sensitivity.png``: final val loss (mean ± std over seeds) vs ``optimizer.lr``, log x, one line
  per series; diverged configs as × on the top edge;
- ``best_configs`` table: per series its best config, final val loss mean ± std, seeds, statuses;
- ``mada.png``: MADA coefficient trajectories (``mada/<coef>`` metrics), mean ± band over seeds;
- ``spectra.png``, ``block_spectra.png``, ``heterogeneity.png``: SLQ densities (full, per block) and
  JS-distance matrices from the ``hessian/*.npz`` artifacts (``rayexp.hessian.save_results`` layout);
- ``l11.png``: ‖H‖₁,₁/d native vs rotated (``hessian/l11_over_d``, ``hessian/l11_rotated_over_d``);
- ``grad_norms.png``: per-block gradient norms (``block_grad_norms`` arrays) and their heterogeneity;
- ``report.html``: one self-contained page (PNGs inlined as base64) with the tables.

Figures whose data is absent are skipped with a note. The output directory is logged to the sweep's
parent run under the ``report/`` artifact path.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from rayexp.config import ConfigError
from rayexp.spaces import param_label

BANDS = ("std", "minmax")
SKIP_PARAMS = ("seed", "name", "output_dir", "data.cache_dir", "tracking.uri", "tracking.experiment")
SKIP_PREFIXES = ("sweep.",)
HISTORY_KEYS = ("train_loss", "val_loss")
DENSITY_FLOOR = 1e-7  # spectra plots show densities down to this fraction of their peak
HISTORY_PREFIXES = ("mada/",)


# ----------------------------------------------------------------------------------------------------
# reading runs


@dataclass
class RunRecord:
    """One child run: identity, params, latest metrics and the loaded metric histories."""
    run_id: str
    name: str
    params: dict
    tags: dict
    metrics: dict
    histories: dict = field(default_factory=dict)  # key -> (steps, values), sorted by step

    @property
    def status(self) -> str:
        return self.tags.get("rayexp.status", "unknown")

    @property
    def seed(self) -> str:
        return self.tags.get("rayexp.seed", self.params.get("seed", "?"))

    def final_val_loss(self) -> float:
        """``final/val_loss`` (else the last logged ``val_loss``); +inf for diverged or failed runs."""
        if self.status in ("diverged", "failed"):
            return math.inf
        v = self.metrics.get("final/val_loss", self.metrics.get("val_loss", math.nan))
        return float(v) if math.isfinite(v) else math.inf


@dataclass
class SweepRuns:
    """The runs a report is made from: the parent run (None for runs outside a sweep) and its children."""
    uri: str
    experiment: str
    parent: Optional[object]
    runs: list
    client: object


def load_runs(uri: Optional[str], experiment: str, parent: Optional[str] = None) -> SweepRuns:
    """Runs of one sweep of ``experiment``: children of ``parent`` (default: the latest sweep run), or,
    when the experiment has no sweep run, all its trial runs."""
    from mlflow.tracking import MlflowClient

    from rayexp.tracking import PARENT_TAG, resolve_uri

    uri = resolve_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"experiment {experiment!r} not found in {uri}; experiments there: {', '.join(names) or 'none'}")
    eid = exp.experiment_id
    if parent is None:
        sweeps = client.search_runs([eid], filter_string="tags.`rayexp.kind` = 'sweep'",
                                    order_by=["start_time DESC"], max_results=1)
        parent_run = sweeps[0] if sweeps else None
    else:
        try:
            parent_run = client.get_run(parent)
        except Exception:
            raise ConfigError(f"--parent {parent}: no such run in {uri}") from None
    flt = f"tags.`{PARENT_TAG}` = '{parent_run.info.run_id}'" if parent_run else "tags.`rayexp.kind` = 'trial'"
    found = client.search_runs([eid], filter_string=flt, order_by=["start_time ASC"], max_results=10000)
    runs = [RunRecord(r.info.run_id, r.info.run_name or r.info.run_id[:8], dict(r.data.params), dict(r.data.tags),
                      dict(r.data.metrics)) for r in found]
    for r in runs:
        for key in r.metrics:
            if key in HISTORY_KEYS or key.startswith(HISTORY_PREFIXES):
                hist = sorted((m.step, m.value) for m in client.get_metric_history(r.run_id, key))
                r.histories[key] = (np.array([s for s, _ in hist], dtype=float),
                                    np.array([v for _, v in hist], dtype=float))
    return SweepRuns(uri, experiment, parent_run, runs, client)


# ----------------------------------------------------------------------------------------------------
# grouping: configs (runs equal but for the seed) and series (configs equal but for numeric params)


def _is_numeric(text: str) -> bool:
    """'0.001' or '[0.9, 0.95]' → True; 'adamw', 'None', 'True' → False."""
    try:
        val = json.loads(text.replace("(", "[").replace(")", "]"))
    except (ValueError, AttributeError):
        return False
    vals = val if isinstance(val, list) else [val]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def varied_params(runs: Sequence[RunRecord]) -> list[str]:
    """Params whose values differ between runs (seed, names and paths left out)."""
    keys = sorted({k for r in runs for k in r.params})
    out = []
    for k in keys:
        if k in SKIP_PARAMS or k.startswith(SKIP_PREFIXES):
            continue
        if len({r.params.get(k) for r in runs}) > 1:
            out.append(k)
    return out


@dataclass
class Config:
    """Runs with equal params except the seed."""
    values: dict  # varied param -> value
    series: str
    runs: list
    series_params: tuple = ()

    @property
    def label(self) -> str:
        """The varied values that are not part of the series name (e.g. ``lr=0.003``)."""
        return " ".join(param_label(k, v) for k, v in self.values.items() if k not in self.series_params) or "-"

    def finals(self) -> np.ndarray:
        return np.array([r.final_val_loss() for r in self.runs])

    def final_stats(self) -> tuple[float, float, int]:
        """(mean, sample std, n) of the finite final val losses over seeds (inf mean when none)."""
        f = self.finals()
        ok = f[np.isfinite(f)]
        if not len(ok):
            return math.inf, math.nan, 0
        return float(ok.mean()), float(ok.std(ddof=1)) if len(ok) > 1 else 0.0, len(ok)

    @property
    def lr(self) -> float:
        return float(self.runs[0].params.get("optimizer.lr", "nan"))


def group_configs(runs: Sequence[RunRecord], series: Optional[Sequence[str]] = None) -> list[Config]:
    """Configs of ``runs``; ``series`` names the params that tell lines apart (default: optimizer name
    plus every varied non-numeric param)."""
    varied = varied_params(runs)
    if series is None:
        series = ["optimizer.name"] + [k for k in varied if k != "optimizer.name"
                                       and not all(_is_numeric(r.params.get(k, "")) for r in runs)]
    configs: dict = {}
    for r in runs:
        values = {k: r.params.get(k) for k in varied if _applies(k, r.params)}
        key = tuple(values.items())
        if key not in configs:
            ser = " ".join(param_label(k, r.params.get(k)) for k in series
                           if r.params.get(k) is not None and _applies(k, r.params))
            configs[key] = Config(values, ser or "runs", [], tuple(series))
        configs[key].runs.append(r)
    return list(configs.values())


def _applies(param: str, params: dict) -> bool:
    """False for an optimizer option the run's optimizer does not read (e.g. granularity under sgd)."""
    from rayexp.optim.registry import OPTIMIZERS

    family = OPTIMIZERS.get(params.get("optimizer.name", ""))
    if family is None or not param.startswith("optimizer.") or param == "optimizer.name":
        return True
    sub = param[len("optimizer."):]
    return any(sub == o or sub.startswith(o + ".") for o in family.options)


def best_per_series(configs: Sequence[Config]) -> dict[str, Config]:
    """For each series, the config with the lowest mean final val loss (order of first appearance)."""
    best: dict[str, Config] = {}
    for c in configs:
        if c.series not in best or c.final_stats()[0] < best[c.series].final_stats()[0]:
            best[c.series] = c
    return best


def seed_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], band: str = "std"):
    """Mean over seeds at each step, with a band: mean ± sample std (ddof=1) or the min..max over seeds.

    Steps are the union over curves; each step averages the curves that logged it (runs stopped early
    drop out). Returns ``(steps, mean, lo, hi, n)``; non-finite values are ignored.
    """
    if band not in BANDS:
        raise ValueError(f"band={band!r}; allowed: {', '.join(BANDS)}")
    steps = np.unique(np.concatenate([s for s, _ in curves])) if curves else np.array([])
    mean, lo, hi, n = (np.full(len(steps), np.nan) for _ in range(4))
    for i, st in enumerate(steps):
        vals = np.array([v[s == st][-1] for s, v in curves if np.any(s == st)])
        vals = vals[np.isfinite(vals)]
        if not len(vals):
            continue
        n[i], mean[i] = len(vals), vals.mean()
        if band == "std":
            sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
            lo[i], hi[i] = mean[i] - sd, mean[i] + sd
        else:
            lo[i], hi[i] = vals.min(), vals.max()
    return steps, mean, lo, hi, n


# ----------------------------------------------------------------------------------------------------
# figures: each returns (Figure, data) so callers and tests can check what was drawn


def _band_label(band: str) -> str:
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
        ax.set_title(f"{key.replace('_', ' ')}: {_band_label(band)}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, data


def plot_lr_sensitivity(configs: Sequence[Config]):
    """Final val loss (mean ± std over seeds) vs learning rate, log x, one line per series."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    data, diverged = {}, []
    by_series: dict[str, list[Config]] = {}
    for c in configs:
        by_series.setdefault(c.series, []).append(c)
    for i, (series, cs) in enumerate(by_series.items()):
        cs = sorted(cs, key=lambda c: c.lr)
        lrs = np.array([c.lr for c in cs])
        stats = np.array([c.final_stats()[:2] for c in cs])
        ok = np.isfinite(stats[:, 0])
        color = f"C{i % 10}"
        ax.errorbar(lrs[ok], stats[ok, 0], yerr=np.nan_to_num(stats[ok, 1]), color=color, marker="o", capsize=3,
                    label=series)
        diverged += [(lr, color) for lr in lrs[~ok]]
        data[series] = {"lr": lrs, "mean": stats[:, 0], "std": stats[:, 1]}
    if diverged:
        top = ax.get_ylim()[1]
        for j, (lr, color) in enumerate(diverged):
            ax.plot([lr], [top], marker="x", color=color, ms=9, mew=2, linestyle="none", clip_on=False,
                    label="diverged (all seeds)" if j == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optimizer.lr)")
    ax.set_ylabel("final val loss")
    ax.set_title("LR sensitivity: mean ± std over seeds")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, data


def best_table(configs: Sequence[Config]) -> list[dict]:
    """Per series its best config: final val loss mean ± std over seeds, seed count and statuses."""
    rows = []
    for series, c in best_per_series(configs).items():
        mean, std, n = c.final_stats()
        statuses = [r.status for r in c.runs]
        rows.append({"series": series, "config": c.label, "val_loss_mean": mean, "val_loss_std": std,
                     "seeds": len(c.runs), "finite": n,
                     "statuses": " ".join(f"{s}:{statuses.count(s)}" for s in sorted(set(statuses))),
                     "steps": int(max(r.metrics.get("final/step", 0) for r in c.runs))})
    return sorted(rows, key=lambda r: r["val_loss_mean"])


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
    fig.suptitle(f"MADA coefficients: {_band_label(band)}")
    fig.tight_layout()
    return fig, data


# -- Hessian results ---------------------------------------------------------------------------------


@dataclass
class HessianResult:
    """Curvature results of one run: ``hessian/*`` metrics and the arrays of its ``hessian/*.npz``."""
    label: str
    run_id: str
    metrics: dict
    arrays: dict


def load_hessian(sweep: SweepRuns, runs: Optional[Sequence[RunRecord]] = None,
                 labels: Optional[dict] = None) -> list[HessianResult]:
    """Hessian results of ``runs`` (default all): metrics named ``hessian/<name>`` and arrays from every
    ``.npz`` under the run's ``hessian/`` artifacts (``rayexp.hessian.save_results`` writes ``hessian.npz``)."""
    out = []
    for r in runs if runs is not None else sweep.runs:
        metrics = {k.split("/", 1)[1]: v for k, v in r.metrics.items() if k.startswith("hessian/")}
        arrays: dict = {}
        try:
            files = [f.path for f in sweep.client.list_artifacts(r.run_id, "hessian") if f.path.endswith(".npz")]
        except Exception:  # no artifact store reachable for this run
            files = []
        for path in files:
            local = sweep.client.download_artifacts(r.run_id, path, tempfile.mkdtemp(prefix="rayexp-report-"))
            with np.load(local, allow_pickle=False) as z:
                arrays.update({k: z[k] for k in z.files})
        if "metric_names" in arrays:  # save_results stores the scalars too
            for k, v in zip(arrays["metric_names"], arrays["metric_values"]):
                metrics.setdefault(str(k), float(v))
        if metrics or arrays:
            label = (labels or {}).get(r.run_id) or _run_label(sweep, r)
            out.append(HessianResult(label, r.run_id, metrics, arrays))
    return out


def _run_label(sweep: SweepRuns, r: RunRecord) -> str:
    varied = varied_params(sweep.runs) if len(sweep.runs) > 1 else []
    varied.sort(key=lambda k: all(_is_numeric(x.params.get(k, "")) for x in sweep.runs))  # names first
    vals = " ".join(param_label(k, r.params.get(k)) for k in varied if k in r.params and _applies(k, r.params))
    return f"{vals or r.name} s{r.seed}"


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


# ----------------------------------------------------------------------------------------------------
# the report


@dataclass
class Report:
    """What ``build_report`` made: PNG paths by figure name, tables, the HTML page, skipped sections."""
    out_dir: Path
    figures: dict
    tables: dict
    html: Path
    skipped: dict
    data: dict
    parent_run_id: Optional[str]


def _png(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def table_html(rows: list[dict]) -> str:
    """An HTML table of a list of same-keyed dicts."""
    if not rows:
        return "<p>(empty)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def table_text(rows: list[dict]) -> str:
    """A plain-text aligned table of a list of same-keyed dicts."""
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


SECTIONS = [
    ("loss_curves", "Loss curves (best config per series)"),
    ("lr_sensitivity", "Learning-rate sensitivity"),
    ("mada", "MADA coefficient trajectories"),
    ("spectra", "Hessian spectrum (full)"),
    ("block_spectra", "Hessian spectra per block"),
    ("heterogeneity", "Blockwise heterogeneity (JS distances)"),
    ("l11", "‖H‖₁,₁ native vs rotated"),
    ("grad_norms", "Gradient heterogeneity"),
]


def render_html(title: str, figures: dict, tables: dict, skipped: dict, notes: Sequence[str] = ()) -> str:
    """One self-contained HTML page: tables, then every figure inlined as a base64 PNG."""
    css = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto;color:#222}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
           "th{background:#eee}img{max-width:100%}.skip{color:#888}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    for name, rows in tables.items():
        parts.append(f"<h2>{html.escape(name.replace('_', ' '))}</h2>{table_html(rows)}")
    for name, heading in SECTIONS:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if name in figures:
            b64 = base64.b64encode(Path(figures[name]).read_bytes()).decode()
            parts.append(f"<img alt='{name}' src='data:image/png;base64,{b64}'>")
        else:
            parts.append(f"<p class='skip'>skipped: {html.escape(skipped.get(name, 'no data'))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(experiment: str, uri: Optional[str] = None, out_dir: str | Path = "report",
                 parent: Optional[str] = None, band: str = "std", series: Optional[Sequence[str]] = None,
                 log_artifacts: bool = True, hessian_labels: Optional[dict] = None) -> Report:
    """Make every figure and table the runs support, write the HTML page, and log ``out_dir`` to the
    sweep's parent run as ``report/`` artifacts. Reads MLflow only."""
    if band not in BANDS:
        raise ConfigError(f"band={band!r}; allowed: {', '.join(BANDS)}")
    sweep = load_runs(uri, experiment, parent)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures, skipped, data, tables = {}, {}, {}, {}
    if not sweep.runs:
        skipped.update({name: "the sweep has no child runs" for name, _ in SECTIONS})
        configs = []
    else:
        configs = group_configs(sweep.runs, series)
        tables["best_configs"] = best_table(configs)
        tables["runs"] = [{"run": r.name, "run_id": r.run_id[:8], **{k: v for k, v in c.values.items()},
                           "seed": r.seed, "status": r.status, "final val loss": r.final_val_loss()}
                          for c in configs for r in c.runs]
    hess = load_hessian(sweep, labels=hessian_labels) if sweep.runs else []
    if hess:
        tables["hessian"] = [{"run": h.label, **{k: h.metrics[k] for k in HESSIAN_TABLE if k in h.metrics}}
                             for h in hess]
    makers = {
        "loss_curves": (lambda: plot_loss_curves(best_per_series(configs), band),
                        "no train_loss/val_loss histories"),
        "lr_sensitivity": (lambda: plot_lr_sensitivity(configs) if _lr_varies(configs) else (None, {}),
                           "optimizer.lr takes a single value per series"),
        "mada": (lambda: plot_mada(configs, band), "no mada/* metrics (no MADA runs)"),
        "spectra": (lambda: plot_spectra(hess), "no hessian/*.npz with an slq density"),
        "block_spectra": (lambda: plot_block_spectra(hess), "no hessian/*.npz with blockwise densities"),
        "heterogeneity": (lambda: plot_heterogeneity(hess), "no hessian/*.npz with a JS matrix"),
        "l11": (lambda: plot_l11(hess), "no hessian/l11_over_d metrics"),
        "grad_norms": (lambda: plot_grad_norms(hess), "no hessian/*.npz with block gradient norms"),
    }
    for name, (make, why) in makers.items():
        if not sweep.runs:
            break
        fig, d = make()
        if fig is None or not any(ax.has_data() for ax in fig.axes):
            skipped[name] = why
            continue
        figures[name] = _png(fig, out / f"{name}.png")
        data[name] = d
    parent_id = sweep.parent.info.run_id if sweep.parent is not None else None
    notes = [f"MLflow {sweep.uri}, experiment {experiment!r}, "
             + (f"parent run {parent_id}" if parent_id else "all trial runs (no sweep run)")
             + f", {len(sweep.runs)} runs. Bands: {_band_label(band)}."]
    for name, rows in tables.items():
        (out / f"{name}.txt").write_text(table_text(rows) + "\n")
    page = out / "report.html"
    page.write_text(render_html(f"rayexp report: {experiment}", figures, tables, skipped, notes))
    if log_artifacts and parent_id:
        sweep.client.log_artifacts(parent_id, str(out), "report")
    return Report(out, figures, tables, page, skipped, data, parent_id)


HESSIAN_TABLE = ("lambda_max_abs", "js_heterogeneity", "l11_over_d", "l11_rotated_over_d", "grad_heterogeneity",
                 "grad_norm_ratio", "hutchinson_trace", "frobenius", "curvature_gradnorm_logcorr")


def _lr_varies(configs: Sequence[Config]) -> bool:
    per: dict = {}
    for c in configs:
        per.setdefault(c.series, set()).add(c.lr)
    return any(len(v) > 1 for v in per.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rayexp.report", description=__doc__.splitlines()[0])
    ap.add_argument("experiment", help="MLflow experiment name (the sweep's tracking.experiment)")
    ap.add_argument("--uri", default=None, help="tracking URI (default: sqlite:///$PWD/mlflow.db)")
    ap.add_argument("--out", default=None, help="output directory (default: report/<experiment>)")
    ap.add_argument("--parent", default=None, help="parent run id of the sweep (default: the latest sweep)")
    ap.add_argument("--band", default="std", choices=BANDS, help="seed band: ±1 sample std, or min..max")
    ap.add_argument("--series", default=None, help="comma-separated params that tell lines apart "
                                                   "(default: optimizer.name + varied non-numeric params)")
    ap.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = ap.parse_args(argv)
    import logging
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        rep = build_report(args.experiment, args.uri, args.out or f"report/{args.experiment}", args.parent,
                           args.band, args.series.split(",") if args.series else None, not args.no_log)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, rows in rep.tables.items():
        if name != "runs":
            print(f"{name}:\n{table_text(rows)}\n")
    for name, path in rep.figures.items():
        print(f"figure {name}: {path}")
    for name, why in rep.skipped.items():
        print(f"skipped {name}: {why}")
    print(f"html: {rep.html}")
    if rep.parent_run_id and not args.no_log:
        print(f"logged to MLflow run {rep.parent_run_id} under report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

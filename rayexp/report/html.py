"""The report page: tables as HTML and text, one self-contained HTML file, and ``build_report``, which
makes every figure and table the runs support. Reads MLflow only."""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.figure import Figure

from rayexp.config import ConfigError
from rayexp.report import figures as F
from rayexp.report.runs import Config, best_per_series, best_table, group_configs, load_hessian, load_runs


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
    source: str = ""  # which store, experiment and sweep the report was made from


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
    ("sharpness", "Sharpness during training (hessian.every)"),
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


def _tables(configs: Sequence[Config], hess: list) -> dict:
    """The best-config table, one row per run, and the Hessian scalars of the runs that have them."""
    tables = {}
    if configs:
        tables["best_configs"] = best_table(configs)
        tables["runs"] = [{"run": r.name, "run_id": r.run_id[:8], **{k: v for k, v in c.values.items()},
                           "seed": r.seed, "status": r.status, "final val loss": r.final_val_loss()}
                          for c in configs for r in c.runs]
    if hess:
        tables["hessian"] = [{"run": h.label, **{k: h.metrics[k] for k in HESSIAN_TABLE if k in h.metrics}}
                             for h in hess]
    return tables


def _figures(configs: Sequence[Config], hess: list, band: str, out: Path) -> tuple[dict, dict, dict]:
    """Each figure its data supports, as ``out/<name>.png``: (paths, plotted data, skipped → why)."""
    makers = {
        "loss_curves": (lambda: F.plot_loss_curves(best_per_series(configs), band),
                        "no train_loss/val_loss histories"),
        "lr_sensitivity": (lambda: F.plot_lr_sensitivity(configs, band) if _lr_varies(configs) else (None, {}),
                           "optimizer.lr takes a single value per series"),
        "mada": (lambda: F.plot_mada(configs, band), "no mada/* metrics (no MADA runs)"),
        "sharpness": (lambda: F.plot_sharpness(configs, band), "no curv/lambda_max metrics (hessian.every = 0)"),
        "spectra": (lambda: F.plot_spectra(hess), "no hessian/*.npz with an slq density"),
        "block_spectra": (lambda: F.plot_block_spectra(hess), "no hessian/*.npz with blockwise densities"),
        "heterogeneity": (lambda: F.plot_heterogeneity(hess), "no hessian/*.npz with a JS matrix"),
        "l11": (lambda: F.plot_l11(hess), "no hessian/l11_over_d metrics"),
        "grad_norms": (lambda: F.plot_grad_norms(hess), "no hessian/*.npz with block gradient norms"),
    }
    figures, data, skipped = {}, {}, {}
    for name, (make, why) in makers.items():
        fig, d = make()
        if fig is None or not any(ax.has_data() for ax in fig.axes):
            skipped[name] = why
            continue
        figures[name] = _png(fig, out / f"{name}.png")
        data[name] = d
    return figures, data, skipped


def build_report(experiment: str, uri: Optional[str] = None, out_dir: str | Path = "report",
                 parent: Optional[str] = None, band: str = "std", series: Optional[Sequence[str]] = None,
                 log_artifacts: bool = True, hessian_labels: Optional[dict] = None) -> Report:
    """Make every figure and table the runs support, write the HTML page, and log ``out_dir`` to the
    sweep's parent run as ``report/`` artifacts. Reads MLflow only."""
    if band not in F.BANDS:
        raise ConfigError(f"band={band!r}; allowed: {', '.join(F.BANDS)}")
    sweep = load_runs(uri, experiment, parent)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = group_configs(sweep.runs, series) if sweep.runs else []
    hess = load_hessian(sweep, labels=hessian_labels) if sweep.runs else []
    tables = _tables(configs, hess)
    if sweep.runs:
        figures, data, skipped = _figures(configs, hess, band, out)
    else:
        figures, data, skipped = {}, {}, {name: "the sweep has no child runs" for name, _ in SECTIONS}
    parent_id = sweep.parent.info.run_id if sweep.parent is not None else None
    notes = [f"MLflow {sweep.uri}, experiment {experiment!r}, "
             + (f"sweep {sweep.parent.info.run_name} (parent run {parent_id})" if parent_id
                else "all trial runs (no sweep run)")
             + f", {len(sweep.runs)} runs. Bands: {F.band_label(band)}."]
    for name, rows in tables.items():
        (out / f"{name}.txt").write_text(table_text(rows) + "\n")
    page = out / "report.html"
    page.write_text(render_html(f"rayexp report: {experiment}", figures, tables, skipped, notes))
    if log_artifacts and parent_id:
        sweep.client.log_artifacts(parent_id, str(out), "report")
    return Report(out, figures, tables, page, skipped, data, parent_id, notes[0])


HESSIAN_TABLE = ("lambda_max_abs", "js_heterogeneity", "l11_over_d", "l11_rotated_over_d", "grad_heterogeneity",
                 "grad_norm_ratio", "hutchinson_trace", "frobenius", "curvature_gradnorm_logcorr")


def _lr_varies(configs: Sequence[Config]) -> bool:
    per: dict = {}
    for c in configs:
        per.setdefault(c.series, set()).add(c.lr)
    return any(len(v) > 1 for v in per.values())

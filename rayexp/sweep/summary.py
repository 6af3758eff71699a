"""The sweep summary, read back from MLflow (so it is the same after a resume): per optimizer its best
config (``rayexp.tracking.best_per_series``, as in the report), final val loss mean ± std over seeds."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from rayexp import tracking
from rayexp.spaces import SweepSpec, param_label


def _joined(params: dict, prefix: str) -> Optional[str]:
    items = sorted((k[len(prefix) + 1:], v) for k, v in params.items() if k.startswith(prefix + "."))
    return ",".join(f"{k}={v}" for k, v in items) or None


def _param_name(space_path: str) -> str:
    """The MLflow param a space sets (``optimizer.adamw.lr`` → ``optimizer.lr``)."""
    parts = space_path.split(".")
    if parts[0] == "optimizer" and len(parts) > 2:
        return ".".join([parts[0]] + parts[2:])
    return space_path


def groups(runs: list, spec: SweepSpec) -> list[tracking.RunGroup]:
    """Runs grouped by optimizer (the series) and the values of the swept params."""
    swept = sorted({_param_name(p) for p in spec.spaces} - {"optimizer.name"})
    out: dict = {}
    for r in runs:  # a swept mapping (e.g. optimizer.mada.hyper_lr) is logged as one param per key
        cfg = tuple((p, r.params.get(p) or _joined(r.params, p)) for p in swept)
        opt = r.params.get("optimizer.name")
        out.setdefault((opt, cfg), tracking.RunGroup(opt, dict(cfg))).runs.append(r)
    return list(out.values())


def _num(v) -> str:
    """A param value as the summary shows it: numbers with 3 significant digits."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f"{x:.3g}" if not isinstance(v, bool) and math.isfinite(x) else str(v)


def label(values: dict) -> str:
    return " ".join(param_label(k, _num(v)) for k, v in values.items()) or "-"


def grid_edges(best: tracking.RunGroup, series: list[tracking.RunGroup]) -> list[str]:
    """Notes for each numeric setting of ``best`` that is the lowest or highest value its series tried."""
    notes = []
    for param, value in best.values.items():
        try:
            tried = sorted({float(g.values[param]) for g in series})
            v = float(value)
        except (TypeError, ValueError, KeyError):
            continue
        if len(tried) > 1 and v in (tried[0], tried[-1]):
            notes.append(f"{best.series}'s best {param}={_num(v)} is at the edge of the values tried "
                         f"[{', '.join(_num(t) for t in tried)}]: the optimum may lie outside")
    return notes


def summarize(uri: str, parent_run_id: str, spec: SweepSpec) -> list[dict]:
    """Per optimizer, its best config: final val loss mean ± std over seeds (and the finals), steps, tokens/s,
    the statuses of every trial of that optimizer, and grid-edge notes."""
    runs = [tracking.RunRecord.of(r) for r in tracking.sweep_children(uri, parent_run_id)]
    gs = groups(runs, spec)
    rows = []
    for g in tracking.best_per_series(gs).values():
        mean, std, _ = g.final_stats()
        series = [x for x in gs if x.series == g.series]
        rows.append({"optimizer": g.series, "config": g.values, "n": len(g.runs), "finals": list(g.finals()),
                     "statuses": [r.status for x in series for r in x.runs], "mean": mean,
                     "std": std if math.isfinite(std) else 0.0, "edges": grid_edges(g, series),
                     "steps": max(int(r.metrics.get("final/step", 0)) for r in g.runs),
                     "tokens_per_s": float(np.mean([r.metrics.get("final/tokens_per_s", 0.0) for r in g.runs]))})
    return sorted(rows, key=lambda r: r["mean"])


def winner_line(rows: list[dict]) -> Optional[str]:
    """The best optimizer against the runner-up: the gap and a Welch t-test over their seeds."""
    ok = [r for r in rows if math.isfinite(r["mean"])]
    if len(ok) < 2:
        return None
    a, b = ok[0], ok[1]
    fa, fb = ([x for x in r["finals"] if math.isfinite(x)] for r in (a, b))
    gap = b["mean"] - a["mean"]
    if min(len(fa), len(fb)) < 2:
        test = "one seed: no t-test"
    else:
        from scipy.stats import ttest_ind
        p = float(ttest_ind(fa, fb, equal_var=False).pvalue)
        test = (f"Welch t-test over seeds p={p:.2g}" if math.isfinite(p) else "Welch t-test: no seed variance") + \
            (" (the seed bands overlap)" if not p < 0.05 else "")
    return (f"winner: {a['optimizer']} {label(a['config'])} val {a['mean']:.3g} ± {a['std']:.2g}, ahead of "
            f"{b['optimizer']} {label(b['config'])} {b['mean']:.3g} ± {b['std']:.2g} by {gap:.3g} "
            f"({100 * gap / b['mean']:.2g} %); {test}")


def print_summary(rows: list[dict], state) -> None:
    """The summary table (rich), the winner line, grid-edge notes and the command that opens the MLflow UI."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{state.run_name}: best config per optimizer (final val loss over seeds)")
    for col in ("optimizer", "best config", "val loss (mean ± std)", "seeds", "steps", "tokens/s", "trials"):
        table.add_column(col)
    for r in rows:
        counts = {s: r["statuses"].count(s) for s in sorted(set(r["statuses"]))}
        loss = f"{r['mean']:.3g} ± {r['std']:.2g}" if math.isfinite(r["mean"]) else "all diverged/failed"
        table.add_row(r["optimizer"], label(r["config"]), loss, str(r["n"]), str(r["steps"]),
                      f"{r['tokens_per_s']:,.0f}", " ".join(f"{k}:{v}" for k, v in counts.items()))
    console = Console(width=max(120, Console().width))
    console.print(table)
    every = [s for r in rows for s in r["statuses"]]
    print(f"{len(every)} trials: " + ", ".join(f"{every.count(s)} {s}" for s in sorted(set(every))))
    for line in [winner_line(rows)] + [f"note: {n}" for r in rows for n in r["edges"]]:
        if line:
            print(line)
    print(f"MLflow: {state.uri}  experiment {state.experiment!r}, parent run {state.parent_run_id}")
    last = tracking.remember_sweep(state.uri, state.parent_run_id)
    remote = state.uri.startswith(("http://", "https://"))
    link = tracking.runs_link(state.uri if remote else f"http://127.0.0.1:{tracking.UI_PORT}", last["experiment_id"])
    print(f"open the UI with:  {tracking.ui_command(state.uri)}   then  {link}")

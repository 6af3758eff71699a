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


def summarize(uri: str, parent_run_id: str, spec: SweepSpec) -> list[dict]:
    """Per optimizer, its best config: final val loss mean ± std over seeds, steps, tokens/s, statuses."""
    runs = [tracking.RunRecord.of(r) for r in tracking.sweep_children(uri, parent_run_id)]
    rows = []
    for g in tracking.best_per_series(groups(runs, spec)).values():
        mean, std, _ = g.final_stats()
        rows.append({"optimizer": g.series, "config": g.values, "n": len(g.runs),
                     "statuses": [r.status for r in g.runs], "mean": mean, "std": std if math.isfinite(std) else 0.0,
                     "steps": max(int(r.metrics.get("final/step", 0)) for r in g.runs),
                     "tokens_per_s": float(np.mean([r.metrics.get("final/tokens_per_s", 0.0) for r in g.runs]))})
    return sorted(rows, key=lambda r: r["mean"])


def print_summary(rows: list[dict], state) -> None:
    """The summary table (rich) and the command that opens the MLflow UI on this store."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{state.run_name}: best config per optimizer (final val loss over seeds)")
    for col in ("optimizer", "best config", "val loss (mean ± std)", "seeds", "steps", "tokens/s", "trials"):
        table.add_column(col)
    for r in rows:
        cfg = " ".join(param_label(k, v) for k, v in r["config"].items()) or "-"
        counts = {s: r["statuses"].count(s) for s in sorted(set(r["statuses"]))}
        loss = f"{r['mean']:.4f} ± {r['std']:.4f}" if math.isfinite(r["mean"]) else "all diverged/failed"
        table.add_row(r["optimizer"], cfg, loss, str(r["n"]), str(r["steps"]),
                      f"{r['tokens_per_s']:,.0f}", " ".join(f"{k}:{v}" for k, v in counts.items()))
    console = Console(width=max(120, Console().width))
    console.print(table)
    print(f"MLflow: {state.uri}  experiment {state.experiment!r}, parent run {state.parent_run_id}")
    print(f"open the UI with:  {tracking.ui_command(state.uri)}")

"""The runs a report reads from MLflow (through ``rayexp.tracking``), grouped into configs and series,
and their Hessian results.

Runs are grouped into *configs* (equal params except the seed) and configs into *series* (equal
categorical params: optimizer, rotation, granularity, model kind...; numeric params such as
``optimizer.lr`` are what a series is tuned over).
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from mlflow.tracking import MlflowClient

from rayexp import tracking
from rayexp.config import ConfigError
from rayexp.spaces import param_label
from rayexp.tracking import RunGroup, RunRecord, best_per_series

SKIP_PARAMS = ("seed", "name", "output_dir", "data.cache_dir", "tracking.uri", "tracking.experiment")
SKIP_PREFIXES = ("sweep.",)
HISTORY_KEYS = ("train_loss", "val_loss")
HISTORY_PREFIXES = ("mada/", "curv/lambda_max", "curv/precond_sharpness", "lr")


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
    when the experiment has no sweep run, all its trial runs; with their loss (and mada/*) histories."""
    uri = tracking.resolve_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"experiment {experiment!r} not found in {uri}; experiments there: {', '.join(names) or 'none'}")
    eid = exp.experiment_id
    if parent is None:
        parent_run = tracking.latest_sweep_run(client, eid)
    else:
        try:
            parent_run = client.get_run(parent)
        except Exception:
            raise ConfigError(f"--parent {parent}: no such run in {uri}") from None
    found = tracking.child_runs(client, eid, parent_run.info.run_id if parent_run else None)
    runs = [RunRecord.of(r) for r in found]
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
class Config(RunGroup):
    """Runs with equal params except the seed; ``series_params`` name the params that tell series apart."""
    series_params: tuple = ()

    @property
    def label(self) -> str:
        """The varied values that are not part of the series name (e.g. ``lr=0.003``)."""
        return " ".join(param_label(k, v) for k, v in self.values.items() if k not in self.series_params) or "-"

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
            configs[key] = Config(series=ser or "runs", values=values, series_params=tuple(series))
        configs[key].runs.append(r)
    return list(configs.values())


def _applies(param: str, params: dict) -> bool:
    """False for an optimizer option the run's optimizer does not read (e.g. granularity under sgd)."""
    from rayexp.optim.registry import OPTIMIZERS  # torch: only when there are optimizer params to check

    family = OPTIMIZERS.get(params.get("optimizer.name", ""))
    if family is None or not param.startswith("optimizer.") or param == "optimizer.name":
        return True
    sub = param[len("optimizer."):]
    return any(sub == o or sub.startswith(o + ".") for o in family.options)


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

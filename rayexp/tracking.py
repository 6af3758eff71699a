"""MLflow conventions: where runs go, how they are named and found again.

- Store: ``tracking.uri`` or, when unset, ``sqlite:///<cwd>/mlflow.db`` (no server needed).
- A sweep is one *parent* run (tag ``rayexp.sweep_key``); each trial × seed is a *child* run
  (tag ``rayexp.trial_key``, ``mlflow.parentRunId``). Runs are found by these tags before being
  created, so a resumed sweep or a retried trial never duplicates a run.
- Params: the resolved Experiment flattened to dotted names (``optimizer.lr``). Metrics: per step.
  Artifacts: ``config.yaml``, the final ``checkpoint/``, Hessian results under ``hessian/``.
- Tags: ``rayexp.optimizer``, ``rayexp.seed``, ``rayexp.git_commit``, ``rayexp.status``
  (finished | stopped | diverged | failed).
"""
from __future__ import annotations

import math
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from rayexp.config import Experiment

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000


def resolve_uri(uri: Optional[str] = None) -> str:
    """The tracking URI to use: ``uri`` or the local store ``sqlite:///<cwd>/mlflow.db``."""
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on the store at ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --port 5000"


def git_commit() -> str:
    """The rayexp checkout's commit, or 'unknown' outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; lists stay one value."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, name + "."))
        else:
            out[name] = str(v)[:MAX_PARAM_LEN]
    return out


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of the MLflow experiment ``name``, created if missing (safe against concurrent creators)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another process created it between our lookup and create
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def find_run(client: MlflowClient, exp_id: str, tag: str, value: str):
    """The run in ``exp_id`` whose tag ``tag`` equals ``value`` (oldest first), or None."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{tag}` = '{value}'", order_by=["start_time ASC"],
                              max_results=1)
    return runs[0] if runs else None


def sweep_parent_run(uri: str, experiment: str, sweep_key: str, params: dict | None = None,
                     run_name: str | None = None) -> str:
    """Find or create the parent run of a sweep; returns its run id."""
    client = MlflowClient(uri)
    exp_id = experiment_id(client, experiment)
    run = find_run(client, exp_id, "rayexp.sweep_key", sweep_key)
    if run is not None:
        return run.info.run_id
    run = client.create_run(exp_id, run_name=run_name or experiment,
                            tags={"rayexp.sweep_key": sweep_key, "rayexp.kind": "sweep",
                                  "rayexp.git_commit": git_commit()})
    if params:
        _log_params(client, run.info.run_id, flatten(params))
    return run.info.run_id


def set_run_status(uri: str, run_id: str, status: str) -> None:
    """MLflow run status: RUNNING while a sweep runs (again after a resume), then FINISHED, FAILED (a trial
    raised) or KILLED (interrupted)."""
    client = MlflowClient(uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i:i + 90])


class MlflowReporter:
    """Reporter for ``run_training`` that writes one MLflow run per trial.

    Re-created with the same ``trial_key`` (a resumed or retried trial), it reopens the same run and
    skips metrics of steps already logged, so histories never hold duplicates.
    """

    def __init__(self, uri: Optional[str], experiment: str, exp: Experiment, trial_key: str,
                 parent_run_id: Optional[str] = None, tags: Optional[dict] = None, run_name: Optional[str] = None):
        self.uri = resolve_uri(uri)
        self.client = MlflowClient(self.uri)
        exp_id = experiment_id(self.client, experiment)
        run = find_run(self.client, exp_id, "rayexp.trial_key", trial_key)
        self.last_step = -1
        if run is None:
            run_tags = {"rayexp.trial_key": trial_key, "rayexp.optimizer": exp.optimizer.name,
                        "rayexp.seed": str(exp.seed), "rayexp.git_commit": git_commit(), "rayexp.kind": "trial",
                        "rayexp.status": "running", **(tags or {})}
            if parent_run_id:
                run_tags[PARENT_TAG] = parent_run_id
            run = self.client.create_run(exp_id, run_name=run_name or f"{exp.optimizer.name}-s{exp.seed}",
                                         tags=run_tags)
            self.run_id = run.info.run_id
            _log_params(self.client, self.run_id, flatten(exp.to_dict()))
            self.client.log_text(self.run_id, exp.to_yaml(), "config.yaml")
        else:
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "rayexp.status", "running")
            steps = [m.step for m in self.client.get_metric_history(self.run_id, "train_loss")]
            steps += [m.step for m in self.client.get_metric_history(self.run_id, "val_loss")]
            self.last_step = max(steps, default=-1)

    def report(self, step: int, metrics: dict, checkpoint_dir: Optional[str] = None) -> bool:
        """Log ``metrics`` at ``step`` (skipped when this run already holds that step)."""
        if step <= self.last_step:
            return False
        self.log_metrics(metrics, step)
        self.last_step = step
        return False

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log numeric ``metrics`` at ``step``; non-finite values are logged as NaN."""
        items = [Metric(k, float(v) if math.isfinite(float(v)) else float("nan"), _now_ms(), step)
                 for k, v in metrics.items() if isinstance(v, (int, float))]
        for i in range(0, len(items), 900):
            self.client.log_batch(self.run_id, metrics=items[i:i + 900])

    def finish(self, status: str, summary: Optional[dict] = None) -> None:
        """Close the run with ``rayexp.status = status`` and ``final/*`` summary metrics."""
        if summary:
            self.log_metrics({f"final/{k}": v for k, v in summary.items()}, step=max(self.last_step, 0))
        self.client.set_tag(self.run_id, "rayexp.status", status)
        self.client.set_terminated(self.run_id, "FAILED" if status == "failed" else "FINISHED")


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_checkpoint(run_id: str, checkpoint_dir: str, uri: Optional[str] = None) -> None:
    """Store a checkpoint directory as the run's ``checkpoint/`` artifact."""
    MlflowClient(resolve_uri(uri)).log_artifacts(run_id, checkpoint_dir, "checkpoint")


def checkpoint_from_run(run_id: str, uri: Optional[str] = None) -> str:
    """Download the run's ``checkpoint/`` artifact; returns the local directory."""
    client = MlflowClient(resolve_uri(uri))
    dst = tempfile.mkdtemp(prefix=f"rayexp-ckpt-{run_id[:8]}-")
    return client.download_artifacts(run_id, "checkpoint", dst)


def log_hessian_results(run_id: str, uri: Optional[str], metrics: dict, files: Iterable[str] = ()) -> None:
    """Log Hessian scalars as ``hessian/<name>`` metrics and ``files`` under the ``hessian/`` artifacts."""
    client = MlflowClient(resolve_uri(uri))
    items = [Metric(f"hessian/{k}", float(v), _now_ms(), 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(float(v))]
    for i in range(0, len(items), 900):
        client.log_batch(run_id, metrics=items[i:i + 900])
    for f in files:
        client.log_artifact(run_id, str(f), "hessian")


def runs_of(uri: Optional[str], experiment: str, kind: str = "trial") -> list:
    """All runs of ``experiment`` with tag ``rayexp.kind == kind`` (trial or sweep)."""
    client = MlflowClient(resolve_uri(uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], filter_string=f"tags.`rayexp.kind` = '{kind}'",
                              max_results=5000)

"""MLflow conventions: where runs go, how they are tagged, found again and summarized.

- Store: ``tracking.uri`` or, when unset, ``sqlite:///<cwd>/mlflow.db`` (no server needed).
- A sweep is one *parent* run (tag SWEEP_KEY_TAG); each trial × seed is a *child* run (TRIAL_KEY_TAG,
  PARENT_TAG). Runs are found by these tags before being created, so a resumed sweep or a retried
  trial never duplicates a run.
- Params: the resolved Experiment flattened to dotted names (``optimizer.lr``). Metrics: per step.
  Artifacts: ``config.yaml``, the final ``checkpoint/``, Hessian results under ``hessian/``.
- Tags: the ``*_TAG`` constants below, the only place they are spelled; STATUS_TAG takes a value of
  STATUSES.
- The best config of a series (``best_per_series``) is what the sweep summary and the report show.
"""
from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass, field
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from rayexp.config import ConfigError, Experiment

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests child runs under their parent
KIND_TAG = "rayexp.kind"  # "sweep" (parent run) | "trial" (child run)
SWEEP_KEY_TAG = "rayexp.sweep_key"  # one sweep instance; on the parent run and on its children
TRIAL_KEY_TAG = "rayexp.trial_key"  # one config × seed of one sweep instance
STATUS_TAG = "rayexp.status"  # a value of STATUSES
OPTIMIZER_TAG = "rayexp.optimizer"
SEED_TAG = "rayexp.seed"
GIT_TAG = "rayexp.git_commit"
NODE_TAG = "rayexp.node_id"  # the Ray node a trial ran on
RESUMED_TAG = "rayexp.resumed_from_step"  # the checkpoint step a restarted trial continued from
STATUSES = ("running", "finished", "stopped", "diverged", "failed", "killed")  # killed: interrupted, resumable
MAX_PARAM_LEN = 6000
UI_PORT = 5000  # where ``rayexp ui`` serves the local store by default
MLFLOW_AUTH_CODES = (401, 403)  # an MLflow server behind basic auth answers /health with these


def resolve_uri(uri: Optional[str] = None) -> str:
    """The tracking URI to use: ``uri`` or the local store ``sqlite:///<cwd>/mlflow.db``."""
    if uri:
        return uri
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_uri(uri: str, timeout: float = 5.0) -> None:
    """Raise ConfigError unless the store at ``uri`` can be used: an http(s) server answers MLflow's
    ``/health`` within ``timeout`` seconds with 200 (or 401/403: behind basic auth), a sqlite file's folder is
    writable."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
        except urllib.error.HTTPError as e:
            if e.code not in MLFLOW_AUTH_CODES:
                raise ConfigError(f"tracking.uri={uri}: the server there answers /health with HTTP {e.code}, so it "
                                  f"is not an MLflow tracking server; check the host and port") from None
        except (OSError, ValueError) as e:
            why = getattr(e, "reason", None) or e
            raise ConfigError(f"tracking.uri={uri}: no MLflow server answers within {timeout:g} s ({why}); "
                              f"start one, or leave tracking.uri unset for the local store ./mlflow.db") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).expanduser().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"tracking.uri={uri}: folder {str(folder)!r} does not exist or is not writable")


def ui_command(uri: str) -> str:
    """The shell command that opens the MLflow UI on the store at ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    from rayexp.cli import shell_command

    return shell_command("ui") + ("" if uri == last_sweep().get("uri") else f" --uri {uri}")


def runs_link(server: str, experiment_id: str) -> str:
    """The UI's Training runs view of an experiment (MLflow 3 would land on a GenAI overview)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"


def _last_sweep_file() -> Path:
    home = os.environ.get("RAYEXP_HOME") or Path.home() / ".cache" / "rayexp"
    return Path(home) / "last_sweep.json"


def remember_sweep(uri: str, parent_run_id: str) -> dict:
    """Record the store and experiment of the sweep just run (what ``rayexp ui`` opens); returns the record."""
    import json

    record = {"uri": uri, "experiment_id": MlflowClient(uri).get_run(parent_run_id).info.experiment_id,
              "parent_run_id": parent_run_id}
    try:
        _last_sweep_file().parent.mkdir(parents=True, exist_ok=True)
        _last_sweep_file().write_text(json.dumps(record))
    except OSError:
        pass  # a read-only home: `rayexp ui --uri` still works
    return record


def last_sweep() -> dict:
    """The record ``remember_sweep`` wrote last ({} when none)."""
    import json

    try:
        return json.loads(_last_sweep_file().read_text())
    except (OSError, ValueError):
        return {}


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
    run = find_run(client, exp_id, SWEEP_KEY_TAG, sweep_key)
    if run is not None:
        return run.info.run_id
    run = client.create_run(exp_id, run_name=run_name or experiment,
                            tags={SWEEP_KEY_TAG: sweep_key, KIND_TAG: "sweep", GIT_TAG: git_commit()})
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


def kill_running_children(uri: str, parent_run_id: str) -> int:
    """Mark the sweep's child runs still RUNNING as KILLED (STATUS_TAG killed); returns how many."""
    client = MlflowClient(uri)
    n = 0
    for run in sweep_children(uri, parent_run_id):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, STATUS_TAG, "killed")
            client.set_terminated(run.info.run_id, "KILLED")
            n += 1
    return n


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
        run = find_run(self.client, exp_id, TRIAL_KEY_TAG, trial_key)
        self.last_step = -1
        if run is None:
            run_tags = {TRIAL_KEY_TAG: trial_key, OPTIMIZER_TAG: exp.optimizer.name, SEED_TAG: str(exp.seed),
                        GIT_TAG: git_commit(), KIND_TAG: "trial", STATUS_TAG: "running", **(tags or {})}
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
            self.client.set_tag(self.run_id, STATUS_TAG, "running")
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

    def set_tags(self, tags: dict) -> None:
        """Set string tags on the run (e.g. NODE_TAG, RESUMED_TAG)."""
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def finish(self, status: str, summary: Optional[dict] = None) -> None:
        """Close the run with STATUS_TAG ``status`` and ``final/*`` summary metrics."""
        if summary:
            self.log_metrics({f"final/{k}": v for k, v in summary.items()}, step=max(self.last_step, 0))
        self.client.set_tag(self.run_id, STATUS_TAG, status)
        self.client.set_terminated(self.run_id, "FAILED" if status == "failed" else "FINISHED")


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_checkpoint(run_id: str, checkpoint_dir: str, uri: Optional[str] = None) -> None:
    """Store a checkpoint directory as the run's ``checkpoint/`` artifact."""
    MlflowClient(resolve_uri(uri)).log_artifacts(run_id, checkpoint_dir, "checkpoint")


def checkpoint_from_run(run_id: str, uri: Optional[str] = None) -> tuple[str, str]:
    """Download the run's ``checkpoint/`` artifact; returns the local directory and the run's name."""
    client = MlflowClient(resolve_uri(uri))
    dst = tempfile.mkdtemp(prefix=f"rayexp-ckpt-{run_id[:8]}-")
    return client.download_artifacts(run_id, "checkpoint", dst), client.get_run(run_id).info.run_name or run_id


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
    """All runs of ``experiment`` with KIND_TAG ``kind`` (trial or sweep)."""
    client = MlflowClient(resolve_uri(uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], filter_string=f"tags.`{KIND_TAG}` = '{kind}'",
                              max_results=5000)


def latest_sweep_run(client: MlflowClient, exp_id: str):
    """The most recently started sweep (parent) run of an experiment with a finished trial (else the most
    recent sweep run), or None."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep'", order_by=["start_time DESC"],
                              max_results=200)
    for run in runs:
        done = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{run.info.run_id}' and "
                                                          f"tags.`{STATUS_TAG}` = 'finished'", max_results=1)
        if done:
            return run
    return runs[0] if runs else None


def child_runs(client: MlflowClient, exp_id: str, parent_run_id: Optional[str]) -> list:
    """The child runs of a sweep, oldest first (``parent_run_id`` None: every trial run of the experiment)."""
    flt = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else f"tags.`{KIND_TAG}` = 'trial'"
    return client.search_runs([exp_id], filter_string=flt, order_by=["start_time ASC"], max_results=10000)


def sweep_children(uri: str, parent_run_id: str) -> list:
    """The child runs of the sweep whose parent run is ``parent_run_id``, oldest first."""
    client = MlflowClient(resolve_uri(uri))
    return child_runs(client, client.get_run(parent_run_id).info.experiment_id, parent_run_id)


# ----------------------------------------------------------------------------------------------------
# the best config of a series: the sweep summary and the report both show it


def final_val_loss(tags: dict, metrics: dict) -> float:
    """A run's final val loss: ``final/val_loss`` (else its last ``val_loss``); +inf when it diverged or
    failed or the value is not finite."""
    if tags.get(STATUS_TAG) in ("diverged", "failed"):
        return math.inf
    v = metrics.get("final/val_loss", metrics.get("val_loss", math.nan))
    return float(v) if math.isfinite(v) else math.inf


def seed_stats(finals) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1, n) of the finite values among ``finals`` (inf mean when none)."""
    f = np.asarray(list(finals), dtype=float)
    ok = f[np.isfinite(f)]
    if not len(ok):
        return math.inf, math.nan, 0
    return float(ok.mean()), float(ok.std(ddof=1)) if len(ok) > 1 else 0.0, len(ok)


@dataclass
class RunRecord:
    """One child run: identity, params, tags, latest metrics and any loaded metric histories."""
    run_id: str
    name: str
    params: dict
    tags: dict
    metrics: dict
    histories: dict = field(default_factory=dict)  # key -> (steps, values), sorted by step

    @classmethod
    def of(cls, run) -> "RunRecord":
        """The record of an MLflow ``Run``."""
        return cls(run.info.run_id, run.info.run_name or run.info.run_id[:8], dict(run.data.params),
                   dict(run.data.tags), dict(run.data.metrics))

    @property
    def status(self) -> str:
        return self.tags.get(STATUS_TAG, "unknown")

    @property
    def seed(self) -> str:
        return self.tags.get(SEED_TAG, self.params.get("seed", "?"))

    def final_val_loss(self) -> float:
        return final_val_loss(self.tags, self.metrics)


@dataclass
class RunGroup:
    """Runs with equal settings but for the seed. ``series`` names the line it belongs to (e.g. the
    optimizer), ``values`` the settings that tell it apart; each run has ``tags`` and ``metrics`` dicts."""
    series: str
    values: dict
    runs: list = field(default_factory=list)

    def finals(self) -> np.ndarray:
        return np.array([final_val_loss(r.tags, r.metrics) for r in self.runs])

    def final_stats(self) -> tuple[float, float, int]:
        """(mean, sample std, n) of the finite final val losses over seeds."""
        return seed_stats(self.finals())


def best_per_series(groups) -> dict:
    """For each series, the group with the lowest mean final val loss (series in order of first appearance)."""
    best: dict = {}
    for g in groups:
        if g.series not in best or g.final_stats()[0] < best[g.series].final_stats()[0]:
            best[g.series] = g
    return best

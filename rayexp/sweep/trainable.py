"""The worker side of a sweep: the Tune trainable (Ray's "worker function"; the driver is ``tune.py``).

It runs the ``Trial``s a Tune trial carries (one for grid/random, every seed for optuna) in turn through
``rayexp.train.launch.run_trial``, and after a finished run analyzes its final checkpoint when the
``hessian`` section asks for it. Imports no MLflow: the driver's callback is the only writer.
"""
from __future__ import annotations

from typing import Optional

from ray import tune

from rayexp.config import Experiment
from rayexp.train.launch import run_trial


def run_trials(config: dict, storage: str, max_failures: int, seed_mean_metric: Optional[str] = None) -> None:
    """Tune trainable: the trials of ``config["trials"]`` in turn; with ``seed_mean_metric`` (optuna) it
    then reports their mean final val loss under that name (a diverged seed counts +inf)."""
    trials = config["trials"]
    steps = trials[0].exp.train.steps
    finals = [run_trial(t.key, t.exp, storage, max_failures, offset=i * steps, after_training=hessian_after_training,
                        monitors=curvature_monitors(t.exp)) for i, t in enumerate(trials)]
    if seed_mean_metric:
        tune.report({seed_mean_metric: sum(finals) / len(finals), "seed_mean": 1.0, "progress": len(trials) * steps})


def curvature_monitors(exp: Experiment) -> list:
    """``hessian.every > 0``: a ``rayexp.hessian.monitor.CurvatureMonitor`` for the run (``curv/*`` metrics)."""
    if not exp.hessian.every:
        return []
    from rayexp.hessian.monitor import CurvatureMonitor
    return [CurvatureMonitor(exp)]


def hessian_after_training(exp: Experiment, res, identity: dict) -> None:
    """Curvature of a finished run's final checkpoint (``hessian.after_training``); metrics and files go
    back to Tune as one more row (``hessian: 1``) with the checkpoint, files under ``<checkpoint>/hessian``."""
    if not (exp.hessian.after_training and res.status == "finished" and res.checkpoint_dir):
        return
    from rayexp.hessian import analyze_checkpoint
    results, _ = analyze_checkpoint(res.checkpoint_dir, progress=False)
    tune.report({**{f"hessian/{k}": v for k, v in results["metrics"].items()}, **identity,
                 "step": res.step, "progress": res.step, "steps_total": exp.train.steps, "hessian": 1.0,
                 "val_loss": res.val_loss}, checkpoint=tune.Checkpoint.from_directory(res.checkpoint_dir))

"""The driver's view of a running sweep: its typed state, and the Tune callback that prints progress
and writes MLflow (the driver is the only MLflow writer, so a local sqlite store has one writer).

Each Tune trial carries its ``Trial`` objects in ``config["trials"]`` (``rayexp.sweep.plan``); a result row
names its trial by ``trial_key``, so the callback needs no search-algorithm-specific decoding.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional

from ray import tune

from rayexp import tracking
from rayexp.sweep.plan import Trial
from rayexp.sweep.state import STATE_FILE, SweepState  # noqa: F401  (re-exported)

LOGGED = {"train_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "diverged"}
LOGGED_PREFIXES = ("grad_norm/", "mada/", "optim/", "hessian/", "curv/")


@dataclass
class _Open:
    """A child run being written: its trial, its latest result row and the Tune trial running it."""
    trial: Trial
    result: dict
    tune_trial: object


class SweepCallback(tune.Callback):
    """Prints one line per evaluation of a trial and writes its MLflow child run."""

    def __init__(self, state: SweepState, planned: int):
        self.state, self.planned = state, planned  # planned: trial count of a grid/random sweep (0: optuna)
        self.t0 = time.time()
        self._clear()

    def _clear(self) -> None:
        self.names: Optional[set] = None  # run names of the sweep's child runs, read from MLflow on first use
        self.reporters: dict[str, tracking.MlflowReporter] = {}
        self.open: dict[str, _Open] = {}
        self.tagged: dict[str, dict] = {}

    def __getstate__(self):  # Tune pickles callbacks with the experiment; MLflow clients are re-made lazily
        return {"state": self.state, "planned": self.planned, "t0": self.t0}

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._clear()

    def _run_name(self, trial: Trial) -> str:
        """The trial's label, its varied values and seed (``adamw lr=0.003 seed=0``), made unique within the
        sweep with `` #2``, `` #3``... (values that agree to 3 significant digits). Used only for a new run."""
        if self.names is None:
            self.names = {r.info.run_name for r in tracking.sweep_children(self.state.uri, self.state.parent_run_id)}
        base = name = trial.label()
        n = 1
        while name in self.names:
            n += 1
            name = f"{base} #{n}"
        self.names.add(name)
        return name

    def _reporter(self, trial: Trial) -> tracking.MlflowReporter:
        if trial.key not in self.reporters:
            s = self.state
            self.reporters[trial.key] = tracking.MlflowReporter(
                s.uri, s.experiment, trial.exp, trial.key, parent_run_id=s.parent_run_id,
                tags={tracking.SWEEP_KEY_TAG: s.sweep_id}, run_name=self._run_name(trial))
        return self.reporters[trial.key]

    def on_trial_result(self, iteration, trials, trial, result, **info):
        own = _trial_of(trial, result.get("trial_key"))
        if own is None:  # e.g. optuna's seed-mean row
            return
        rep = self._reporter(own)
        self._tag(rep, result)
        metrics = {k: v for k, v in result.items() if k in LOGGED or k.startswith(LOGGED_PREFIXES)}
        if result.get("evaluated"):  # val_loss and, for example data, val_accuracy: logged where fresh
            metrics.update({k: v for k, v in result.items() if k.startswith("val_")})
        if result.get("hessian"):  # curvature after training: the training summary stays as it was
            rep.log_metrics({k: v for k, v in metrics.items() if k.startswith("hessian/")}, int(result["step"]))
            self.open.setdefault(own.key, _Open(own, result, trial))
            return
        rep.report(int(result["step"]), metrics)
        self.open[own.key] = _Open(own, result, trial)
        if result.get("evaluated") or result.get("diverged"):
            self._print(own, result)

    def _tag(self, rep: tracking.MlflowReporter, result: dict) -> None:
        """Where the trial runs, and the checkpoint step it resumed from after a failure or resume."""
        tags = {tracking.NODE_TAG: result.get("node_id")}
        if result.get("resumed_from"):
            tags[tracking.RESUMED_TAG] = int(result["resumed_from"])
        tags = {k: str(v) for k, v in tags.items() if v is not None}
        if self.tagged.get(rep.run_id) != tags:
            rep.set_tags(tags)
            self.tagged[rep.run_id] = tags

    def _print(self, trial: Trial, r: dict) -> None:
        head = f"[{trial.index + 1:>3}/{self.planned}] {trial.label()}" if trial.index is not None \
            else f"[{trial.key[:6]}] seed={trial.seed}"
        parts = [f"{head:<44}", f"step {int(r['step']):>5}/{int(r['steps_total'])}"]
        if "train_loss" in r and math.isfinite(r["train_loss"]):
            parts.append(f"train {r['train_loss']:.3f}")
        if "val_loss" in r:
            parts.append(f"val {r['val_loss']:.3f}")
        if r.get("diverged"):
            parts.append("DIVERGED")
        if r.get("tokens_per_s"):
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        parts.append(f"{time.time() - self.t0:5.0f}s")
        print(" | ".join(parts), flush=True)

    def _close(self, tune_trial, failed: bool) -> None:
        """Finish the MLflow runs of a Tune trial that completed or raised."""
        last = tune_trial.config["trials"][-1].key  # the trial whose checkpoint Tune holds last
        for key, o in [(k, o) for k, o in self.open.items() if o.tune_trial is tune_trial]:
            status = _status(o.result, failed)
            rep = self.reporters[key]
            r = o.result
            rep.finish(status, {"val_loss": r.get("val_loss", float("nan")),
                                "train_loss": r.get("train_loss", float("nan")),
                                "step": r["step"], "tokens_per_s": r.get("tokens_per_s", 0.0)})
            error_file = getattr(tune_trial, "error_file", None) if failed else None
            if error_file and os.path.isfile(error_file):  # the traceback, next to the run's metrics
                rep.log_artifact(error_file)
            if r.get("config_error"):  # bad input inside the trial: the message is the whole story
                rep.log_text(r["config_error"] + "\n", "error.txt")
            ckpt = tune_trial.checkpoint
            if status != "failed" and key == last and ckpt is not None and ckpt.filesystem.type_name == "local":
                tracking.log_checkpoint(rep.run_id, ckpt.path, self.state.uri)
            if status != "finished":
                where = f" (error log: {error_file})" if error_file else ""
                where = f": {r['config_error']}" if r.get("config_error") else where
                print(f"[{key[:6]}] {o.trial.label() if o.trial.index is not None else ''} -> {status}{where}",
                      flush=True)
            del self.open[key]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        own = trial.config.get("trials") or []
        if own and not any(o.tune_trial is trial for o in self.open.values()):
            first = own[0]  # raised before its first report: record it too
            self._reporter(first)
            self.open[first.key] = _Open(first, {"step": 0, "steps_total": first.exp.train.steps}, trial)
        self._close(trial, failed=True)


def _trial_of(tune_trial, key: Optional[str]) -> Optional[Trial]:
    return next((t for t in tune_trial.config.get("trials", ()) if t.key == key), None) if key else None


def _status(result: dict, failed: bool) -> str:
    """STATUS_TAG value of a closed run from its last result row."""
    if failed or result.get("config_error"):
        return "failed"
    if result.get("diverged"):
        return "diverged"
    return "finished" if int(result["step"]) >= int(result["steps_total"]) else "stopped"

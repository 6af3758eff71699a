"""The sweep on Ray Tune, driver side: search algorithms, the Tuner, and ``run_sweep``.

Every Tune trial has one shape, ``config["trials"]``: a list of concrete ``Trial``s (``rayexp.sweep.plan``)
that the trainable (``rayexp.sweep.trainable.run_trials``, the worker side) runs in turn. ``grid`` and
``random`` plan their trials up front: ``Tuner(param_space={"trials": grid_search([[t] for t in trials])})``,
one config × one seed per Tune trial. ``optuna`` samples define-by-run (TPE): ``OptunaSpace`` resolves each
suggestion to one Trial per seed on the driver; the Tune trial runs them in turn and reports their mean.
Scheduler: none, or ASHA on the ``progress`` axis (steps, summed over the seeds of an optuna trial).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ray
from ray import tune

from rayexp import tracking
from rayexp.hessian.distributed import ensure_ray
from rayexp.spaces import SweepSpec
from rayexp.sweep.callback import SweepCallback, SweepState
from rayexp.sweep.plan import Trial, plan, trials_of
from rayexp.sweep.summary import print_summary, summarize
from rayexp.sweep.trainable import run_trials


# ----------------------------------------------------------------------------------------------------
# search


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


class OptunaSpace:
    """Define-by-run search space for OptunaSearch: the optimizer first, then only its active spaces.

    Returns ``{"trials": [...]}``: the suggestion resolved once, one Trial per seed. Optuna's categorical
    choices must be scalars, so a grid/choice of lists or mappings (``betas``, ``mada.hyper_lr``) is
    suggested as an index into its candidates. Picklable: Tune checkpoints the searcher with it.
    """

    def __init__(self, spec: SweepSpec, sweep_id: str):
        self.spec, self.sweep_id = spec, sweep_id

    def __call__(self, trial) -> dict:
        name_sp = self.spec.spaces.get("optimizer.name")
        opt = trial.suggest_categorical("optimizer.name", name_sp.candidates()) if name_sp \
            else self.spec.optimizer_names()[0]
        assignment = {"optimizer.name": opt} if name_sp else {}
        for path, sp in self.spec.active_spaces(opt).items():
            if path != "optimizer.name":
                assignment[path] = self._suggest(trial, path, sp)
        return {"trials": trials_of(self.spec, self.sweep_id, assignment)}

    @staticmethod
    def _suggest(trial, path: str, sp):
        lo, hi = (sp.args + [None])[:2]
        if sp.kind in ("grid", "choice"):
            if all(_scalar(v) for v in sp.args):
                return trial.suggest_categorical(path, sp.args)
            return sp.args[trial.suggest_categorical(path, list(range(len(sp.args))))]
        if sp.kind == "uniform":
            return trial.suggest_float(path, lo, hi)
        if sp.kind == "loguniform":
            return trial.suggest_float(path, lo, hi, log=True)
        return trial.suggest_int(path, lo, hi - 1)


def _scheduler(spec: SweepSpec):
    s = spec.search
    if s.scheduler in (None, "none") or s.scheduler.asha is None:
        return None
    a = s.scheduler.asha
    max_t = a.max_t or spec.base.train.steps * (len(spec.seeds) if s.algorithm == "optuna" else 1)
    return tune.schedulers.ASHAScheduler(time_attr="progress", grace_period=a.grace_period,
                                         reduction_factor=a.reduction_factor, max_t=max_t)


def _per_trial(spec: SweepSpec) -> dict:
    """Resources of one Tune trial. One that only drives a TorchTrainer, whose workers hold the CPUs/GPUs,
    reserves no CPU (a bundle needs one non-zero resource: a little memory), so 2 workers fit on 2 cores."""
    res = spec.base.resources
    if res.workers > 1 or res.strategy == "deepspeed":
        return {"cpu": 0, "gpu": 0, "memory": 64 * 2**20}
    return {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker}


def _dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def tuner(spec: SweepSpec, state: SweepState, trials: list[Trial], restore: bool) -> tune.Tuner:
    """The Tuner of a sweep (restored from its storage when ``restore``); ``trials`` as planned (grid/random)."""
    s = spec.search
    optuna = s.algorithm == "optuna"
    trainable = tune.with_resources(
        tune.with_parameters(run_trials, storage=state.storage, max_failures=s.max_failures,
                             seed_mean_metric=s.metric if optuna else None), _per_trial(spec))
    param_space = {} if optuna else {"trials": tune.grid_search([[t] for t in trials])}
    if restore:
        return tune.Tuner.restore(str(Path(state.storage) / state.run_name), trainable=trainable,
                                  resume_unfinished=True, restart_errored=True, param_space=param_space)
    search = {}
    if optuna:
        from ray.tune.search.optuna import OptunaSearch
        search = {"search_alg": OptunaSearch(space=OptunaSpace(spec, state.sweep_id), metric=s.metric, mode=s.mode,
                                             seed=s.seed), "num_samples": s.num_samples}
    tune_config = tune.TuneConfig(scheduler=_scheduler(spec), metric=s.metric, mode=s.mode, reuse_actors=True,
                                  max_concurrent_trials=s.max_concurrent, trial_dirname_creator=_dirname, **search)
    run_config = tune.RunConfig(name=state.run_name, storage_path=state.storage, verbose=0,
                                callbacks=[SweepCallback(state, len(trials))],
                                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


# ----------------------------------------------------------------------------------------------------
# driver


@dataclass
class SweepResult:
    state: SweepState
    summary: list  # rows of rayexp.sweep.summary.summarize
    errors: int  # trials that failed (diverged trials are results, not errors)
    interrupted: bool = False  # SIGINT/SIGTERM: the parent run and unfinished child runs are KILLED


def new_state(spec: SweepSpec) -> SweepState:
    """A new sweep instance: its names, its MLflow parent run (RUNNING) and its state file."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name = f"{spec.name}-{stamp}"
    uri = tracking.resolve_uri(spec.base.tracking.uri)
    experiment = spec.base.tracking.experiment or spec.name
    sweep_id = f"{run_name}-{os.getpid()}"
    parent = tracking.sweep_parent_run(uri, experiment, sweep_id, {"sweep": spec.raw}, run_name=run_name)
    state = SweepState(run_name, sweep_id, spec.raw, spec.source, str(Path(spec.base.output_dir) / "ray_results"),
                       uri, experiment, parent)
    state.save()
    return state


def init_ray() -> None:
    """Join ``RAY_ADDRESS`` or start a local Ray (``rayexp.hessian.distributed.ensure_ray``: its processes in
    their own process group, token authentication on without its warning); trial output goes to Ray's logs."""
    ensure_ray(logging.WARNING)


def resume_command(state: SweepState) -> str:
    out_root = Path(state.storage).parent
    from rayexp.cli import shell_command

    return (f"{shell_command('sweep')} --resume {state.run_name}"
            + (f" output_dir={out_root}" if out_root != Path("out").resolve() else ""))


class _NoRestoreHint(logging.Filter):
    """Drops Tune's own ``Tuner.restore(...)`` hint and its lists of unfinished trials: ``--resume`` is ours."""
    LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")
    DROPPED = ("Tuner.restore", "Trials did not complete", "Failed to fetch metrics")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(d in msg for d in self.DROPPED)

    @classmethod
    def install(cls) -> None:
        """Before ``Tuner.restore``, whose analysis of the saved trials logs "Failed to fetch metrics"."""
        for name in cls.LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in logger.filters):
                logger.addFilter(cls())


class _Stop:
    """SIGINT and SIGTERM handler during ``fit``: the first signal asks Tune to end the run after saving its
    state (Tune's SIGUSR1 handler), a second one, or one before Tune is listening, raises KeyboardInterrupt."""

    def __init__(self):
        self.signalled = False

    def __call__(self, signum, frame) -> None:
        tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        first, self.signalled = not self.signalled, True
        if not (first and tune_listens):
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGUSR1)


def _fit(t: tune.Tuner) -> tuple[Optional[tune.ResultGrid], bool]:
    """``t.fit()`` and whether a signal interrupted it (no result when it stopped before Tune's loop)."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours asks Tune to stop, and knows that it did
    stop = _Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return t.fit(), stop.signalled
    except KeyboardInterrupt:
        return None, True
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _interrupted(state: SweepState) -> None:
    tracking.set_run_status(state.uri, state.parent_run_id, "KILLED")
    n = tracking.kill_running_children(state.uri, state.parent_run_id)
    print(f"interrupted: parent run and {n} unfinished trial run(s) marked KILLED; finish the sweep with:\n"
          f"  {resume_command(state)}", file=sys.stderr, flush=True)


def run_sweep(spec: SweepSpec, state: Optional[SweepState] = None, quiet: bool = False) -> SweepResult:
    """Run a sweep, or resume the one ``state`` describes (its spec is ``SweepSpec(state.raw)``)."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-creation chatter on a new store
    resume = state is not None
    state = state or new_state(spec)
    trials = plan(spec, state.sweep_id)
    optuna = spec.search.algorithm == "optuna"
    total = len(trials) or spec.search.num_samples
    print(f"rayexp.sweep: {state.run_name}: {total} trials ({spec.search.algorithm}"
          f"{', ' + str(len(spec.seeds)) + ' seeds each' if optuna else ''}), "
          f"MLflow {state.uri} experiment {state.experiment!r}", flush=True)
    print(f"  resume after an interruption with: {resume_command(state)}", flush=True)
    if resume:  # a new parent run is created RUNNING; a resumed one was left FAILED or KILLED
        tracking.set_run_status(state.uri, state.parent_run_id, "RUNNING")
    try:
        init_ray()
        _NoRestoreHint.install()
        grid, interrupted = _fit(tuner(spec, state, trials, restore=resume))
    except KeyboardInterrupt:  # before Tune's loop (e.g. while Ray starts)
        grid, interrupted = None, True
    except BaseException:
        tracking.set_run_status(state.uri, state.parent_run_id, "KILLED")
        raise
    if interrupted:
        _interrupted(state)
        return SweepResult(state, [], 0, interrupted=True)
    failed = sum(r.data.tags.get(tracking.STATUS_TAG) == "failed"
                 for r in tracking.sweep_children(state.uri, state.parent_run_id))
    errors = max(grid.num_errors, failed)
    tracking.set_run_status(state.uri, state.parent_run_id, "FAILED" if errors else "FINISHED")
    rows = summarize(state.uri, state.parent_run_id, spec)
    if not quiet:
        print_summary(rows, state)
    return SweepResult(state, rows, errors)

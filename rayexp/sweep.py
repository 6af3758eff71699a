"""``python -m rayexp.sweep [SWEEP.yaml] [key=value ...]``: run a sweep on Ray Tune, tracked in MLflow.

Each sampled configuration runs once per seed (one Tune trial, one MLflow child run under the sweep's
parent run). MLflow is written by the driver only (a Tune callback), so a local sqlite store has a
single writer and a remote ``mlflow server`` need only be reachable from the head node. Runs are
found again by tags before being created: ``--resume`` never duplicates them.

Search: ``grid`` enumerates every grid/choice space; ``random`` crosses the grid spaces with
``num_samples`` samples of the others; ``optuna`` samples define-by-run (TPE), each trial running
all seeds in turn and reporting their mean. Scheduler: none or ASHA on the step axis.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rayexp.config import ConfigError, Experiment, SweepSpec, load_sweep, param_label, set_path

DEFAULT_SWEEP = Path(__file__).resolve().parent.parent / "sweeps" / "adam_vs_sgd.yaml"
STATE_FILE = "rayexp_sweep.json"
LOGGED = {"train_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "diverged"}
LOGGED_PREFIXES = ("grad_norm/", "mada/", "optim/", "hessian/")


# ----------------------------------------------------------------------------------------------------
# planning: which trials a sweep runs


@dataclass
class Trial:
    index: int
    key: str  # MLflow trial key: unique per sweep instance, config and seed
    assignment: dict
    seed: int
    exp: Experiment

    def label(self) -> str:
        """Short human name: optimizer and the values of the swept fields."""
        vals = " ".join(param_label(p, _fmt(v)) for p, v in self.assignment.items() if p != "optimizer.name")
        return f"{self.exp.optimizer.name} {vals} seed={self.seed}".replace("  ", " ")


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_fmt(x)}" for k, x in v.items()) + "}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _absolute_paths(raw: dict, cwd: Path) -> dict:
    """Trials run in other directories (and on other nodes): make the driver's relative paths absolute."""
    raw = copy.deepcopy(raw)
    data = raw.setdefault("data", {})
    data["cache_dir"] = str((cwd / (data.get("cache_dir") or ".rayexp_cache")).resolve())
    corpus = data.get("corpus", "builtin")
    if isinstance(corpus, str) and corpus.split(":", 1)[0] in ("text", "parquet"):
        kind, path = corpus.split(":", 1)
        data["corpus"] = f"{kind}:{(cwd / path).resolve()}"
    raw["output_dir"] = str((cwd / raw.get("output_dir", "out")).resolve())
    return raw


def assignments(spec: SweepSpec) -> list[dict]:
    """The space assignments of a grid or random sweep (per-optimizer blocks only for their optimizer)."""
    name_sp = spec.spaces.get("optimizer.name")
    names = spec.optimizer_names()
    rng = random.Random(spec.search.seed)
    out: list[dict] = []
    samples = 1 if spec.search.algorithm == "grid" else spec.search.num_samples
    for _ in range(samples):
        chosen = names if name_sp is None or name_sp.kind == "grid" or spec.search.algorithm == "grid" \
            else [name_sp.sample(rng)]
        for opt in chosen:
            active = {p: s for p, s in spec.active_spaces(opt).items() if p != "optimizer.name"}
            enumerated = {p: s for p, s in active.items()
                          if s.kind == "grid" or spec.search.algorithm == "grid"}
            for combo in itertools.product(*[s.candidates() for s in enumerated.values()]):
                a = {"optimizer.name": opt} if name_sp is not None else {}
                a.update(zip(enumerated, combo))
                a.update({p: s.sample(rng) for p, s in active.items() if p not in enumerated})
                if a not in out or spec.search.algorithm == "random":
                    out.append(a)
    return out


def trial_key(sweep_id: str, exp: Experiment) -> str:
    """Stable id of one trial of one sweep instance (same config + seed ⇒ same key on resume)."""
    return hashlib.sha1((sweep_id + exp.to_yaml()).encode()).hexdigest()[:16]


def plan(spec: SweepSpec, sweep_id: str) -> list[Trial]:
    """Every (assignment × seed) trial of a grid/random sweep, resolved and validated."""
    trials = []
    for a in assignments(spec):
        for seed in spec.seeds:
            exp = spec.resolve(a, seed)
            trials.append(Trial(len(trials), trial_key(sweep_id, exp), a, seed, exp))
    return trials


# ----------------------------------------------------------------------------------------------------
# the Tune side


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


class OptunaSpace:
    """Define-by-run search space for OptunaSearch: the optimizer first, then only its active spaces.

    Optuna's categorical choices must be scalars: a grid/choice of lists or mappings (``betas``,
    ``mada.hyper_lr``) is suggested as an index into its candidates (``decode`` maps it back).
    A picklable object, not a closure: Tune checkpoints the searcher with it.
    """

    def __init__(self, raw: dict):
        self.raw = raw

    def __call__(self, trial) -> None:
        spec = SweepSpec(self.raw, "sweep")
        name_sp = spec.spaces.get("optimizer.name")
        opt = trial.suggest_categorical("optimizer.name", name_sp.candidates()) if name_sp \
            else spec.optimizer_names()[0]
        for path, sp in spec.active_spaces(opt).items():
            if path == "optimizer.name":
                continue
            lo, hi = (sp.args + [None])[:2]
            if sp.kind in ("grid", "choice"):
                scalar = all(_scalar(v) for v in sp.args)
                trial.suggest_categorical(path, sp.args if scalar else list(range(len(sp.args))))
            elif sp.kind == "uniform":
                trial.suggest_float(path, lo, hi)
            elif sp.kind == "loguniform":
                trial.suggest_float(path, lo, hi, log=True)
            else:
                trial.suggest_int(path, lo, hi - 1)

    @staticmethod
    def decode(spec: SweepSpec, config: dict) -> dict:
        """Optuna's suggestions as a SweepSpec assignment (indices back to list/mapping candidates)."""
        out = {}
        for path, value in config.items():
            sp = spec.spaces.get(path)
            if sp is not None and sp.kind in ("grid", "choice") and not all(_scalar(v) for v in sp.args):
                value = sp.args[int(value)]
            out[path] = value
        return out


def optuna_trial(config: dict, raw: dict, sweep_id: str) -> None:
    """Tune trainable for optuna: every seed of one sampled config in turn, then the mean over seeds.

    Seeds run inside one Tune trial (optuna suggests a config once and is told one number: the seed
    mean); each seed still gets its own trial key and MLflow run. ``progress`` runs over all seeds.
    """
    import ray.tune

    from rayexp.train.launch import TuneReporter, _identity
    from rayexp.train.loop import run_training

    spec = SweepSpec(raw, "sweep")
    assignment = OptunaSpace.decode(spec, {k: v for k, v in config.items() if "." in k})
    finals = []
    for i, seed in enumerate(spec.seeds):
        exp = spec.resolve(assignment, seed)
        trial = {"key": trial_key(sweep_id, exp), "exp": exp.to_dict()}
        reporter = TuneReporter(exp, ray.tune.report, extra=_identity(trial, 0), offset=i * exp.train.steps)
        res = run_training(exp, reporter)
        finals.append(res.val_loss if res.status != "diverged" else float("inf"))
    ray.tune.report({spec.search.metric: sum(finals) / len(finals), "seed_mean": 1.0,
                     "progress": len(spec.seeds) * spec.base.train.steps})


def sweep_trial(config: dict) -> None:
    """Tune trainable for grid/random: one trial = one config × one seed (``config["trial"]``)."""
    from rayexp.train import launch

    launch.run_trial(config["trial"])


# ----------------------------------------------------------------------------------------------------
# driver-side callback: progress lines and MLflow


def _make_callback(state: dict, spec: SweepSpec, planned: dict):
    from ray import tune

    class SweepCallback(tune.Callback):
        """Prints one line per trial update and writes MLflow runs (the driver is the only writer)."""

        def __init__(self):
            self.reporters: dict = {}
            self.last: dict = {}
            self.tagged: dict = {}
            self.t0 = time.time()

        def _reporter(self, key: str, exp: Experiment):
            from rayexp import tracking
            if key not in self.reporters:
                self.reporters[key] = tracking.MlflowReporter(state["uri"], state["experiment"], exp, key,
                                                              parent_run_id=state["parent_run_id"],
                                                              tags={"rayexp.sweep_key": state["sweep_id"]})
            return self.reporters[key]

        def _exp_of(self, trial, result) -> Experiment:
            if result["trial_key"] in planned:
                return planned[result["trial_key"]].exp
            assignment = OptunaSpace.decode(spec, {k: v for k, v in trial.config.items() if "." in k})
            return spec.resolve(assignment, int(result["seed"]))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "trial_key" not in result:
                return
            exp = self._exp_of(trial, result)
            rep = self._reporter(result["trial_key"], exp)
            self._tag(rep, result)
            metrics = {k: v for k, v in result.items()
                       if k in LOGGED or k.startswith(LOGGED_PREFIXES)}
            if result.get("evaluated"):
                metrics["val_loss"] = result["val_loss"]
            if result.get("hessian"):  # curvature after training: the training summary stays as it was
                rep.log_metrics({k: v for k, v in metrics.items() if k.startswith("hessian/")}, int(result["step"]))
                self.last.setdefault(result["trial_key"], (exp, result, trial))
                return
            rep.report(int(result["step"]), metrics)
            self.last[result["trial_key"]] = (exp, result, trial)
            if result.get("evaluated") or result.get("diverged"):
                self._print(exp, result)

        def _tag(self, rep, result):
            """Where the trial runs, and the checkpoint step it resumed from after a failure or resume."""
            tags = {"rayexp.node_id": result.get("node_id")}
            if result.get("resumed_from"):
                tags["rayexp.resumed_from_step"] = int(result["resumed_from"])
            tags = {k: str(v) for k, v in tags.items() if v is not None}
            if self.tagged.get(rep.run_id) != tags:
                for k, v in tags.items():
                    rep.client.set_tag(rep.run_id, k, v)
                self.tagged[rep.run_id] = tags

        def _print(self, exp, r):
            t = planned.get(r["trial_key"])
            head = f"[{t.index + 1:>3}/{len(planned)}] {t.label()}" if t else f"[{r['trial_key'][:6]}] seed={r['seed']}"
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

        def _close(self, trial, failed: bool):
            for key, (exp, r, tr) in list(self.last.items()):
                if tr is not trial:
                    continue
                if failed:
                    status = "failed"
                elif r.get("diverged"):
                    status = "diverged"
                elif int(r["step"]) >= int(r["steps_total"]):
                    status = "finished"
                else:
                    status = "stopped"
                rep = self.reporters[key]
                rep.finish(status, {"val_loss": r.get("val_loss", float("nan")), "train_loss": r.get("train_loss", float("nan")),
                                    "step": r["step"], "tokens_per_s": r.get("tokens_per_s", 0.0)})
                error_file = getattr(trial, "error_file", None) if failed else None
                if error_file and os.path.isfile(error_file):  # the traceback, next to the run's metrics
                    rep.client.log_artifact(rep.run_id, error_file)
                if status != "failed" and trial.checkpoint is not None and trial.checkpoint.filesystem.type_name == "local":
                    from rayexp.tracking import log_checkpoint
                    log_checkpoint(rep.run_id, trial.checkpoint.path, state["uri"])
                if status != "finished":
                    where = f" (error log: {trial.error_file})" if failed and getattr(trial, "error_file", None) else ""
                    print(f"[{key[:6]}] {planned[key].label() if key in planned else ''} -> {status}{where}", flush=True)
                del self.last[key]

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            key = (trial.config.get("trial") or {}).get("key")
            if key in planned and key not in self.last:  # raised before its first report: record it too
                exp = planned[key].exp
                self._reporter(key, exp)
                self.last[key] = (exp, {"step": 0, "steps_total": exp.train.steps}, trial)
            self._close(trial, failed=True)

        def __getstate__(self):  # restored sweeps re-create MLflow clients lazily
            return {"reporters": {}, "last": {}, "tagged": {}, "t0": self.t0}

    return SweepCallback()


# ----------------------------------------------------------------------------------------------------
# running and resuming


def _tuner(spec: SweepSpec, state: dict, trials: list[Trial], restore: bool):
    import ray
    from ray import tune

    s = spec.search
    storage = state["storage"]
    callback = _make_callback(state, spec, {t.key: t for t in trials})
    run_config = tune.RunConfig(name=state["run_name"], storage_path=storage, verbose=0, callbacks=[callback],
                                failure_config=tune.FailureConfig(max_failures=s.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
    scheduler = None
    if s.scheduler not in (None, "none") and s.scheduler.asha is not None:
        a = s.scheduler.asha
        max_t = a.max_t or spec.base.train.steps * (len(spec.seeds) if s.algorithm == "optuna" else 1)
        scheduler = tune.schedulers.ASHAScheduler(time_attr="progress", grace_period=a.grace_period,
                                                  reduction_factor=a.reduction_factor, max_t=max_t)
    res = spec.base.resources
    per_trial = {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker}
    if res.workers > 1 or res.strategy == "deepspeed":
        # the trial only drives a TorchTrainer whose workers hold the CPUs/GPUs: reserve no CPU for it
        # (a bundle needs one non-zero resource: a little memory), so 2 workers fit on 2 cores
        per_trial = {"cpu": 0, "gpu": 0, "memory": 64 * 2**20}
    if s.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        trainable = tune.with_resources(tune.with_parameters(optuna_trial, raw=spec.raw, sweep_id=state["sweep_id"]),
                                        per_trial)
        searcher = OptunaSearch(space=OptunaSpace(spec.raw), metric=s.metric, mode=s.mode, seed=s.seed)
        tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples,
                                      metric=s.metric, mode=s.mode, max_concurrent_trials=s.max_concurrent,
                                      reuse_actors=True, trial_dirname_creator=_dirname)
        param_space = {}
    else:
        trainable = tune.with_resources(sweep_trial, per_trial)
        tune_config = tune.TuneConfig(scheduler=scheduler, metric=s.metric, mode=s.mode, reuse_actors=True,
                                      max_concurrent_trials=s.max_concurrent, trial_dirname_creator=_dirname)
        param_space = {"trial": tune.grid_search([{"key": t.key, "exp": t.exp.to_dict(), "storage": storage}
                                                  for t in trials])}
    if restore:
        return tune.Tuner.restore(str(Path(storage) / state["run_name"]), trainable=trainable,
                                  resume_unfinished=True, restart_errored=True, param_space=param_space)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _init_ray() -> None:
    import ray
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our callback prints progress; no Ray tables
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # small trials checkpoint often
    if not ray.is_initialized():  # trial output goes to Ray's log files; failures are printed with their path
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING,
                 include_dashboard=False, log_to_driver=False)


def run_sweep(spec: SweepSpec, resume: Optional[str] = None, quiet: bool = False) -> dict:
    """Run (or resume) a sweep; returns ``{"state": ..., "summary": rows, "errors": trials that raised}``."""
    from rayexp import tracking
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-creation chatter on a new store

    out_root = Path(spec.base.output_dir).resolve()
    if resume:
        state_path = _find_state(out_root, resume)
        state = json.loads(state_path.read_text())
        spec = SweepSpec(state["raw"], state["source"])
    else:
        spec = SweepSpec(_absolute_paths(spec.raw, Path.cwd()), spec.source)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_name = f"{spec.name}-{stamp}"
        state = {"run_name": run_name, "sweep_id": f"{spec.name}-{stamp}-{os.getpid()}", "raw": spec.raw,
                 "source": spec.source, "storage": str(out_root / "ray_results"),
                 "uri": tracking.resolve_uri(spec.base.tracking.uri),
                 "experiment": spec.base.tracking.experiment or spec.name}
        state["parent_run_id"] = tracking.sweep_parent_run(state["uri"], state["experiment"], state["sweep_id"],
                                                           {"sweep": spec.raw}, run_name=run_name)
        (out_root / "ray_results" / run_name).mkdir(parents=True, exist_ok=True)
        (out_root / "ray_results" / run_name / STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
    trials = plan(spec, state["sweep_id"]) if spec.search.algorithm != "optuna" else []
    n = len(trials) or spec.search.num_samples
    print(f"rayexp.sweep: {state['run_name']}: {n} trials ({spec.search.algorithm}"
          f"{', ' + str(len(spec.seeds)) + ' seeds each' if spec.search.algorithm == 'optuna' else ''}), "
          f"MLflow {state['uri']} experiment {state['experiment']!r}", flush=True)
    print(f"  resume after an interruption with: python -m rayexp.sweep --resume {state['run_name']}"
          + (f" output_dir={out_root}" if out_root != Path("out").resolve() else ""), flush=True)
    _init_ray()
    tuner = _tuner(spec, state, trials, restore=bool(resume))
    if resume:  # a new parent run is created RUNNING; a resumed one was left FAILED or KILLED
        tracking.set_run_status(state["uri"], state["parent_run_id"], "RUNNING")
    try:
        grid = tuner.fit()
    except BaseException:
        tracking.set_run_status(state["uri"], state["parent_run_id"], "KILLED")
        raise
    tracking.set_run_status(state["uri"], state["parent_run_id"], "FAILED" if grid.num_errors else "FINISHED")
    rows = summarize(state["uri"], state["parent_run_id"], spec)
    if not quiet:
        print_summary(rows, state)
    return {"state": state, "summary": rows, "errors": grid.num_errors}


def _find_state(out_root: Path, name: str) -> Path:
    root = out_root / "ray_results"
    exact = root / name / STATE_FILE
    if exact.is_file():
        return exact
    found = sorted(root.glob(f"{name}-*/{STATE_FILE}"))
    if not found:
        have = ", ".join(sorted(p.parent.name for p in root.glob(f"*/{STATE_FILE}"))) or "none"
        raise ConfigError(f"--resume {name}: no sweep of that name under {root}; sweeps there: {have}")
    return found[-1]


# ----------------------------------------------------------------------------------------------------
# summary (from MLflow: the same after a resume)


def summarize(uri: str, parent_run_id: str, spec: SweepSpec) -> list[dict]:
    """Per optimizer, its best config: final val loss mean ± std over seeds, steps, tokens/s, statuses."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=10000)
    swept = sorted({_param_name(p) for p in spec.spaces} - {"optimizer.name"})
    groups: dict = {}
    for r in runs:  # a swept mapping (e.g. optimizer.mada.hyper_lr) is logged as one param per key
        cfg = tuple((p, r.data.params.get(p) or _joined(r.data.params, p)) for p in swept)
        groups.setdefault((r.data.params.get("optimizer.name"), cfg), []).append(r)
    rows = []
    for (opt, cfg), rs in groups.items():
        finals = [r.data.metrics.get("final/val_loss", float("nan")) for r in rs
                  if r.data.tags.get("rayexp.status") in ("finished", "stopped")]
        statuses = [r.data.tags.get("rayexp.status", "?") for r in rs]
        vals = np.array([v for v in finals if math.isfinite(v)])
        rows.append({"optimizer": opt, "config": dict(cfg), "n": len(rs), "statuses": statuses,
                     "mean": float(vals.mean()) if len(vals) else float("inf"),
                     "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                     "steps": max(int(r.data.metrics.get("final/step", 0)) for r in rs),
                     "tokens_per_s": float(np.mean([r.data.metrics.get("final/tokens_per_s", 0.0) for r in rs]))})
    best: dict = {}
    for row in rows:
        if row["optimizer"] not in best or row["mean"] < best[row["optimizer"]]["mean"]:
            best[row["optimizer"]] = row
    return sorted(best.values(), key=lambda r: r["mean"])


def _joined(params: dict, prefix: str) -> Optional[str]:
    items = sorted((k[len(prefix) + 1:], v) for k, v in params.items() if k.startswith(prefix + "."))
    return ",".join(f"{k}={v}" for k, v in items) or None


def _param_name(space_path: str) -> str:
    parts = space_path.split(".")
    if parts[0] == "optimizer" and len(parts) > 2:
        return ".".join([parts[0]] + parts[2:])
    return space_path


def print_summary(rows: list[dict], state: dict) -> None:
    """The summary table (rich) and the command that opens the MLflow UI on this store."""
    from rich.console import Console
    from rich.table import Table

    from rayexp.tracking import ui_command

    table = Table(title=f"{state['run_name']}: best config per optimizer (final val loss over seeds)")
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
    print(f"MLflow: {state['uri']}  experiment {state['experiment']!r}, parent run {state['parent_run_id']}")
    print(f"open the UI with:  {ui_command(state['uri'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rayexp.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", nargs="?", help=f"sweep YAML (default: {DEFAULT_SWEEP.relative_to(DEFAULT_SWEEP.parents[1])})")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 'optimizer.lr={grid: [1e-3, 3e-3]}'")
    ap.add_argument("--resume", metavar="NAME", help="finish an interrupted sweep (its run name, or the sweep name for the latest)")
    ap.add_argument("--dry-run", action="store_true", help="validate and list the trials, start nothing")
    args = ap.parse_args(argv)
    if args.sweep and "=" in args.sweep and not args.sweep.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.sweep)
        args.sweep = None
    try:
        spec = load_sweep(args.sweep or DEFAULT_SWEEP, args.overrides)
        if args.dry_run:
            trials = plan(spec, "dry-run") if spec.search.algorithm != "optuna" else []
            for t in trials:
                print(f"{t.index + 1:>4}  {t.label()}")
            print(f"{len(trials) or spec.search.num_samples} trials")
            return 0
        res = run_sweep(spec, resume=args.resume)
        if res["errors"]:  # diverged trials are results; trials that raised are not
            print(f"error: {res['errors']} trial(s) raised an exception (error logs named above); the others "
                  f"finished. Fix the cause and finish with --resume {res['state']['run_name']}", file=sys.stderr)
            return 1
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with --resume NAME (printed at the start)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

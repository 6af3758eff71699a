"""``python -m rayexp.train CONFIG.yaml [key=value ...]``: one training run, no Ray.

Prints a line per log step and a final line with train/val loss; logs to MLflow (local store
``./mlflow.db`` unless ``tracking.uri`` is set) unless ``--no-mlflow``.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from rayexp.config import ConfigError
from rayexp.spaces import load_sweep


class ConsoleReporter:
    """Prints one line per report: step, losses, learning rate, throughput."""

    def __init__(self, total_steps: int, unit: str = "tok"):
        self.total, self.t0, self.unit = total_steps, time.perf_counter(), unit

    def report(self, step, metrics, checkpoint_dir=None):
        parts = [f"step {step:>5}/{self.total}"]
        for key, fmt in (("train_loss", "train {:.4f}"), ("val_loss", "val {:.4f}"),
                         ("val_accuracy", "acc {:.3f}"), ("lr", "lr {:.2e}"),
                         ("tokens_per_s", "{:,.0f} " + self.unit + "/s")):
            if key in metrics:
                parts.append(fmt.format(metrics[key]))
        parts.append(f"{time.perf_counter() - self.t0:6.1f}s")
        print(" | ".join(parts), flush=True)


class FanOut:
    """Sends each report to several reporters; stops when any asks to."""

    def __init__(self, *reporters):
        self.reporters = [r for r in reporters if r is not None]

    def report(self, step, metrics, checkpoint_dir=None):
        return any([bool(r.report(step, metrics, checkpoint_dir)) for r in self.reporters])


FIXED_ON_RESUME = ("model", "optimizer", "rotation")  # sections a resumed run may not change


def resume_experiment(ckpt, overrides: list[str]):
    """The checkpoint's own Experiment with ``overrides`` applied; one that changes its model or optimizer
    is refused (that would be another experiment, not this one continued)."""
    from rayexp.config import get_path, parse_override, set_path, validate
    from rayexp.train.checkpoint import load_experiment as checkpoint_experiment

    own = checkpoint_experiment(ckpt)
    raw = own.to_dict()
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".")[0] in FIXED_ON_RESUME and get_path(raw, key, object()) != value:
            raise ConfigError(f"--resume: {key}={value} would change the checkpoint's "
                              f"{key.split('.')[0]} ({own.optimizer.name} lr={own.optimizer.lr:g}, "
                              f"{own.model.describe()}); start a new run for that")
        set_path(raw, key, value)
    return validate(raw, f"{ckpt}/config.yaml")


def _experiment(args):
    """The Experiment to run, and the checkpoint to continue from (None: a fresh run)."""
    if not args.resume:
        spec = load_sweep(args.config, args.overrides)
        for note in spec.notes():
            print(f"note: {note}", flush=True)
        return spec.experiment(), None
    if args.config:
        raise ConfigError(f"--resume continues the checkpoint's own config; give key=value overrides, not "
                          f"{args.config}")
    from rayexp.train.checkpoint import good_checkpoint, load_state

    ckpt, note = good_checkpoint(args.resume)
    if note:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    exp = resume_experiment(ckpt, args.overrides)
    print(f"resuming {ckpt} at step {int(load_state(ckpt)['step'])}: {exp.optimizer.name} "
          f"lr={exp.optimizer.lr:g}, its own config", flush=True)
    return exp, str(ckpt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rayexp.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="experiment YAML (default: embedded defaults: gpt2-tiny, builtin corpus)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-3 train.steps=100")
    ap.add_argument("--resume", metavar="CHECKPOINT_DIR",
                    help="continue from a checkpoint directory, with its own config (overrides: e.g. train.steps)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = ap.parse_intermixed_args(argv)
    if args.config and "=" in args.config:  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        exp, args.resume = _experiment(args)
        return _run(exp, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(exp, args) -> int:
    import logging

    from rayexp import tracking
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-creation chatter on a new store
    from rayexp.train.loop import run_training

    mlf = None
    if not args.no_mlflow:
        key = hashlib.sha1((exp.to_yaml() + str(time.time())).encode()).hexdigest()[:16]
        mlf = tracking.MlflowReporter(exp.tracking.uri, exp.tracking.experiment or exp.name, exp, key)
    print(f"rayexp.train: {exp.model.describe()} | {exp.optimizer.name} lr={exp.optimizer.lr:g} | "
          f"{exp.data.corpus}/{exp.data.tokenizer} | {exp.train.steps} steps", flush=True)
    status = "failed"
    try:
        workdir = str(Path(args.resume).parent) if args.resume else None  # a resumed run goes on where it was
        result = run_training(exp, FanOut(ConsoleReporter(exp.train.steps, "img" if exp.data.images else "tok"), mlf), resume_from=args.resume,
                              workdir=workdir)
        status = result.status
    finally:
        if mlf is not None:
            if status != "failed" and result.checkpoint_dir:
                tracking.log_checkpoint(mlf.run_id, result.checkpoint_dir, mlf.uri)
            mlf.finish(status, {"train_loss": result.train_loss, "val_loss": result.val_loss} if status != "failed" else None)
    print(f"final: status={result.status} step={result.step} train_loss={result.train_loss:.4f} "
          f"val_loss={result.val_loss:.4f} {'images' if exp.data.images else 'tokens'}/s={result.tokens_per_s:,.0f}",
          flush=True)
    if mlf is not None:
        print(f"mlflow run {mlf.run_id} in {mlf.uri}  (UI: {tracking.ui_command(mlf.uri)})")
    return 0 if result.status != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())

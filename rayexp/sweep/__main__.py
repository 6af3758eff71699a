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
import sys
from pathlib import Path

from rayexp.config import ConfigError
from rayexp.spaces import SweepSpec, load_sweep
from rayexp.sweep.state import STATE_FILE, SweepState
from rayexp.sweep.plan import plan
from rayexp.sweep.preflight import preflight

DEFAULT_SWEEP = Path(__file__).resolve().parents[2] / "sweeps" / "adam_vs_sgd.yaml"


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


def resume(spec: SweepSpec, name: str) -> tuple[SweepSpec, SweepState]:
    """The saved state of sweep ``name`` under this spec's ``output_dir``, and the spec it was started with."""
    state = SweepState.load(_find_state(Path(spec.base.output_dir), name))
    return SweepSpec(state.raw, state.source), state


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rayexp.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", nargs="?", help=f"sweep YAML (default: {DEFAULT_SWEEP.relative_to(DEFAULT_SWEEP.parents[1])})")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 'optimizer.adamw.lr={grid: [1e-3, 3e-3]}'")
    ap.add_argument("--resume", metavar="NAME", help="finish an interrupted sweep (its run name, or the sweep name for the latest)")
    ap.add_argument("--dry-run", action="store_true", help="validate (local corpora and configs too), list the trials, start nothing")
    return ap


def _dry_run(spec: SweepSpec) -> int:
    trials = plan(spec, "dry-run")
    for t in trials:
        print(f"{t.index + 1:>4}  {t.label()}")
    print(f"{len(trials) or spec.search.num_samples} trials")
    return 0


def main(argv=None) -> int:
    """Exit status: 0 all trials ran (diverged ones included), 1 some failed, 2 bad input, 130 interrupted."""
    args = _parser().parse_intermixed_args(argv)
    if args.sweep and "=" in args.sweep and not args.sweep.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.sweep)
        args.sweep = None
    try:
        spec = load_sweep(args.sweep or DEFAULT_SWEEP, args.overrides)
        for note in spec.notes():
            print(f"note: {note}", flush=True)
        if args.dry_run:
            preflight(spec, local=True)
            return _dry_run(spec)
        state = None
        if args.resume:
            spec, state = resume(spec, args.resume)
        preflight(spec)
        from rayexp.sweep.tune import run_sweep  # imports Ray: not needed to validate or list

        res = run_sweep(spec, state)
        if res.interrupted:
            return 130
        if res.errors:  # diverged trials are results; trials that raised are not
            print(f"error: {res.errors} trial(s) failed (errors named above); the others finished. Fix the "
                  f"cause and finish with --resume {res.state.run_name}", file=sys.stderr)
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

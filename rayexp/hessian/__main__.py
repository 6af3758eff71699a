"""``python -m rayexp.hessian --checkpoint DIR | --run RUN_ID --tasks top_eigs,slq_blocks,l11 [--actors N] [key=value ...]``

Loads the checkpoint (dropout off; ``attention=naive`` unless ``attention=sdpa``, whose products run on the
exact math kernel), draws ``hessian.batches`` fixed batches from its experiment's corpus, prints the memory
plan, runs the tasks (progress: a bar on a terminal, plain lines in a log), writes ``hessian.npz`` and PNG
plots to ``--out`` (default ``<checkpoint>/hessian``), prints a table, and with ``--run`` logs the metrics
and files to that MLflow run. ``key=value`` arguments, anywhere on the line, set fields of the ``hessian``
section (e.g. ``probes=20 dtype=fp64 shard=params memory_gib=40``); ``preset=seed000|seed001|seed003`` sets a
seed's settings (listed below), and the other fields given override it. Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys

from rayexp.config import HESSIAN_PRESETS, ConfigError, HessianConfig, parse_override


def _parser() -> argparse.ArgumentParser:
    from rayexp.hessian.tasks import task_help
    p = argparse.ArgumentParser(prog="python -m rayexp.hessian", description=__doc__.split("\n\n")[1],
                                epilog="tasks:\n" + task_help() + "\n\npresets (preset=NAME; fields given too override it):\n"
                                + preset_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (model.pt + config.yaml)")
    src.add_argument("--run", help="MLflow run id whose checkpoint/ artifact to analyze (results logged back)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (below); default: the checkpoint's hessian.tasks")
    p.add_argument("--actors", type=int, default=None, help="Ray actors (1: in this process); see shard=data|params")
    p.add_argument("--out", default=None, help="output directory (default <checkpoint>/hessian)")
    p.add_argument("--uri", default=None, help="MLflow tracking URI (default: the local store)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.add_argument("overrides", nargs="*", help="hessian fields as key=value (e.g. probes=20 dtype=fp64)")
    return p


def preset_help() -> str:
    """One line per ``hessian.preset``: the fields it sets."""
    return "\n".join(f"  {name:<8} " + ", ".join(f"{k}={v}" for k, v in values.items())
                     for name, values in HESSIAN_PRESETS.items())


def _config(args, base: HessianConfig) -> HessianConfig:
    """The checkpoint's hessian section, then ``preset=NAME`` (its values over the checkpoint's), then the
    other key=value fields and --tasks/--actors."""
    raw = base.model_dump()
    pairs = [parse_override(t) for t in args.overrides]
    preset = next((v for k, v in pairs if k.removeprefix("hessian.") == "preset"), None)
    if preset in HESSIAN_PRESETS:
        raw.update(HESSIAN_PRESETS[preset])
    if args.tasks is not None:
        raw["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.actors is not None:
        raw["actors"] = args.actors
    for key, value in pairs:
        key = key.removeprefix("hessian.")
        top, _, sub = key.partition(".")
        if top not in HessianConfig.model_fields:
            raise ConfigError(f"hessian.{key}: unknown field; allowed: {', '.join(HessianConfig.model_fields)}")
        raw[top] = {**raw[top], sub: value} if sub else value
    try:
        return HessianConfig.model_validate(raw)
    except Exception as e:  # pydantic ValidationError → one line naming the field and the allowed values
        err = e.errors()[0] if hasattr(e, "errors") else None
        where = ".".join(str(x) for x in err["loc"]) if err else ""
        if where.startswith("tasks"):
            from rayexp.hessian.tasks import TASKS
            raise ConfigError(f"--tasks: unknown task {err['input']!r}; allowed: {', '.join(TASKS)}") from None
        msg = err["msg"].removeprefix("Value error, ") if err else str(e)
        raise ConfigError(f"hessian.{where}: {msg}" if where else msg) from None


def _run(args) -> int:
    from rayexp.hessian.analyze import analyze_checkpoint
    from rayexp.hessian.io import format_table
    from rayexp.train.checkpoint import load_experiment

    path, title = args.checkpoint, ""
    if args.run:
        from rayexp.tracking import checkpoint_from_run
        try:
            path, run_name = checkpoint_from_run(args.run, args.uri)
            title = f"MLflow run {run_name}"
        except Exception as e:
            raise ConfigError(f"--run {args.run}: no checkpoint artifact could be fetched ({type(e).__name__})") from None
    cfg = _config(args, load_experiment(path).hessian)
    results, files = analyze_checkpoint(path, cfg, out_dir=args.out, progress=not args.no_progress,
                                        echo=lambda text: print(text, flush=True), title=title)
    print(format_table(results))
    print("files: " + ", ".join(files))
    if args.run:
        from rayexp.tracking import log_hessian_results
        log_hessian_results(args.run, args.uri, results["metrics"], files)
        print(f"logged to MLflow run {args.run}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        return _run(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

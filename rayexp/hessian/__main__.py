"""``python -m rayexp.hessian --checkpoint DIR | --run RUN_ID --tasks top_eigs,slq_blocks,l11 [--actors N]``

Loads the checkpoint (attention forced to ``naive``, dropout to 0), draws ``hessian.batches`` fixed
batches from its experiment's corpus, runs the tasks (progress bar with HVP count and ETA), writes
``hessian.npz`` and PNG plots to ``--out`` (default ``<checkpoint>/hessian``), prints a table, and with
``--run`` logs the metrics and files to that MLflow run. Extra ``key=value`` arguments set fields of the
``hessian`` config section (e.g. ``probes=20 dtype=fp64``). Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys

from rayexp.config import HESSIAN_TASKS, ConfigError, HessianConfig, parse_override


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayexp.hessian", description=__doc__.splitlines()[2].strip())
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (model.pt + config.yaml)")
    src.add_argument("--run", help="MLflow run id whose checkpoint/ artifact to analyze (results logged back)")
    p.add_argument("--tasks", default=None, help=f"comma-separated, from: {', '.join(HESSIAN_TASKS)}")
    p.add_argument("--actors", type=int, default=None, help="Ray actors (1: in-process)")
    p.add_argument("--out", default=None, help="output directory (default <checkpoint>/hessian)")
    p.add_argument("--uri", default=None, help="MLflow tracking URI (default: the local store)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="hessian fields as key=value (e.g. probes=20 dtype=fp64)")
    return p


def _config(args, base: HessianConfig) -> HessianConfig:
    raw = base.model_dump()
    if args.tasks is not None:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in HESSIAN_TASKS]
        if bad or not tasks:
            raise ConfigError(f"--tasks: unknown task {bad[0] if bad else args.tasks!r}; allowed: {', '.join(HESSIAN_TASKS)}")
        raw["tasks"] = tasks
    if args.actors is not None:
        raw["actors"] = args.actors
    for text in args.overrides:
        key, value = parse_override(text)
        key = key.removeprefix("hessian.")
        if key not in HessianConfig.model_fields:
            raise ConfigError(f"hessian.{key}: unknown field; allowed: {', '.join(HessianConfig.model_fields)}")
        raw[key] = value
    try:
        return HessianConfig.model_validate(raw)
    except Exception as e:  # pydantic ValidationError → one line
        err = e.errors()[0] if hasattr(e, "errors") else None
        where = ".".join(str(x) for x in err["loc"]) if err else ""
        raise ConfigError(f"hessian.{where}: {err['msg'] if err else e}") from None


def _run(args) -> int:
    from rayexp.hessian.analyze import analyze_checkpoint, format_table
    from rayexp.train.checkpoint import load_experiment

    path = args.checkpoint
    if args.run:
        from rayexp.tracking import checkpoint_from_run
        try:
            path = checkpoint_from_run(args.run, args.uri)
        except Exception as e:
            raise ConfigError(f"--run {args.run}: no checkpoint artifact could be fetched ({type(e).__name__})") from None
    cfg = _config(args, load_experiment(path).hessian)
    started_ray = False
    if cfg.actors > 1:
        import ray
        if not ray.is_initialized():
            ray.init(log_to_driver=False)
            started_ray = True
    try:
        results, files = analyze_checkpoint(path, cfg, run_id=args.run, uri=args.uri, out_dir=args.out,
                                            progress=not args.no_progress)
    finally:
        if started_ray:
            import ray
            ray.shutdown()
    print(format_table(results))
    print("files: " + ", ".join(files))
    if args.run:
        print(f"logged to MLflow run {args.run}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
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

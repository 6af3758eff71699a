"""``python -m rayexp.report EXPERIMENT [--uri URI] [--out DIR]``: figures and tables from MLflow alone.

Reads the runs of one sweep (the latest parent run of ``EXPERIMENT``, or ``--parent RUN_ID``) with
``MlflowClient``; nothing is re-trained. Runs are grouped into *configs* (equal params except the seed)
and configs into *series* (equal categorical params: optimizer, rotation, granularity, model kind...;
numeric params such as ``optimizer.lr`` are what a series is tuned over). Writes:

- ``loss_curves.png``: train / val loss vs step of each series' best config, mean over seeds with a
  band of ± one sample standard deviation (ddof=1; ``--band minmax``: min..max over seeds);
- ``lr_sensitivity.png``: final val loss (mean ± std over seeds) vs ``optimizer.lr``, log x, one line
  per series; diverged configs as × on the top edge;
- ``best_configs`` table: per series its best config, final val loss mean ± std, seeds, statuses;
- ``mada.png``: MADA coefficient trajectories (``mada/<coef>`` metrics), mean ± band over seeds;
- ``spectra.png``, ``block_spectra.png``, ``heterogeneity.png``: SLQ densities (full, per block) and
  JS-distance matrices from the ``hessian/*.npz`` artifacts (``rayexp.hessian.save_results`` layout);
- ``l11.png``: ‖H‖₁,₁/d native vs rotated (``hessian/l11_over_d``, ``hessian/l11_rotated_over_d``);
- ``grad_norms.png``: per-block gradient norms (``block_grad_norms`` arrays) and their heterogeneity;
- ``report.html``: one self-contained page (PNGs inlined as base64) with the tables.

Figures whose data is absent are skipped with a note. The output directory is logged to the sweep's
parent run under the ``report/`` artifact path.
"""
from __future__ import annotations

import argparse
import logging
import sys

from rayexp.config import ConfigError
from rayexp.report.figures import BANDS
from rayexp.report.html import build_report, table_text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rayexp.report", description=__doc__.splitlines()[0])
    ap.add_argument("experiment", help="MLflow experiment name (the sweep's tracking.experiment)")
    ap.add_argument("--uri", default=None, help="tracking URI (default: sqlite:///$PWD/mlflow.db)")
    ap.add_argument("--out", default=None, help="output directory (default: report/<experiment>)")
    ap.add_argument("--parent", default=None, help="parent run id of the sweep (default: the latest sweep)")
    ap.add_argument("--band", default="std", choices=BANDS, help="seed band: ±1 sample std, or min..max")
    ap.add_argument("--series", default=None, help="comma-separated params that tell lines apart "
                                                   "(default: optimizer.name + varied non-numeric params)")
    ap.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    args = ap.parse_intermixed_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        rep = build_report(args.experiment, args.uri, args.out or f"report/{args.experiment}", args.parent,
                           args.band, args.series.split(",") if args.series else None, not args.no_log)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report of {rep.source}")
    for name, rows in rep.tables.items():
        if name != "runs":
            print(f"{name}:\n{table_text(rows)}\n")
    for name, path in rep.figures.items():
        print(f"figure {name}: {path}")
    for name, why in rep.skipped.items():
        print(f"skipped {name}: {why}")
    print(f"html: {rep.html}")
    if rep.parent_run_id and not args.no_log:
        print(f"logged to MLflow run {rep.parent_run_id} under report/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

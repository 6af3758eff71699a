"""Claim 6 (seed 002; arXiv 2410.19964 and its companion study of Adam's second moment): Adam's advantage comes
from its coordinate-wise second moment: sharing v over coarser groups (row / column → tensor → global, the
last being normalized SGD with momentum, "AdaSGD") loses performance, with SGD as the floor.

Sweep: adam with optimizer.granularity ∈ {coordinate, row, column, tensor, global}, each over a small
learning-rate grid (sharing v changes the effective step size, so each granularity gets its best lr), plus
SGD with momentum as reference, two seeds. Verdict from MLflow's final val losses at each granularity's
best lr (mean ± std):
  (a) coordinate-wise v is best or tied (≤ every other granularity's mean + the two stds);
  (b) the coarsest sharing hurts: global is worse than coordinate by more than the two stds;
  (c) the loss does not improve as v gets coarser (Spearman ρ between coarseness rank
      coordinate < row ≈ column < tensor < global and final loss is > 0).
"""
import _common as C
from scipy.stats import spearmanr

GRANS = ["coordinate", "row", "column", "tensor", "global"]
RANK = {"coordinate": 0, "row": 1, "column": 1, "tensor": 2, "global": 3}


def main(argv=None) -> int:
    args = C.parser(__doc__).parse_args(argv)
    C.quiet_env()
    raw, out, uri = C.setup(args, "claim6_second_moment_granularity", [0, 1])
    lrs = [1e-3, 3e-3, 1e-2] if args.scale == "small" else [3e-4, 6e-4, 1.2e-3]
    raw["optimizer"] = {"name": {"grid": ["adam", "sgd"]}, "weight_decay": 0.0,
                        "adam": {"lr": {"grid": lrs}, "betas": [0.9, 0.95], "granularity": {"grid": GRANS}},
                        "sgd": {"lr": {"grid": [0.1, 0.3]}, "momentum": 0.9}}
    res = C.run_sweep(raw)
    parent = res["state"].parent_run_id
    runs = C.child_runs(uri, parent)
    best = {g: C.best_config(C.pick(runs, optimizer__name="adam", optimizer__granularity=g), what=f"adam/{g}")
            for g in GRANS}
    st = {g: C.final_val(rs) for g, (_, rs) in best.items()}
    sgd_lr, sgd_runs = C.best_config(C.pick(runs, optimizer__name="sgd"))
    sgd = C.final_val(sgd_runs)
    C.report(uri, raw["name"], parent, out)
    coord = st["coordinate"]
    rho = float(spearmanr([RANK[g] for g in GRANS], [st[g][0] for g in GRANS]).statistic)  # ties: average ranks
    measured = "; ".join(f"{g} lr={best[g][0]}: {C.fmt(*st[g][:2])}" for g in GRANS) + \
        f"; sgd lr={sgd_lr}: {C.fmt(*sgd[:2])}"
    C.verdict("Claim 6: Adam second-moment granularity ablation", [
        ("coordinate-wise v is best or tied", measured,
         all(coord[0] <= st[g][0] + st[g][1] + coord[1] for g in GRANS)),
        ("global (one scalar v) is worse than coordinate-wise v",
         f"global − coordinate = {st['global'][0] - coord[0]:+.4f} (stds {coord[1]:.4f}, {st['global'][1]:.4f})",
         st["global"][0] - coord[0] > coord[1] + st["global"][1]),
        ("coarser sharing does not help (Spearman ρ(coarseness, loss) > 0)", f"ρ = {rho:.2f}", rho > 0),
    ], out, {"granularity": st, "best_lr": {g: b[0] for g, b in best.items()}, "sgd": sgd,
             "sweep_seconds": res["seconds"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Claim 1 (seeds 002/003): on a GPT-2 transformer, Adam beats SGD, and sign-based Signum closes most of the gap.

Sweep: optimizer ∈ {adamw, sgd, signum}, each over a small learning-rate grid, every config on two
seeds (gpt2-tiny, builtin corpus, 200 steps by default). Verdict from MLflow's final val losses of each
optimizer's best learning rate (mean ± sample std over seeds):
  (a) Adam < SGD by more than the two stds together;
  (b) Signum closes ≥ 50 % of the SGD–Adam gap: (SGD − Signum) / (SGD − Adam) ≥ 0.5.
Figures (rayexp.report): loss curves with seed bands, LR sensitivity, best-config table.
"""
import _common as C

LRS = {"small": {"adamw": [1e-3, 3e-3, 1e-2], "sgd": [0.03, 0.1, 0.3, 1.0], "signum": [1e-4, 3e-4, 1e-3, 3e-3]},
       "gpt2-124m": {"adamw": [3e-4, 6e-4, 1.2e-3], "sgd": [0.1, 0.3, 1.0], "signum": [1e-4, 3e-4, 1e-3]}}


def sweep_raw(raw: dict, scale: str) -> dict:
    lrs = LRS[scale]
    raw["optimizer"] = {"name": {"grid": ["adamw", "sgd", "signum"]}, "weight_decay": 0.0,
                        "adamw": {"lr": {"grid": lrs["adamw"]}, "betas": [0.9, 0.95]},
                        "sgd": {"lr": {"grid": lrs["sgd"]}, "momentum": 0.9},
                        "signum": {"lr": {"grid": lrs["signum"]}, "momentum": 0.9}}
    return raw


def main(argv=None) -> int:
    args = C.parser(__doc__).parse_args(argv)
    C.quiet_env()
    raw, out, uri = C.setup(args, "claim1_adam_sgd_signum", [0, 1])
    res = C.run_sweep(sweep_raw(raw, args.scale))
    parent = res["state"].parent_run_id
    runs = C.child_runs(uri, parent)
    best = {}
    for opt in ("adamw", "sgd", "signum"):
        lr, rs = C.best_config(C.pick(runs, optimizer__name=opt), what=opt)
        best[opt] = (lr, *C.final_val(rs))
    C.report(uri, raw["name"], parent, out)
    a, s, g = best["adamw"], best["sgd"], best["signum"]
    gap = s[1] - a[1]
    closed = (s[1] - g[1]) / gap if gap > 0 else float("nan")
    measured = "; ".join(f"{o} lr={v[0]}: {C.fmt(v[1], v[2])}" for o, v in best.items())
    C.verdict("Claim 1: Adam vs SGD vs Signum on " + raw["model"]["preset"], [
        ("Adam reaches a lower final val loss than SGD (best lr each, gap > std_adam + std_sgd)",
         f"{measured}; gap SGD−Adam = {gap:.4f}", gap > a[2] + s[2]),
        ("Signum closes most (≥ 50 %) of the SGD–Adam gap",
         f"(SGD − Signum)/(SGD − Adam) = {closed:.2f}", closed >= 0.5 if gap > 0 else None),
    ], out, {"best": best, "sweep_seconds": res["seconds"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

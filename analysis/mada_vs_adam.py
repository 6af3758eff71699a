"""Claim 5 (seed 004, arXiv 2401.08893): MADA, whose six coefficients are learned online by hypergradient
descent, matches or beats Adam on GPT-2, and its coefficients move away from their Adam-like start.

Sweep: optimizer ∈ {adam, mada} at the same learning rate (the seed keeps α fixed), two seeds; MADA starts
from the seed's values (β1 0.9, β2 0.95, β3 0, ρ 0.6, c 1, γ 1) with its hyper learning rates.
Verdict from MLflow:
  (a) MADA's final val loss ≤ Adam's + the two stds together (matches or beats);
  (b) the learned coefficients moved: max over coefficients of |final − initial| > 0.01.
Figures: loss curves with seed bands and the MADA coefficient trajectories (``mada/<coef>``).
"""
import _common as C

from rayexp.config import MADA_COEFS, MadaConfig


def main(argv=None) -> int:
    args = C.parser(__doc__).parse_args(argv)
    C.quiet_env()
    raw, out, uri = C.setup(args, "claim5_mada_vs_adam", [0, 1])
    lr = 3e-3 if args.scale == "small" else 6e-4
    raw["optimizer"] = {"name": {"grid": ["adam", "mada"]}, "lr": lr, "betas": [0.9, 0.95], "weight_decay": 0.0}
    res = C.run_sweep(raw)
    parent = res["state"].parent_run_id
    runs = C.child_runs(uri, parent)
    adam, mada = C.final_val(C.pick(runs, optimizer__name="adam")), C.final_val(C.pick(runs, optimizer__name="mada"))
    init = MadaConfig()
    finals = {c: [r.data.metrics.get(f"mada/{c}") for r in C.pick(runs, optimizer__name="mada")] for c in MADA_COEFS}
    finals = {c: sum(v) / len(v) for c, v in finals.items() if v and None not in v}
    moved = {c: finals[c] - getattr(init, c) for c in finals}
    C.report(uri, raw["name"], parent, out)
    C.verdict("Claim 5: MADA vs Adam", [
        ("MADA matches or beats Adam (final val loss ≤ Adam + std_adam + std_mada)",
         f"adam {C.fmt(*adam[:2])}; mada {C.fmt(*mada[:2])}; Δ = {mada[0] - adam[0]:+.4f}",
         mada[0] <= adam[0] + adam[1] + mada[1]),
        ("the learned coefficients move away from their start (max |final − init| > 0.01)",
         ", ".join(f"{c} {getattr(init, c):g}→{finals[c]:.3f}" for c in finals) or "no mada/* metrics",
         max((abs(v) for v in moved.values()), default=0.0) > 0.01 if moved else None),
    ], out, {"adam": adam, "mada": mada, "coefficients": finals, "sweep_seconds": res["seconds"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

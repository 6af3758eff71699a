"""Claim 2 (seed 000, arXiv 2410.08198): Adam exploits the ℓ∞ geometry of the native basis: Adam on a randomly
rotated loss trains worse, and the Hessian's ‖H‖₁,₁ is smaller in the native basis than in a rotated one.

Sweep: adamw with rotation.kind ∈ {none, per_tensor, randperm} (per_tensor: random Haar U W Vᵀ per tensor;
randperm: seed 000's two groups, 2 rounds of permutation + three-factor rotation; rayexp.optim.rotation), plus
sgd under the same rotations as a control (SGD is rotation-equivariant), two seeds each; init native, so the
control is exact. Then
``rayexp.hessian`` estimates ‖H‖₁,₁ by Cauchy sketches on the final native-Adam checkpoint of seed 0, in
the native basis and in a per-tensor rotated basis (``hessian.l11_rotation``), logged back to MLflow.
Verdict:
  (a) rotated Adam's final val loss exceeds native Adam's by more than their stds together (per_tensor, randperm);
  (b) ‖RHRᵀ‖₁,₁ / ‖H‖₁,₁ > 1 (the paper reports a large increase);
  (c) control: rotated SGD ≈ SGD (|difference| ≤ stds together + 0.01);
  (d) seed 000's own form (hessian.preset seed000): each Adam model's ‖H‖₁,₁ in the basis it was trained in
      (l11_rotation: train), half-IQR of 50 Cauchy sketches: the randperm-trained model's is the larger
      (the per_tensor-trained model's ratio is printed beside it).
"""
import _common as C
from rayexp.config import HessianConfig

KINDS = ("none", "per_tensor", "randperm")  # rotation.kind arms


def main(argv=None) -> int:
    args = C.parser(__doc__).parse_args(argv)
    C.quiet_env()
    raw, out, uri = C.setup(args, "claim2_rotation_l11", [0, 1])
    lr = {"small": {"adamw": 3e-3, "sgd": 0.3}, "gpt2-124m": {"adamw": 6e-4, "sgd": 0.3}}[args.scale]
    raw["optimizer"] = {"name": {"grid": ["adamw", "sgd"]}, "weight_decay": 0.0,
                        "adamw": {"lr": lr["adamw"], "betas": [0.9, 0.95]}, "sgd": {"lr": lr["sgd"], "momentum": 0.9}}
    raw["rotation"] = {"kind": {"grid": list(KINDS)}, "seed": 0, "rounds": 2}
    res = C.run_sweep(raw)
    parent = res["state"].parent_run_id
    runs = C.child_runs(uri, parent)
    stats = {(o, k): C.final_val(C.pick(runs, optimizer__name=o, rotation__kind=k))
             for o in ("adamw", "sgd") for k in KINDS}
    small = args.scale == "small"
    cfg = HessianConfig(tasks=["l11"], batches=2 if small else 8, batch_size=8 if small else 8,
                        cauchy_vectors=50 if small else 100, l11_rotation="per_tensor", dtype="fp32")
    seed0 = lambda kind: [r for r in C.pick(runs, optimizer__name="adamw", rotation__kind=kind)  # noqa: E731
                          if r.data.params.get("seed") == "0"][0]
    h = C.hessian(uri, seed0("none"), cfg, out)["metrics"]
    # seed 000's comparison (hessian.preset seed000): each model in the basis it was trained in, half-IQR of k = 50
    seed_cfg = HessianConfig(preset="seed000", tasks=["l11"], batches=cfg.batches, batch_size=cfg.batch_size, dtype="fp32")
    sn_h = C.hessian(uri, seed0("none"), seed_cfg, out / "seed000_native", "seed000")["metrics"]
    sr_h = C.hessian(uri, seed0("randperm"), seed_cfg, out / "seed000_rotated", "seed000")["metrics"]
    st_h = C.hessian(uri, seed0("per_tensor"), seed_cfg, out / "seed000_per_tensor", "seed000")["metrics"]
    seed_ratio = sr_h["l11_rotated"] / sn_h["l11_rotated"]
    C.report(uri, raw["name"], parent, out)
    an, ar, ap = stats[("adamw", "none")], stats[("adamw", "per_tensor")], stats[("adamw", "randperm")]
    sn, sr, sp = stats[("sgd", "none")], stats[("sgd", "per_tensor")], stats[("sgd", "randperm")]
    ratio = h["l11_rotated"] / h["l11"]
    C.verdict("Claim 2: rotated Adam vs Adam, ‖H‖₁,₁ native vs rotated", [
        ("Adam on the rotated loss ends with a higher val loss than Adam in the native basis",
         f"native {C.fmt(*an[:2])}; per_tensor {C.fmt(*ar[:2])}, Δ = {ar[0] - an[0]:+.4f}; randperm {C.fmt(*ap[:2])}, "
         f"Δ = {ap[0] - an[0]:+.4f}", min(ar[0] - an[0] - ar[1], ap[0] - an[0] - ap[1]) > an[1]),
        ("‖H‖₁,₁ is larger in a rotated basis than in the native basis (native-Adam checkpoint, seed 0)",
         f"‖H‖₁,₁/d native {h['l11_over_d']:.4g}, rotated {h['l11_rotated_over_d']:.4g}; ratio {ratio:.2f}", ratio > 1),
        ("seed 000's form: ‖H‖₁,₁ in the training basis (preset seed000: half-IQR, k = 50) is larger for "
         "randperm-trained Adam than for native-Adam (seed 0)",
         f"‖H‖₁,₁/d native-trained {sn_h['l11_rotated_over_d']:.4g} (median {sn_h['l11_rotated_median_over_d']:.4g}), "
         f"randperm-trained {sr_h['l11_rotated_over_d']:.4g} (median {sr_h['l11_rotated_median_over_d']:.4g}), "
         f"ratio {seed_ratio:.2f}; per_tensor-trained {st_h['l11_rotated_over_d']:.4g}, ratio "
         f"{st_h['l11_rotated'] / sn_h['l11_rotated']:.2f}", seed_ratio > 1),
        ("control: SGD is unaffected by the rotation",
         f"SGD native {C.fmt(*sn[:2])}; per_tensor {C.fmt(*sr[:2])}, Δ = {sr[0] - sn[0]:+.4f}; randperm "
         f"{C.fmt(*sp[:2])}, Δ = {sp[0] - sn[0]:+.4f}",
         max(abs(sr[0] - sn[0]) - sr[1], abs(sp[0] - sn[0]) - sp[1]) <= sn[1] + 0.01),
    ], out, {"stats": {f"{o}/{k}": v for (o, k), v in stats.items()}, "l11": h, "seed000": {"native": sn_h, "randperm": sr_h, "per_tensor": st_h},
             "sweep_seconds": res["seconds"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

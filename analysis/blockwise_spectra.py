"""Claim 3 (seed 001, arXiv 2402.16788): blockwise Hessian spectra are far more heterogeneous in a transformer
than in a CNN (average pairwise Jensen–Shannon distance JS₀ between per-block SLQ densities).

Two sweeps, AdamW, one seed: model.kind ∈ {gpt2, cnn} on text (gpt2-tiny and a token CNN of the same width:
the same-data control), and the seed's comparison, a ResNet18 on images (``_common.vision_raw``: at small
scale a CIFAR-stem ResNet18 of width 8 on 16×16 ``task:images``; at gpt2-124m width 64 on CIFAR-10, or
``--images PATH``). Then ``rayexp.hessian`` on each final checkpoint: full SLQ density (``slq``) and blockwise
densities with the JS matrix (``slq_blocks``), logged back to MLflow. Blocks (``--blocks``, default the weight
tensors, one rule for every arm): on the GPT the weights with Q/K/V split, LayerNorm γ included; on the
ResNet the convolutions, BatchNorm γ and the classifier weight (41 blocks; biases and BatchNorm β left out as
the GPT's biases are). JS₀ is reported on raw eigenvalues (rayexp.hessian's ``js_heterogeneity``) and on
spectral *shape* (each block's nodes divided by its largest |node|, as the paper's Fig. 3 normalizes), then
again with seed 001's settings (``hessian.preset: seed001``) on raw, max|λ|- and λ₁₀-normalized nodes: the
seed's block list on the GPT, its analogue on the ResNet (conv and linear weights, no norm layers: seed 001's
lists have none; ``_common.SEED_BLOCKS``), the token CNN's weight tensors. ``--steps`` sets the training length
(the paper measures at initialization; small steps approach that). Verdict: JS₀(transformer) > JS₀(CNN) and
JS₀(transformer) > JS₀(ResNet18), for every variant.
"""
import _common as C

from rayexp.config import HessianConfig

LABELS = {"cnn": "the token CNN (same data)", "resnet18": "ResNet18 (images)"}
SEED_VARIANTS = (("raw", "raw"), ("max_abs", "nodes / max|λ|"), ("top10", "nodes / λ₁₀ (the paper's)"))


def shape_js(arrays: dict) -> float:
    """JS₀ of the blockwise densities with each block's nodes scaled to max |node| = 1."""
    from rayexp.hessian.slq import Quadrature, block_densities
    quads = {str(n): Quadrature(nodes, w).normalized("max_abs") for n, nodes, w in
             zip(arrays["block_names"], arrays["block_nodes"], arrays["block_weights"])}
    return float(block_densities(quads, sigma2=1e-3, points=20_000)[3])


def measure(uri, run, kind: str, cfg: HessianConfig, seed: HessianConfig, out) -> dict:
    """JS₀ of one arm's final checkpoint: rayexp's settings (raw, shape) and seed 001's (raw, max|λ|, λ₁₀)."""
    h = C.hessian(uri, run, cfg, out)
    s = C.hessian(uri, run, C.seed_config(seed, kind), out / "seed001", "seed001")["metrics"]
    return {"raw": h["metrics"]["js_heterogeneity"], "shape": shape_js(h["arrays"]),
            "blocks": len(h["arrays"]["block_names"]), "val_loss": run.data.metrics.get("final/val_loss"),
            **{f"seed001_{k}": s["js_heterogeneity" + ("" if k == "raw" else f"_{k}")] for k, _ in SEED_VARIANTS}}


def ratio(a: float, b: float) -> float:
    return a / max(b, 1e-12)


def rows(g: dict, c: dict, kind: str) -> list:
    """The verdict rows transformer vs arm ``kind``: raw, shape, and seed 001's three variants."""
    name = LABELS[kind]
    out = [(f"JS₀ (raw eigenvalues) is larger for the transformer than for {name}",
            f"gpt2 {g['raw']:.4f} ({g['blocks']} blocks) vs {kind} {c['raw']:.4f} ({c['blocks']} blocks); "
            f"ratio {ratio(g['raw'], c['raw']):.2f}", g["raw"] > c["raw"]),
           (f"JS₀ (spectral shape, nodes / max|node| per block) is larger for the transformer than for {name}",
            f"gpt2 {g['shape']:.4f} vs {kind} {c['shape']:.4f}; ratio {ratio(g['shape'], c['shape']):.2f}",
            g["shape"] > c["shape"])]
    for k, label in SEED_VARIANTS:
        a, b = g["seed001_" + k], c["seed001_" + k]
        out.append((f"seed 001's settings (preset seed001: summed HVPs, σ² = 1e-5, no reorth., seed block list), "
                    f"JS₀ {label}, transformer vs {name}", f"gpt2 {a:.4f} vs {kind} {b:.4f}; ratio {ratio(a, b):.2f}",
                    a > b))
    return out


def sweeps(args, raw: dict) -> tuple[dict, list]:
    """The text sweep (gpt2, cnn) and the ResNet18 arm's: their configs, results and child runs."""
    if args.scale == "small" and not args.steps:
        raw["train"].update(steps=100, eval_every=50, warmup=10)
    raw["model"]["kind"] = {"grid": ["gpt2", "cnn"]}
    raw["optimizer"] = {"name": "adamw", "lr": 3e-3 if args.scale == "small" else 6e-4, "weight_decay": 0.0}
    vraw = C.vision_raw(raw, args.scale, args.images)
    if args.scale != "small":
        vraw["optimizer"]["lr"] = 1e-3
    results, runs = C.run_sweeps(raw["tracking"]["uri"], raw, vraw)
    return {"raw": raw, "vraw": vraw, "results": results}, runs


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--probes", type=int, default=2)
    p.add_argument("--lanczos-steps", type=int, default=15)
    C.add_blocks_option(p)
    C.add_images_option(p)
    args = p.parse_args(argv)
    C.quiet_env()
    raw, out, uri = C.setup(args, "claim3_blockwise_spectra", [0])
    sw, runs = sweeps(args, raw)
    js = {}
    for kind in ("gpt2", "cnn", "resnet18"):
        bs = C.VISION[args.scale]["hessian_batch"] if kind == "resnet18" else 8 if args.scale == "small" else 4
        cfg = HessianConfig(tasks=["slq", "slq_blocks"], batches=2, batch_size=bs, probes=args.probes,
                            slq_steps=args.lanczos_steps, reorth="full", grid_points=20_000, dtype="fp64",
                            blocks=args.blocks)
        # seed 001's settings (hessian.preset seed001): HVPs summed over the batches, σ² = 1e-5 at that scale,
        # no reorthogonalization, the seed's block list on the GPT (C.seed_config: the others' analogues)
        seed = HessianConfig(preset="seed001", tasks=["slq_blocks"], batches=2, batch_size=bs, probes=args.probes,
                             slq_steps=args.lanczos_steps, grid_points=20_000, dtype="fp64")
        js[kind] = measure(uri, C.pick(runs, model__kind=kind)[0], kind, cfg, seed, out)
    for res, sub in zip(sw["results"], (out, out / "resnet18")):
        C.report(uri, res["state"].experiment, res["state"].parent_run_id, sub)
    C.verdict(f"Claim 3: blockwise spectra heterogeneity after {raw['train']['steps']} steps",
              rows(js["gpt2"], js["cnn"], "cnn") + rows(js["gpt2"], js["resnet18"], "resnet18"), out,
              {"js": js, "sweep_seconds": [res["seconds"] for res in sw["results"]]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

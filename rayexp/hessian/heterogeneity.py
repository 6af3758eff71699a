"""``python -m rayexp.hessian.heterogeneity``: blockwise JS heterogeneity, transformer vs CNN vs MLP.

Trains gpt2-tiny, a token CNN and a token MLP of the same width on the builtin corpus for ``--steps``
steps (``rayexp.train.loop.run_training``, AdamW), then computes the blockwise SLQ densities of each
trained model on the same fixed batches and prints JS₀ (mean pairwise JS distance, arXiv 2402.16788)
twice: on raw eigenvalues, and with each block's nodes divided by the block's largest |node| (spectral
*shape* only, as the paper's Fig. 3 normalizes its plotted spectra). Also prints the gradient
heterogeneity (std of log10 ‖g_b‖). The claim to reproduce: the transformer's JS₀ is the larger.
"""
from __future__ import annotations

import argparse
import time


from rayexp.config import validate
from rayexp.hessian.analyze import fixed_batches
from rayexp.hessian.estimators import block_grad_norms, grad_heterogeneity
from rayexp.hessian.hvp import HVP
from rayexp.hessian.operator import Operator
from rayexp.hessian.slq import block_densities, slq_blocks


def measure(kind: str, steps: int, probes: int, lanczos_steps: int, workdir: str) -> dict:
    """Train ``kind`` (gpt2 | cnn | mlp) for ``steps`` steps and return its heterogeneity numbers."""
    from rayexp.train.checkpoint import load_model
    from rayexp.train.loop import run_training

    exp = validate({"name": f"het-{kind}", "model": {"kind": kind, "preset": "gpt2-tiny", "attention": "naive"},
                    "train": {"steps": max(steps, 1), "batch_size": 16, "eval_every": max(steps, 1),
                              "warmup": min(30, steps)},
                    "optimizer": {"name": "adamw", "lr": 3e-3}, "output_dir": f"{workdir}/{kind}",
                    "hessian": {"batches": 2, "batch_size": 8}})
    t0 = time.perf_counter()
    res = run_training(exp) if steps > 0 else None
    if res is not None:
        model, exp2, _ = load_model(res.checkpoint_dir, attention="naive", dropout=0.0)
    else:  # --steps 0: the model at initialization (JS₀ of the paper is measured there)
        from rayexp.data import load_data
        from rayexp.models import block_size, build
        import torch
        torch.manual_seed(exp.seed)
        data = load_data(exp.data, block_size(exp.model))
        model, exp2 = build(exp.model, data.vocab_size, data.n_classes, data.pad_id), exp
    train_s = time.perf_counter() - t0
    op = Operator(HVP(model, fixed_batches(exp2, exp2.hessian), mode="fwd_rev", dtype="fp64"))
    t0 = time.perf_counter()
    quads = slq_blocks(op, op.blocks, probes, lanczos_steps, seed=0, reorth="full")
    slq_s = time.perf_counter() - t0
    _, _, _, js_raw = block_densities(quads, points=20_000)
    _, _, _, js_shape = block_densities({k: q.normalized("max_abs") for k, q in quads.items()}, sigma2=1e-3, points=20_000)
    het = grad_heterogeneity(block_grad_norms(op, op.grad(), op.blocks))
    return {"kind": kind, "params": op.d, "blocks": len(op.blocks), "val_loss": res.val_loss if res else float("nan"),
            "js0_raw": js_raw, "js0_shape": js_shape, **het, "hvps": op.count, "train_s": train_s, "slq_s": slq_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m rayexp.hessian.heterogeneity", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--probes", type=int, default=3)
    p.add_argument("--lanczos-steps", type=int, default=20)
    p.add_argument("--models", default="gpt2,cnn,mlp")
    p.add_argument("--workdir", default="out/heterogeneity")
    args = p.parse_args(argv)
    rows = [measure(k, args.steps, args.probes, args.lanczos_steps, args.workdir) for k in args.models.split(",")]
    cols = ["kind", "params", "blocks", "val_loss", "js0_raw", "js0_shape", "grad_heterogeneity", "grad_norm_ratio",
            "hvps", "train_s", "slq_s"]
    print("  ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>18.4g}" if isinstance(r[c], float) else f"{r[c]:>18}" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Curvature engine (ALGORITHMS.md "Curvature"): HVPs, Lanczos, SLQ (full and blockwise), Hutchinson,
1-1 norm, per-block curvature, sharded over Ray actors (``rayexp.hessian.distributed``).

    from rayexp.hessian import HVP, analyze
    op = HVP(model, batches, mode="fwd_rev", dtype="fp64")   # v ↦ Hv, flat d-vectors, op.blocks
    results = analyze(model, batches, exp.hessian)           # {"metrics", "arrays", "hvps", "seconds"}
"""
from rayexp.hessian.analyze import analyze, analyze_checkpoint, fixed_batches, format_table, save_results  # noqa: F401
from rayexp.hessian.hvp import HVP, Block, check_model, param_blocks  # noqa: F401
from rayexp.hessian.lanczos import lanczos, power_iteration, top_eigs  # noqa: F401
from rayexp.hessian.slq import Quadrature, block_densities, slq, slq_blocks  # noqa: F401

"""Curvature engine (docs/methods.md "Curvature"): one operator interface, HVPs of any model and loss,
Lanczos, SLQ (full and blockwise), Hutchinson, 1-1 norm, per-block curvature; a task registry with a
memory plan; SPMD over Ray actors with data or parameter sharding (``rayexp.hessian.distributed``).

    from rayexp.hessian import HVP, Operator, analyze, top_eigs
    op = Operator(HVP(model, batches, loss_fn, mode="cached", dtype="fp64"))   # v ↦ Hv, op.blocks
    top_eigs(op, k=3, which="both")
    results = analyze(model, batches, exp.hessian, loss_fn)   # {"metrics", "arrays", "hvps", "seconds", "plan"}
"""
from rayexp.hessian.analyze import analyze, analyze_checkpoint, fixed_batches  # noqa: F401
from rayexp.hessian.plan import build_operator  # noqa: F401
from rayexp.hessian.hvp import HVP, check_model, param_blocks, token_cross_entropy  # noqa: F401
from rayexp.hessian.io import format_table, save_results  # noqa: F401
from rayexp.hessian.lanczos import lanczos, power_iteration, top_eigs  # noqa: F401
from rayexp.hessian.operator import Block, HessianOperator, Operator  # noqa: F401
from rayexp.hessian.slq import Quadrature, block_densities, slq, slq_blocks  # noqa: F401

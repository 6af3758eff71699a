"""Ray-sharded curvature estimators agree with the in-process ones for 1, 2 and 3 actors (real local Ray)."""
import numpy as np
import pytest
import torch
from test_hessian import make_batches, make_model

from rayexp.config import ConfigError, HessianConfig
from rayexp.hessian import estimators as est
from rayexp.hessian.analyze import analyze
from rayexp.hessian.hvp import HVP
from rayexp.hessian.slq import slq, slq_blocks


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_actors_1_2_3_agree_with_local(ray_local):
    from rayexp.hessian.distributed import ShardedHessian

    model, batches = make_model("gpt"), make_batches(n=3)
    op = HVP(model, batches)
    v = torch.randn(op.d, dtype=torch.float64)
    ref = {"hv": op(v), "slq": slq(op, op.d, probes=3, steps=6, seed=1),
           "blocks": slq_blocks(op, op.blocks[4:7], probes=2, steps=5, seed=1),
           "rad": est.rademacher_samples(op, op.d, range(5), seed=2),
           "l11": est.row_scales(est.cauchy_rows(op, op.d, range(12), slice(0, op.d), 3), "median"),
           "rows": est.l11_exact_rows(op, op.d, [0, 5, 400, 1079]),
           "curv": est.block_curvature(op, op.blocks[4:7], steps=5)}
    tol = dict(rtol=1e-9, atol=1e-12)
    for n in (1, 2, 3):
        sh = ShardedHessian(model, batches, actors=n, cpus_per_actor=0.5)
        try:
            assert torch.allclose(sh(v), ref["hv"], **tol)  # data sharding: Σ shards (n_s/n) H_s v
            assert torch.allclose(sh.grad(), op.grad(), **tol)
            q = sh.slq(3, 6, seed=1)
            assert np.allclose(q.nodes, ref["slq"].nodes, **tol) and np.allclose(q.weights, ref["slq"].weights, **tol)
            qb = sh.slq_blocks(op.blocks[4:7], 2, 5, seed=1)
            assert all(np.allclose(qb[k].nodes, ref["blocks"][k].nodes, **tol) for k in ref["blocks"])
            r = sh.rademacher(5, seed=2)
            assert np.allclose(r["vhv"], ref["rad"]["vhv"], **tol) and np.allclose(r["diag_sum"], ref["rad"]["diag_sum"], **tol)
            assert np.allclose(sh.l11_cauchy(12, seed=3), ref["l11"], **tol)  # row sharding
            assert np.allclose(sh.exact_rows([0, 5, 400, 1079]), ref["rows"], **tol)
            assert np.allclose(sh.block_curvature(op.blocks[4:7], 5), ref["curv"], **tol)
            assert sh.count > 0
        finally:
            sh.shutdown()


@pytest.mark.slow
def test_analyze_with_actors_matches_in_process(ray_local):
    model, batches = make_model("cnn"), make_batches(n=2)
    cfg = HessianConfig(tasks=["top_eigs", "slq", "trace", "l11", "grad_heterogeneity"], dtype="fp64", probes=2,
                        lanczos_steps=8, hutchinson_probes=6, cauchy_vectors=10, grid_points=500)
    local = analyze(model, batches, cfg, progress=False)
    sharded = analyze(model, batches, cfg.model_copy(update={"actors": 2}), progress=False)
    assert local["metrics"].keys() == sharded["metrics"].keys()
    for k, v in local["metrics"].items():
        assert sharded["metrics"][k] == pytest.approx(v, rel=1e-8, abs=1e-12), k


def test_analyze_refuses_sdpa_and_dropout_before_starting_actors():
    cfg = HessianConfig(actors=3)
    with pytest.raises(ConfigError, match="attention"):
        analyze(make_model("gpt", attention="sdpa"), make_batches(), cfg, progress=False)
    with pytest.raises(ConfigError, match="dropout"):
        analyze(make_model("gpt", dropout=0.2), make_batches(), cfg, progress=False)

"""Curvature over Ray actors in one torch.distributed group (real local Ray, real gloo): every task, with
data and parameter sharding on 2 and 3 actors (3 actors > 2 batches), against dense Hessians and against the
in-process run; each actor's share of parameters and vectors measured."""
import numpy as np
import pytest
import torch
from test_hessian import dense_reference, make_batches, make_model

from rayexp.config import ConfigError, HessianConfig
from rayexp.hessian.analyze import analyze
from rayexp.hessian.hvp import param_blocks
from rayexp.hessian.probes import generator

TASKS = ["top_eigs", "slq", "slq_blocks", "trace", "diag", "l11", "block_curvature", "grad_heterogeneity"]


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local():
    model, batches = make_model("gpt"), make_batches(n=2)
    cfg = HessianConfig(tasks=TASKS, dtype="fp64", probes=2, slq_steps=8, top_eigs_steps=60, hutchinson_probes=8,
                        cauchy_vectors=12, l11_rows=6, grid_points=500, curvature_steps=12, l11_rotation="per_tensor",
                        blocks=["transformer.h.0.attn.c_attn.weight.*", "transformer.h.0.mlp.c_fc.weight"])
    return model, batches, cfg, analyze(model, batches, cfg, progress=False)


def test_in_process_run_matches_the_dense_hessian(local):
    model, batches, cfg, res = local
    H = dense_reference(model, batches)
    ev = torch.linalg.eigvalsh(H).numpy()
    m = res["metrics"]
    assert np.allclose(res["arrays"]["top_eigs"][:3], ev[::-1][:3], rtol=1e-8)
    rows = torch.randperm(H.shape[0], generator=generator(cfg.seed, "l11_rows", 0))[:cfg.l11_rows]
    assert m["l11_sample"] == pytest.approx(H.shape[0] * float(H[rows].abs().sum(1).mean()), rel=1e-10)
    blocks = {b.name: b for b in param_blocks(model)}
    for i, batch in enumerate(batches):
        H1 = dense_reference(model, [batch])
        for j, name in enumerate(res["arrays"]["block_curvature_names"]):
            blk = blocks[str(name)]
            ref = torch.linalg.eigvalsh(H1[blk.slice, blk.slice]).numpy()[-1]
            # 12 Lanczos steps: λ_max of every block to 1e-3, tiny (LayerNorm) blocks to 1e-6 of the largest
            assert res["arrays"]["block_curvature"][i, j, 0] == pytest.approx(ref, rel=1e-3, abs=1e-6 * ev.max())


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["data", "params"])
@pytest.mark.parametrize("actors", [2, 3])
def test_sharded_equals_in_process(ray_local, local, shard, actors):
    model, batches, cfg, ref = local
    res = analyze(model, batches, cfg.model_copy(update={"actors": actors, "shard": shard, "cpus_per_actor": 0.5}),
                  progress=False)
    for k, v in ref["metrics"].items():
        tol = 1e-6 if k.startswith("l11") else 1e-9  # per-row samples are kept in fp32
        assert res["metrics"][k] == pytest.approx(v, rel=tol, abs=1e-12), k
    for k, v in ref["arrays"].items():
        if v.dtype.kind == "f":
            assert np.allclose(res["arrays"][k], v, rtol=1e-6, atol=1e-9 * np.abs(v).max()), k
    assert res["hvps"] == ref["hvps"]
    d = ref["arrays"]["hutchinson_diag"].size
    for a in res["actors"]:  # what each actor keeps: 1/N of θ and of every vector with params, all with data
        share = d if shard == "data" else d / actors
        assert abs(a["params"] - share) <= 1 and abs(a["vector"] - share) <= 1
    assert sum(a["batches"] for a in res["actors"]) == len(batches)


def test_unmeetable_resources_fail_fast_with_one_line(ray_local, local):
    model, batches, cfg, _ = local
    with pytest.raises(ConfigError, match="hessian.cpus_per_actor=4 .* the Ray cluster has 2"):
        analyze(model, batches, cfg.model_copy(update={"actors": 2, "cpus_per_actor": 4.0}), progress=False)


def test_analyze_refuses_dropout_before_starting_actors():
    cfg = HessianConfig(actors=2)
    with pytest.raises(ConfigError, match="model.dropout"):
        analyze(make_model("gpt", dropout=0.2), make_batches(), cfg, progress=False)

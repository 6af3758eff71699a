"""Curvature during training (``hessian.every``): the ``curv/*`` metrics a run logs at a step equal dense
references (torch.autograd.functional.hessian) of the model and optimizer state checkpointed at that step."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from rayexp.config import ConfigError, validate
from rayexp.hessian.monitor import CurvatureMonitor
from rayexp.train.loop import run_training

DURING = ["lambda_max", "trace", "block_lambda_max", "grad_norms", "precond_sharpness"]


def tiny(tmp_path, **over):
    raw = {"model": {"preset": None, "n_layer": 1, "n_head": 1, "n_embd": 4, "block_size": 8, "attention": "sdpa"},
           "train": {"steps": 10, "batch_size": 4, "eval_every": 10, "warmup": 2, "log_every": 100},
           "optimizer": {"name": "adam", "lr": 1e-2}, "output_dir": str(tmp_path),
           "hessian": {"every": 5, "during": DURING, "during_steps": 80, "during_probes": 400, "dtype": "fp64",
                       "batch_size": 2, "blocks": ["transformer.h.0.attn.c_attn.weight.*", "transformer.wte.weight"]}}
    for k, v in over.items():
        raw[k] = {**raw[k], **v}
    return validate(raw)


def dense_hessian(model, batch):
    m = copy.deepcopy(model).double()
    named = list(m.named_parameters())
    sizes = [p.numel() for _, p in named]
    x, y = batch

    def loss(flat):
        params = {n: t.view(p.shape) for (n, p), t in zip(named, torch.split(flat, sizes))}
        logits = functional_call(m, params, (x,))[0]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    with sdpa_kernel(SDPBackend.MATH):  # the exact kernel, twice differentiable
        return torch.autograd.functional.hessian(loss, flat), torch.autograd.functional.jacobian(loss, flat), named


def test_logged_curvature_equals_dense_references_at_the_checkpointed_step(tmp_path):
    from rayexp.hessian.hvp import param_blocks
    from rayexp.models import build
    from rayexp.optim import build_optimizer
    from rayexp.train.checkpoint import load_state, restore
    exp = tiny(tmp_path)
    monitor = CurvatureMonitor(exp)
    res = run_training(exp, monitors=[monitor])
    at = {h["step"]: h for h in res.history}
    assert "curv/lambda_max" in at[5] and "curv/lambda_max" in at[10]  # every 5 steps, logged though log_every=100
    ckpt = res.checkpoint_dir  # written at step 10, the state the step-10 metrics saw
    vocab = int(load_state(ckpt)["vocab_size"])
    model = build(exp.model, vocab)
    opt = build_optimizer(model, exp.optimizer, exp.rotation)
    restore(ckpt, model, opt, "cpu")
    H, g, named = dense_hessian(model, monitor.batch)
    m = at[10]
    ev = torch.linalg.eigvalsh(H).numpy()
    assert m["curv/lambda_max"] == pytest.approx(ev[-1], rel=1e-8)
    var = 2 * (float((H ** 2).sum()) - float((H.diagonal() ** 2).sum()))
    assert abs(m["curv/trace"] - float(H.trace())) <= 4 * (var / 400) ** 0.5
    blocks = {b.name: b for b in param_blocks(model)}
    for name in ["transformer.h.0.attn.c_attn.weight.q", "transformer.wte.weight"]:
        b = blocks[name]
        assert m[f"curv/block_lambda_max/{name}"] == pytest.approx(
            torch.linalg.eigvalsh(H[b.slice, b.slice]).numpy()[-1], rel=1e-6)
        assert m[f"curv/grad_norm/{name}"] == pytest.approx(float(g[b.slice].norm()), rel=1e-8)
    # Adam's preconditioner P = (1 - β1^t) diag(sqrt(v / (1 - β2^t)) + eps), from the checkpointed state
    beta1, beta2 = exp.optimizer.betas
    P = torch.cat([((1 - beta1 ** float(opt.state[p]["step"])) * ((opt.state[p]["exp_avg_sq"].double()
                   / (1 - beta2 ** float(opt.state[p]["step"]))).sqrt() + exp.optimizer.eps)).expand(p.shape).reshape(-1)
                   for _, p in dict(model.named_parameters()).items()])
    D = torch.diag(P.rsqrt())
    assert m["curv/precond_sharpness"] == pytest.approx(torch.linalg.eigvalsh(D @ H @ D).numpy()[-1], rel=1e-6)


def test_sgd_has_no_preconditioned_sharpness_and_dropout_is_refused(tmp_path):
    exp = tiny(tmp_path, optimizer={"name": "sgd", "lr": 0.1}, hessian={"during": ["lambda_max", "precond_sharpness"]})
    res = run_training(exp, monitors=[CurvatureMonitor(exp)])
    step5 = next(h for h in res.history if h["step"] == 5)
    assert "curv/lambda_max" in step5 and "curv/precond_sharpness" not in step5
    with pytest.raises(ConfigError, match="model.dropout=0"):
        CurvatureMonitor(tiny(tmp_path, model={"dropout": 0.1}))


def test_stability_thresholds():
    from rayexp.report.figures import stability_thresholds
    sgd, adam = stability_thresholds(np.array([0.1, 0.01]), 0.9)
    assert np.allclose(sgd, [20.0, 200.0]) and np.allclose(adam, [380.0, 3800.0])  # (2 + 1.8) / (0.1 · η)
    assert stability_thresholds(np.array([0.5]), None)[1] is None


@pytest.mark.slow
def test_sweep_logs_curvature_to_mlflow_and_the_report_draws_it(in_tmp):
    """hessian.every through python -m rayexp.sweep: curv/* histories in the child runs, the sharpness figure."""
    import ray
    from mlflow.tracking import MlflowClient
    from rayexp.report import build_report
    from rayexp.spaces import load_sweep
    from rayexp.sweep.tune import run_sweep
    path = in_tmp / "curv.yaml"
    path.write_text("name: curv\nmodel: {preset: null, n_layer: 1, n_head: 1, n_embd: 8, block_size: 8}\n"
                    "train: {steps: 10, batch_size: 4, eval_every: 10, warmup: 2, eval_batches: 2}\n"
                    "optimizer: {name: {grid: [adam, sgd]}, lr: 0.01}\nseeds: [0]\nsearch: {algorithm: grid}\n"
                    "hessian: {every: 5, during: [lambda_max, precond_sharpness], during_steps: 6}\n")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = run_sweep(load_sweep(str(path)), quiet=True)
    finally:
        ray.shutdown()
    client = MlflowClient(out.state.uri)
    runs = client.search_runs([client.get_experiment_by_name("curv").experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{out.state.parent_run_id}'")
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "curv/lambda_max")] == [5, 10]
        has_p = "curv/precond_sharpness" in r.data.metrics
        assert has_p == (r.data.params["optimizer.name"] == "adam")
    rep = build_report("curv", out.state.uri, in_tmp / "report", log_artifacts=False)
    assert "sharpness" in rep.figures

"""``python -m rayexp.hessian``: a checkpoint in, npz + PNG + table out, MLflow logging, one-line errors."""
import numpy as np
import pytest
import torch

from rayexp.config import validate
from rayexp.hessian.__main__ import main
from rayexp.train.checkpoint import save_checkpoint


@pytest.fixture
def checkpoint(in_tmp):
    from rayexp.data import load_tokens
    from rayexp.models import build

    exp = validate({"model": {"preset": None, "n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8,
                              "attention": "sdpa"},
                    "hessian": {"batches": 2, "batch_size": 2, "probes": 2, "lanczos_steps": 6,
                                "cauchy_vectors": 8, "grid_points": 400}})
    vocab = load_tokens(exp.data, 8).vocab_size
    torch.manual_seed(0)
    path = str(in_tmp / "ckpt")
    save_checkpoint(path, build(exp.model, vocab), None, 0, exp, {"vocab_size": vocab})
    return path


def test_cli_writes_npz_plots_and_table(checkpoint, capsys):
    rc = main(["--checkpoint", checkpoint, "--tasks", "top_eigs,slq_blocks,l11", "--out", "res", "--no-progress",
               "blocks=[transformer.h.0.attn.c_attn.weight.*,transformer.h.0.mlp.c_fc.weight]"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "js_heterogeneity" in out and "top_eig/1" in out and "l11_rotated" in out
    z = np.load("res/hessian.npz")
    assert list(z["block_names"]) == [f"transformer.h.0.attn.c_attn.weight.{p}" for p in "qkv"] + \
        ["transformer.h.0.mlp.c_fc.weight"]
    assert z["js_matrix"].shape == (4, 4) and np.allclose(z["js_matrix"], z["js_matrix"].T)
    names = list(z["metric_names"])
    l11 = z["metric_values"][names.index("l11")]
    assert l11 == pytest.approx(z["l11_rows"].sum())
    assert (z["top_eigs"][:-1] >= z["top_eigs"][1:]).all()
    with open("res/block_densities.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_logs_to_mlflow_run(checkpoint, capsys):
    from mlflow.tracking import MlflowClient
    from rayexp.tracking import log_checkpoint, resolve_uri

    uri = resolve_uri(None)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("hess")).info.run_id
    log_checkpoint(run_id, checkpoint, uri)
    assert main(["--run", run_id, "--uri", uri, "--tasks", "top_eigs,trace", "--no-progress",
                 "hutchinson_probes=4"]) == 0
    metrics = client.get_run(run_id).data.metrics
    assert "hessian/top_eig/1" in metrics and "hessian/hutchinson_trace" in metrics
    assert "hessian/hessian.npz" in [a.path for a in client.list_artifacts(run_id, "hessian")]


@pytest.mark.parametrize("args, msg", [
    (["--checkpoint", "missing_dir", "--tasks", "top_eigs"], "not found"),
    (["--checkpoint", "CKPT", "--tasks", "top_eigs,spectrum"], "unknown task 'spectrum'"),
    (["--checkpoint", "CKPT", "--tasks", "top_eigs", "dtype=fp16"], "hessian.dtype"),
    (["--checkpoint", "CKPT", "--tasks", "slq_blocks", "blocks=[nothing*]"], "matches no block"),
])
def test_cli_errors_are_one_line(checkpoint, capsys, args, msg):
    args = [checkpoint if a == "CKPT" else a for a in args]
    assert main(args + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.count("\n") == 1

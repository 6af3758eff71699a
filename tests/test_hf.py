"""HF transformers models (model.kind=hf), offline: the wrapper against the unconverted transformers model,
masked loss, padding invariance, local pretrained folders, config errors; training through the CLI (GPT-2
LM loss drops, a RoBERTa classifier beats chance, CLRS bfs reports exact-match accuracy); the Hessian CLI's
top eigenvalue and per-block eigenvalues against torch.autograd.functional.hessian in fp64."""
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("transformers")

from hf_fixtures import tiny_tokenizer  # noqa: E402
from test_hessian import dense_reference  # noqa: E402
from rayexp.config import IGNORE_INDEX, ConfigError, validate  # noqa: E402
from rayexp.hessian.hvp import param_blocks  # noqa: E402
from rayexp.models import build  # noqa: E402
from rayexp.spaces import load_experiment  # noqa: E402
from rayexp.train.checkpoint import load_model, save_checkpoint  # noqa: E402
from rayexp.train.loop import run_training  # noqa: E402

GPT2 = {"config": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}
ROBERTA = {"config": "roberta", "num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
           "intermediate_size": 16, "type_vocab_size": 1, "head": "sequence_classification"}
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]


def _model_cfg(hf: dict, block: int = 8, **kw):
    data = {"corpus": "parquet:x.parquet", "label_column": "label"} if hf.get("head") else {}
    return validate({"model": {"kind": "hf", "hf": hf, "block_size": block, **kw}, "data": data}).model


def test_gpt2_equals_the_transformers_model_it_converts():
    """Conv1D → Linear changes no logit, and c_attn's q block is the Q projection (its first C output columns)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    m = build(_model_cfg(GPT2, attention="naive"), 20)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2, vocab_size=20,
                                                                n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0,
                                                                attn_pdrop=0.0), attn_implementation="eager")
    x = torch.randint(20, (3, 8))
    assert torch.allclose(m(x)[0], ref(input_ids=x).logits, atol=1e-6)
    flat = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    q = next(b for b in param_blocks(m) if b.name == "hf.transformer.h.0.attn.c_attn.weight.q")
    assert torch.equal(flat[q.slice].view(8, 8), ref.transformer.h[0].attn.c_attn.weight[:, :8].T)
    assert all(not isinstance(mod, torch.nn.Dropout) or mod.p == 0 for mod in m.modules())


def test_loss_is_the_mean_over_scored_targets():
    torch.manual_seed(0)
    m = build(_model_cfg(GPT2), 20)
    x, y = torch.randint(20, (2, 8)), torch.randint(20, (2, 8))
    y[0, :5] = IGNORE_INDEX
    logits, loss = m(x, y)
    keep = y != IGNORE_INDEX
    ref = -torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert torch.allclose(loss, ref, atol=1e-6)


@pytest.mark.parametrize("hf", [ROBERTA, {**GPT2, "head": "sequence_classification"}], ids=["roberta", "gpt2"])
def test_padding_does_not_change_classifier_logits(hf):
    torch.manual_seed(0)
    short, long = build(_model_cfg(hf, block=6), 20, 3, 1), build(_model_cfg(hf, block=12), 20, 3, 1)
    with torch.no_grad():  # the same weights; the longer model has more position rows only
        for name, p in long.named_parameters():
            src = dict(short.named_parameters())[name]
            p[tuple(slice(0, s) for s in src.shape)] = src
    x = torch.randint(4, 20, (2, 6))
    x[1, 4:] = 1
    padded = torch.cat([x, torch.ones(2, 6, dtype=torch.long)], 1)
    assert torch.allclose(short(x)[0], long(padded)[0], rtol=0, atol=1e-7)
    if hf["config"] == "roberta":  # bidirectional: without the mask, padding would change the logits
        assert (long(padded)[0] - long.hf(input_ids=padded).logits).abs().max() > 1e-6


def test_a_local_pretrained_folder_loads_its_weights(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_embd=8, n_head=2, vocab_size=30,
                                                                n_positions=16))
    ref.save_pretrained(tmp_path / "pre")
    m = build(validate({"model": {"kind": "hf", "pretrained": str(tmp_path / "pre"), "block_size": 8}}).model, 20)
    x = torch.randint(20, (2, 8))
    ref.eval()
    assert torch.allclose(m(x)[0], ref(input_ids=x).logits, atol=1e-6)
    assert m.hf.config.resid_pdrop == 0.0  # dropout off by default, also for a pretrained config
    with pytest.raises(ConfigError, match="smaller than the data's 40"):
        build(validate({"model": {"kind": "hf", "pretrained": str(tmp_path / "pre")}}).model, 40)
    tiny_tokenizer(tmp_path / "pre", WORDS)  # the folder's own tokenizer: data.tokenizer=pretrained
    exp = validate({"model": {"kind": "hf", "pretrained": str(tmp_path / "pre")}, "data": {"tokenizer": "pretrained"}})
    assert exp.data.tokenizer == f"hf:{tmp_path / 'pre'}"
    from rayexp.data import get_tokenizer
    assert get_tokenizer(exp.data.tokenizer).vocab_size == 4 + 2 * len(WORDS)


@pytest.mark.parametrize("model, needle", [
    ({"kind": "hf", "hf": {"config": "gtp2"}}, "model.hf.config='gtp2' is not a transformers model type"),
    ({"kind": "hf", "hf": {"config": "gpt2", "n_layers": 2}}, "model.hf.n_layers: not a field of GPT2Config"),
    ({"kind": "hf", "pretrained": "/no/such/model"}, "model.pretrained='/no/such/model' is no local folder"),
])
def test_bad_hf_models_are_one_line_config_errors(model, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        build(validate({"model": model}).model, 20)
    assert "\n" not in str(e.value)


def test_a_sweep_with_a_bad_hf_model_stops_before_ray(in_tmp, capsys):
    from rayexp.sweep.__main__ import main

    assert main(["model.kind=hf", "model.hf.config=gpt2", "model.hf.n_embed=8"]) == 2
    err = capsys.readouterr().err
    assert "model.hf.n_embed: not a field of GPT2Config" in err and err.count("\n") == 1


def _train_cli(tmp, *args):
    return subprocess.run([sys.executable, "-m", "rayexp.train", *args, "--no-mlflow", f"output_dir={tmp}/out",
                           f"data.cache_dir={tmp}/cache"], cwd=tmp, capture_output=True, text=True, timeout=300)


def test_hf_gpt2_from_config_trains_50_steps_through_the_cli(tmp_path):
    out = _train_cli(tmp_path, "model.kind=hf", "model.hf.config=gpt2", "model.hf.n_layer=2", "model.hf.n_embd=64",
                     "model.hf.n_head=2", "model.block_size=32", "train.steps=50", "train.eval_every=50",
                     "train.eval_batches=2", "train.batch_size=8", "train.warmup=5", "optimizer.lr=3e-3")
    assert out.returncode == 0, out.stderr
    vals = [float(line.split("val ")[1].split()[0]) for line in out.stdout.splitlines() if " val " in line]
    assert "final: status=finished step=50" in out.stdout and len(vals) == 2
    assert vals[-1] < 0.7 * vals[0], vals  # from ln(256) ≈ 5.5 to about 3


def _parquet_task(path, n=600, seed=0):
    """Labelled sentences: label 1 when the word 'cat' occurs (about half of them)."""
    rng = np.random.default_rng(seed)
    rows = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(n)]
    pq.write_table(pa.table({"text": rows, "label": [int("cat" in r.split()) for r in rows]}), path)


def test_roberta_classifier_beats_chance_on_a_parquet_task(tmp_path):
    _parquet_task(tmp_path / "cls.parquet")
    tok = tiny_tokenizer(tmp_path / "tok", WORDS)
    exp = load_experiment(None, [
        "model.kind=hf", "model.hf.config=roberta", "model.hf.head=sequence_classification",
        "model.hf.num_hidden_layers=2", "model.hf.hidden_size=32", "model.hf.num_attention_heads=2",
        "model.hf.intermediate_size=64", "model.block_size=12", f"data.corpus=parquet:{tmp_path / 'cls.parquet'}",
        "data.label_column=label", f"data.tokenizer=hf:{tok}", "data.val_fraction=0.2", "train.steps=75",
        "train.eval_every=25", "train.eval_batches=4", "train.warmup=10", "optimizer.lr=3e-3", "train.batch_size=16",
        f"output_dir={tmp_path}/out", f"data.cache_dir={tmp_path}/cache"])
    res = run_training(exp)
    acc = [h["val_accuracy"] for h in res.history if "val_accuracy" in h]
    assert res.status == "finished" and len(acc) == 4
    assert acc[-1] > 0.9 and acc[-1] > acc[0], acc  # chance is about 0.5


def test_clrs_bfs_trains_and_reports_exact_match_accuracy(tmp_path):
    exp = load_experiment(None, [
        "data.corpus=task:bfs", "data.task_nodes=4", "data.task_examples=3000", "model.preset=null",
        "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=32", "train.steps=150",
        "train.eval_every=50", "train.eval_batches=4", "train.warmup=10", "optimizer.lr=3e-3", "train.batch_size=16",
        f"output_dir={tmp_path}/out"])
    res = run_training(exp)
    evals = [(h["val_loss"], h["val_accuracy"]) for h in res.history if "val_accuracy" in h]
    assert len(evals) == 4 and all(0.0 <= a <= 1.0 for _, a in evals)
    assert evals[-1][0] < 0.3 * evals[0][0] and evals[-1][1] > evals[0][1], evals


# -- curvature ---------------------------------------------------------------------------------------
def _hessian_case(tmp_path, kind):
    """A checkpoint of a shrunken HF model on project data: GPT-2 on task:minimum, RoBERTa on a parquet task."""
    hessian = {"batches": 2, "batch_size": 3, "probes": 1, "top_eigs_steps": 80, "slq_steps": 70,
               "grid_points": 400, "dtype": "fp64", "reorth": "full"}
    if kind == "gpt2":
        raw = {"model": {"kind": "hf", "hf": GPT2, "block_size": 8},
               "data": {"corpus": "task:minimum", "task_nodes": 3, "task_examples": 50}}
    else:
        _parquet_task(tmp_path / "cls.parquet", n=40)
        raw = {"model": {"kind": "hf", "hf": {**ROBERTA, "initializer_range": 0.5}, "block_size": 8},  # attention
               # blocks of N(0, 0.02) width-8 weights have curvature ~1e-9: too flat to compare relatively
               "data": {"corpus": f"parquet:{tmp_path / 'cls.parquet'}", "label_column": "label",
                        "tokenizer": f"hf:{tiny_tokenizer(tmp_path / 'tok', WORDS)}"}}
    exp = validate({**raw, "hessian": hessian, "output_dir": str(tmp_path / "out")})
    from rayexp.data import load_data
    data = load_data(exp.data, 8)
    torch.manual_seed(0)
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, build(exp.model, data.vocab_size, data.n_classes, data.pad_id), None, 0, exp,
                    {"vocab_size": data.vocab_size, "n_classes": data.n_classes, "pad_id": data.pad_id})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "roberta"])
def test_hessian_cli_matches_a_dense_hessian(tmp_path, kind):
    """``python -m rayexp.hessian --tasks top_eigs,slq_blocks`` in fp64: λ_max to 1e-6 and every small block's
    SLQ nodes (steps ≥ block size, full reorthogonalization) at eigenvalues of the dense diagonal block."""
    from rayexp.hessian.analyze import fixed_batches
    from rayexp.hessian.__main__ import main

    path = _hessian_case(tmp_path, kind)
    blocks = ("[hf.transformer.h.0.attn.c_attn.weight.q,hf.transformer.h.0.attn.c_attn.bias.v,"
              "hf.transformer.h.0.mlp.c_proj.bias]" if kind == "gpt2" else
              "[hf.roberta.encoder.layer.0.attention.self.query.weight,hf.roberta.encoder.layer.0.attention.self.key.weight,"
              "hf.roberta.encoder.layer.0.attention.self.value.bias,hf.classifier.out_proj.*]")
    assert main(["--checkpoint", path, "--tasks", "top_eigs,slq_blocks", f"blocks={blocks}", "--out",
                 str(tmp_path / "res"), "--no-progress"]) == 0
    z = np.load(tmp_path / "res" / "hessian.npz")
    model, exp, _ = load_model(path, attention="naive", dropout=0.0)
    H = dense_reference(model, fixed_batches(exp, exp.hessian))
    ev = torch.linalg.eigvalsh(H).numpy()
    assert abs(z["top_eigs"][0] - ev[-1]) <= 1e-6 * abs(ev[-1])
    by_name = {b.name: b for b in param_blocks(model)}
    names = list(z["block_names"])
    assert len(names) >= 3 and ("hf.transformer.h.0.attn.c_attn.weight.q" in names if kind == "gpt2" else
                                "hf.roberta.encoder.layer.0.attention.self.key.weight" in names)
    for i, name in enumerate(names):
        b = by_name[name]
        ev_b = torch.linalg.eigvalsh(H[b.slice, b.slice]).numpy()
        nodes = z["block_nodes"][i, 0][z["block_weights"][i, 0] > 1e-10]
        scale = np.abs(ev_b).max()
        assert np.all(np.min(np.abs(nodes[:, None] - ev_b[None, :]), axis=1) <= 1e-6 * scale), name
        assert abs(nodes.max() - ev_b.max()) <= 1e-6 * scale, name


# -- DDP -----------------------------------------------------------------------------------------------
def _ddp_args(tmp):
    return ["model.kind=hf", "model.hf.config=roberta", "model.hf.head=sequence_classification",
            "model.hf.num_hidden_layers=1", "model.hf.hidden_size=16", "model.hf.num_attention_heads=2",
            "model.hf.intermediate_size=32", "model.block_size=12", f"data.corpus=parquet:{tmp}/cls.parquet",
            "data.label_column=label", f"data.tokenizer=hf:{tmp}/tok", "train.steps=8", "train.eval_every=4",
            "train.eval_batches=2", "train.warmup=2", "optimizer.lr=3e-3", "train.log_block_grad_norms=false",
            f"output_dir={tmp}", f"data.cache_dir={tmp}/cache"]


def _ddp_worker(rank, world, port, tmp, out):
    import os
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = run_training(load_experiment(None, _ddp_args(tmp) + ["train.batch_size=4"]), workdir=f"{tmp}/ddp")
        out[rank] = [(h["step"], h.get("train_loss"), h.get("val_loss"), h.get("val_accuracy")) for h in res.history]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_train_an_hf_classifier_like_one_worker_with_doubled_batch(tmp_path):
    """Example batches are drawn per (seed, step) and sliced by rank, so DDP over 2 workers at batch 4 follows
    one worker at batch 8: losses and accuracy (one target per example: the means agree exactly)."""
    import torch.multiprocessing as mp
    from conftest import _free_port

    _parquet_task(tmp_path / "cls.parquet", n=200)
    tiny_tokenizer(tmp_path / "tok", WORDS)
    single = run_training(load_experiment(None, _ddp_args(tmp_path) + ["train.batch_size=8"]),
                          workdir=str(tmp_path / "single"))
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), out), nprocs=2, join=True)
    want = [(h["step"], h.get("train_loss"), h.get("val_loss"), h.get("val_accuracy")) for h in single.history]
    for rank in (0, 1):
        got = out[rank]
        assert [g[0] for g in got] == [w[0] for w in want]
        for g, w in zip(got, want):
            for a, b in zip(g[1:], w[1:]):
                assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-5), (g, w)


# -- sweeps -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sweep_of_hf_gpt2_on_a_clrs_task_logs_accuracy_to_mlflow(in_tmp):
    """Real Ray Tune + MLflow: two lr trials of an HF GPT-2 on task:minimum, optimizing val_accuracy."""
    import ray
    from mlflow.tracking import MlflowClient
    from rayexp.spaces import load_sweep
    from rayexp.sweep.tune import run_sweep

    (in_tmp / "s.yaml").write_text(f"""name: hfsweep
model: {{kind: hf, hf: {{config: gpt2, n_layer: 1, n_embd: 32, n_head: 2}}, block_size: 16}}
data: {{corpus: "task:minimum", task_nodes: 5, task_examples: 400, cache_dir: {in_tmp}/cache}}
train: {{steps: 20, eval_every: 10, eval_batches: 2, log_every: 5, warmup: 2, batch_size: 8, log_block_grad_norms: false}}
optimizer: {{name: adamw, lr: {{grid: [1.0e-3, 3.0e-3]}}}}
seeds: [0]
search: {{algorithm: grid, metric: val_accuracy, mode: max}}
output_dir: {in_tmp}/out
""")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = run_sweep(load_sweep(in_tmp / "s.yaml"), quiet=True)
    finally:
        ray.shutdown()
    assert out.errors == 0
    client = MlflowClient(out.state.uri)
    exp = client.get_experiment_by_name("hfsweep")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`rayexp.kind` = 'trial'")
    assert len(runs) == 2 and {r.data.tags["rayexp.status"] for r in runs} == {"finished"}
    for r in runs:
        hist = client.get_metric_history(r.info.run_id, "val_accuracy")
        assert [m.step for m in hist] == [0, 10, 20] and all(0.0 <= m.value <= 1.0 for m in hist)


@pytest.mark.slow
def test_every_hessian_task_runs_on_an_hf_model(tmp_path):
    """All of HESSIAN_TASKS through the CLI on the HF GPT-2 checkpoint: finite metrics, and Hutchinson's trace
    within 4 standard errors of the dense Hessian's trace."""
    from rayexp.config import HESSIAN_TASKS
    from rayexp.hessian.analyze import fixed_batches
    from rayexp.hessian.__main__ import main

    path = _hessian_case(tmp_path, "gpt2")
    assert main(["--checkpoint", path, "--tasks", ",".join(HESSIAN_TASKS), "--out", str(tmp_path / "all"),
                 "--no-progress", "top_eigs_steps=10", "slq_steps=8", "hutchinson_probes=40", "cauchy_vectors=8",
                 "curvature_steps=4", "blocks=[hf.transformer.h.0.attn.c_attn.weight.*]"]) == 0
    z = np.load(tmp_path / "all" / "hessian.npz")
    metrics = dict(zip(z["metric_names"], z["metric_values"]))
    assert np.isfinite(list(metrics.values())).all() and {"l11", "js_heterogeneity", "lambda_max"} <= set(metrics)
    model, exp, _ = load_model(path, attention="naive", dropout=0.0)
    trace = float(torch.trace(dense_reference(model, fixed_batches(exp, exp.hessian))))
    assert abs(metrics["hutchinson_trace"] - trace) <= 4 * metrics["hutchinson_trace_se"], (metrics["hutchinson_trace"], trace)

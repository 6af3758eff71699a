"""Seed fidelity of the curvature engine (issue 18), each item against an independent reference: dense Hessians
(torch.autograd.functional.hessian), the training rotation built densely from the optimizer's own ``Rotation``,
numpy transcriptions of the seeds' procedures, and the seeds' block lists written out by hand."""
import copy

import numpy as np
import pytest
import torch
from test_hessian import dense_reference, make_batches, make_model

from rayexp.config import HESSIAN_PRESETS, ConfigError, HessianConfig, validate
from rayexp.hessian import analyze
from rayexp.hessian.analyze import training_rotation
from rayexp.hessian.estimators import block_curvature, block_top_eigs
from rayexp.hessian.hvp import HVP
from rayexp.hessian.lanczos import first_positive, power_runs
from rayexp.hessian.operator import Block, FlatRotation, FunctionOperator, Operator
from rayexp.hessian.probes import probe
from rayexp.hessian.slq import Quadrature, block_densities
from rayexp.hessian.tasks import rule_blocks, select_blocks


def operator(model, batches, reduce="mean"):
    return Operator(HVP(model, batches, mode="fwd_rev", dtype="fp64"), reduce=reduce)


# -- l11_rotation: train ---------------------------------------------------------------------------------
def experiment(kind: str):
    """An experiment whose AdamW has weight decay, so its parameter order (matrices first) is not named order."""
    return validate({"model": {"preset": None, "n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8},
                     "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1},
                     "rotation": {"kind": kind, "seed": 5, "update_every": 1}})


def dense_training_R(model, exp, steps_on=None) -> torch.Tensor:
    """R (d × d) in named_parameters order, column i = the optimizer's ``Rotation.rotate`` of e_i, its tensors
    indexed in named_parameters order (the rotation's index, whatever the param groups' order)."""
    from rayexp.optim import build_optimizer
    opt = build_optimizer(model, exp.optimizer, exp.rotation)
    if steps_on is not None:
        steps_on(opt)
    named = list(model.named_parameters())
    order = [p for _, p in named]
    pos = {id(p): k for k, (_, p) in enumerate(named)}
    sizes = [p.numel() for _, p in named]
    offsets = np.cumsum([0] + sizes)
    d = int(offsets[-1])
    R = torch.zeros(d, d, dtype=torch.float64)
    states = [opt.state.get(p, {}) for p in order]
    for i in range(d):
        e = torch.zeros(d, dtype=torch.float64)
        e[i] = 1.0
        xs = [e[offsets[pos[id(p)]]:offsets[pos[id(p)] + 1]].reshape(p.shape) for p in order]
        ys = opt.rotation.rotate(list(range(len(order))), xs, states)
        for p, y in zip(order, ys):
            k = pos[id(p)]
            R[offsets[k]:offsets[k + 1], i] = y.reshape(-1).double()
    return R, opt


def adam_steps(model, batches):
    """Two AdamW steps on the model's loss (eigenbasis bases come from these gradients)."""
    from rayexp.hessian.hvp import token_cross_entropy

    def run(opt):
        for b in batches:
            opt.zero_grad()
            token_cross_entropy(model, b).backward()
            opt.step()
    return run


@pytest.mark.parametrize("kind", ["per_tensor", "global", "eigenbasis", "randperm"])
def test_training_rotation_is_the_optimizers_R_and_rotates_the_operator(kind, tmp_path):
    model, batches = make_model("gpt"), make_batches()
    exp = experiment(kind)
    trained = copy.deepcopy(model)  # eigenbasis: two steps give the bases, saved with the optimizer state
    R, opt = dense_training_R(trained, exp, adam_steps(trained, batches) if kind == "eigenbasis" else None)
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    name_of = {id(p): n for n, p in trained.named_parameters()}
    opt_order = [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
    assert opt_order != [n for n, _ in trained.named_parameters()]  # the mapping matters
    assert torch.allclose(R @ R.T, torch.eye(R.shape[0], dtype=torch.float64), atol=1e-5)
    assert not torch.allclose(R, torch.eye(R.shape[0], dtype=torch.float64))
    flat = training_rotation(trained, exp, tmp_path).to("cpu")
    op = operator(trained, batches)
    I = torch.eye(op.d, dtype=torch.float64)
    assert torch.allclose(flat.apply(op.products, I).T, R, atol=1e-12)  # rows of apply(I) are R e_i
    H = dense_reference(trained, batches)
    u = torch.randn(op.d, dtype=torch.float64)
    Hr = R @ H @ R.T
    # R here is the optimizer's fp32 draw (eigenbasis: its fp32 bases, exactly); the Hessian's is the float64
    # draw from the same seed, which differs by fp32 rounding (~4e-8 per entry)
    tol = 1e-9 if kind == "eigenbasis" else 1e-6
    assert torch.allclose(op.rotated(flat).matvec(u), Hr @ u, atol=tol * float(H.abs().max()))


def test_l11_task_in_the_training_basis_equals_dense_norms():
    """``l11_rotation: train`` through analyze: ‖RHRᵀ‖₁,₁ with the training R (dense) within 10% (k = 300);
    a model trained unrotated reports its native norm as the training-basis one."""
    model, batches = make_model("gpt"), make_batches()
    exp = experiment("per_tensor")
    R, _ = dense_training_R(model, exp)
    H = dense_reference(model, batches)
    cfg = HessianConfig(tasks=["l11"], cauchy_vectors=300, l11_rotation="train", dtype="fp64", mode="fwd_rev")
    m = analyze(model, batches, cfg, progress=False, train_rotation=training_rotation(model, exp))["metrics"]
    assert abs(m["l11"] / float(H.abs().sum()) - 1) < 0.10
    assert abs(m["l11_rotated"] / float((R @ H @ R.T).abs().sum()) - 1) < 0.10
    assert m["l11_rotated"] > 1.2 * m["l11"]
    plain = analyze(model, batches, cfg, progress=False, train_rotation=training_rotation(model, experiment("none")))
    pm = plain["metrics"]
    assert pm["l11_rotated"] == pm["l11"] and pm["l11_rotated_iqr"] == pm["l11_iqr"] and plain["hvps"] == 300


def test_l11_train_without_a_training_rotation_is_one_line():
    model, batches = make_model("mlp"), make_batches()
    with pytest.raises(ConfigError, match="l11_rotation=train needs the rotation"):
        analyze(model, batches, HessianConfig(tasks=["l11"], l11_rotation="train"), progress=False)


def test_l11_checkpoint_path_rebuilds_the_training_rotation(in_tmp):
    """analyze_checkpoint on a checkpoint trained with a per-tensor rotation: its rotated norm is the one of
    the R the optimizer rebuilds (same rotation.seed), not of a fresh rotation keyed by hessian.seed."""
    from rayexp.data import load_tokens
    from rayexp.hessian import analyze_checkpoint
    from rayexp.models import build
    from rayexp.train.checkpoint import save_checkpoint

    exp = validate({"model": {"preset": None, "n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8},
                    "optimizer": {"weight_decay": 0.1}, "rotation": {"kind": "per_tensor", "seed": 7},
                    "hessian": {"tasks": ["l11"], "batches": 1, "batch_size": 2, "cauchy_vectors": 4,
                                "l11_rotation": "train", "dtype": "fp64", "seed": 1}})
    vocab = load_tokens(exp.data, 8).vocab_size
    torch.manual_seed(0)
    path = str(in_tmp / "ckpt")
    save_checkpoint(path, build(exp.model, vocab), None, 0, exp, {"vocab_size": vocab})
    got = analyze_checkpoint(path, progress=False)[0]["metrics"]
    fresh = analyze_checkpoint(path, exp.hessian.model_copy(update={"l11_rotation": "per_tensor"}), progress=False,
                               out_dir=str(in_tmp / "fresh"))[0]["metrics"]
    assert got["l11"] == pytest.approx(fresh["l11"], rel=1e-12)  # same native samples
    assert got["l11_rotated"] != pytest.approx(fresh["l11_rotated"], rel=1e-3)  # another R


# -- seed 003: power iteration with deflation ----------------------------------------------------------------
def pyhessian_numpy(H: np.ndarray, starts: list, top_n=5, iters=100, tol=1e-3) -> float:
    """Independent numpy transcription of tom4649/gradient-heterogeneity pyhessian/hessian_nlp.py:94-150 with
    get_maximum=True (utils.py:46-55 normalization with +1e-6, :97-104 deflation)."""
    norm = lambda v: v / (np.sqrt(v @ v) + 1e-6)  # noqa: E731
    found, eigs = [], []
    for i in range(top_n):
        v, eig = norm(starts[i].copy()), None
        for _ in range(iters):
            for u in found:
                v = v - (v @ u) * u
            v = norm(v)
            hv = H @ v
            tmp = hv @ v
            v = norm(hv)
            if eig is None:
                eig = tmp
            elif abs(eig - tmp) / (abs(eig) + 1e-6) < tol:
                break
            else:
                eig = tmp
        if eig > 0:
            return eig
        eigs.append(eig)
        found.append(v)
    return max(eigs)


def spectrum_matrix(eigs, seed=0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigs), len(eigs))))
    return q @ np.diag(eigs) @ q.T


@pytest.mark.parametrize("eigs", [
    [9.0, 3.0, -1.0, 0.5, 0.1, 0.05, 0.01, -0.02],  # dominant positive: the first one
    [-9.0, 3.0, 1.5, 0.5, 0.1, -0.05, 0.01, 0.0],  # dominant negative: the second one found (3)
    [-9.0, -7.0, -5.0, -3.0, -2.0, -1.0, -0.5, -0.1],  # all negative: the largest of the five found
])
def test_power_runs_match_a_numpy_transcription_of_the_seed(eigs):
    H = spectrum_matrix(eigs)
    op = FunctionOperator(lambda v: torch.from_numpy(H) @ v, len(eigs))
    start = lambda i: probe(len(eigs), "gaussian", 3, i, "t")  # noqa: E731
    found = power_runs(op, [start], top_n=5, iters=100, tol=1e-3, stop_at_positive=True)[0]
    ref = pyhessian_numpy(H, [start(i).numpy() for i in range(5)])
    assert first_positive(found) == pytest.approx(ref, rel=1e-10)
    assert first_positive(found) == pytest.approx(max(e for e in eigs if e > 0) if eigs[1] > 0 else -2.0, rel=2e-2)


def test_block_curvature_power_matches_the_seed_on_each_dense_block_per_batch():
    """block_curvature(method=power): per batch and block, the numpy transcription on the dense H_bb from the
    same start vectors, and within the seed's tolerance of the dense λ_max where that is dominant."""
    model, batches = make_model("cnn"), make_batches()
    op = operator(model, batches)
    blocks = [b for b in op.blocks if b.size <= 200]
    power = dict(top_n=5, iters=100, tol=1e-3)
    arr = block_curvature(op, blocks, seed=2, method="power", power=power)
    lanczos = block_curvature(op, blocks, steps=250, seed=2)
    for i, batch in enumerate(batches):
        H1 = dense_reference(model, [batch]).numpy()
        for j, b in enumerate(blocks):
            Hb = H1[b.slice, b.slice]
            starts = [probe(b.size, "gaussian", 2, k, f"block_power/{b.name}").numpy() for k in range(5)]
            assert arr[i, j, 0] == pytest.approx(pyhessian_numpy(Hb, starts, **power), rel=1e-8, abs=1e-14)
            assert arr[i, j, 1] == lanczos[i, j, 1]
    # a Rayleigh quotient never exceeds λ_max; the first positive of the deflated top 5 is close to it here
    assert np.all(arr[..., 0] <= lanczos[..., 0] + 1e-9 * np.abs(lanczos[..., 0]).max())
    assert np.median(np.abs(arr[..., 0] / lanczos[..., 0] - 1)) < 0.05


def test_block_lambda_max_is_algebraic_on_negative_blocks_and_power_is_first_positive():
    """Landed behaviour, checked: Lanczos block λ_max is the largest algebraic eigenvalue (negative spectra
    included); the seed's power option returns the first positive of the deflated top 5."""
    A = spectrum_matrix([-9.0, -4.0, -2.0, -1.0, -0.5, -0.2])
    B = spectrum_matrix([-8.0, 5.0, 1.0, 0.2, 0.1, 0.05], seed=1)
    H = torch.from_numpy(np.block([[A, np.zeros((6, 6))], [np.zeros((6, 6)), B]]))
    op = FunctionOperator(lambda v: H @ v, 12)
    blocks = [Block("a", "a", 0, 6), Block("b", "b", 6, 12)]
    assert np.allclose(block_top_eigs(op, blocks, steps=6), [-0.2, 5.0])
    from rayexp.hessian.estimators import block_power
    got = block_power(op, blocks, top_n=5, iters=200, tol=1e-6)
    assert got[0] == pytest.approx(-0.5, rel=1e-3)  # five found (-9, -4, -2, -1, -0.5): the largest of them
    assert got[1] == pytest.approx(5.0, rel=1e-3)


# -- reduce ----------------------------------------------------------------------------------------------------
def test_reduce_sum_is_n_batches_times_mean():
    model, batches = make_model("gpt"), make_batches(n=3)
    H = dense_reference(model, batches)
    mean, total = operator(model, batches), operator(model, batches, reduce="sum")
    u = torch.randn(mean.d, dtype=torch.float64)
    assert torch.allclose(mean.matvec(u), H @ u, atol=1e-10)
    assert torch.allclose(total.matvec(u), 3 * (H @ u), atol=1e-9)
    cfg = dict(tasks=["top_eigs"], top_eigs_steps=40, dtype="fp64", mode="fwd_rev")
    a = analyze(model, batches, HessianConfig(**cfg), progress=False)["metrics"]
    b = analyze(model, batches, HessianConfig(**cfg, reduce="sum"), progress=False)["metrics"]
    assert b["lambda_max"] == pytest.approx(3 * a["lambda_max"], rel=1e-9)
    assert a["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)


# -- seed 001: blocks and JS normalizations -------------------------------------------------------------------
SEED001_GPT2 = ["transformer.wte.weight"] + [  # config/train_gpt2_small.py:44-69, wq/wk/wv as c_attn's q/k/v
    f"transformer.h.{i}.{t}" for i in (0, 3, 7, 11) for t in (
        "attn.c_attn.weight.q", "attn.c_attn.weight.k", "attn.c_attn.weight.v", "attn.c_proj.weight",
        "mlp.c_fc.weight", "mlp.c_proj.weight")]


def gpt_blocks(n_layer: int) -> list:
    from rayexp.hessian.hvp import param_blocks
    from rayexp.models import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=16, block_size=4, n_layer=n_layer, n_head=1, n_embd=4))
    return param_blocks(model)


def test_seed_block_rules_list_the_seeds_blocks():
    blocks12 = gpt_blocks(12)
    assert sorted(b.name for b in rule_blocks(blocks12, "seed001")) == sorted(SEED001_GPT2)
    seed003 = ["transformer.wte.weight"] + [f"transformer.h.{i}.{t}" for i in (0, 6, 11) for t in (
        "ln_1.weight", "attn.c_attn.weight.q", "attn.c_attn.weight.k", "attn.c_attn.weight.v", "mlp.c_fc.weight",
        "ln_2.weight", "mlp.c_proj.weight")]
    assert sorted(b.name for b in select_blocks(blocks12, "seed003")) == sorted(seed003)
    two = {b.name for b in rule_blocks(gpt_blocks(2), "seed001")}  # layers 0, 3, 7, 11 of 12 → 0, 0, 1, 1 of 2
    assert len(two) == 13 and "transformer.h.1.mlp.c_proj.weight" in two and not any("bias" in n for n in two)
    with pytest.raises(ConfigError, match="has none"):
        rule_blocks([Block("conv.weight", "conv.weight", 0, 4)], "seed001")
    with pytest.raises(ConfigError, match="allowed: seed001, seed003"):
        validate({"hessian": {"blocks": "seed002"}})


def test_js_normalizations_remove_scale_and_top10_is_the_tenth_ritz_value():
    nodes = np.arange(1.0, 21.0)[None, :].repeat(2, 0) * np.array([[1.0], [2.0]])
    q = Quadrature(nodes, np.full_like(nodes, 1 / 20))
    assert q.scale("max_abs") == 40.0 and q.scale("top10") == pytest.approx(np.mean([11.0, 22.0]))
    a = Quadrature(np.array([[0.5, 1.0, 3.0] + [0.1] * 9]), np.array([[0.3, 0.3, 0.1] + [0.3 / 9] * 9]))
    b = Quadrature(a.nodes * 50, a.weights)  # the same shape at 50× the scale
    quads = {"a": a, "b": b}
    assert block_densities(quads, 1e-5, 4000)[3] > 0.5
    for by in ("max_abs", "top10"):
        assert block_densities({k: v.normalized(by) for k, v in quads.items()}, 1e-5, 4000)[3] < 1e-9


def test_slq_blocks_reports_rayexps_js_and_both_shape_normalizations():
    model, batches = make_model("gpt"), make_batches()
    cfg = HessianConfig(preset="seed001", batches=2, probes=2, slq_steps=8, grid_points=2000, dtype="fp64",
                        mode="fwd_rev", tasks=["slq_blocks"])
    res = analyze(model, batches, cfg, progress=False)
    names = list(res["arrays"]["block_names"])
    assert names == [b.name for b in rule_blocks(operator(model, batches).blocks, "seed001")]
    m = res["metrics"]
    assert all(0 < m[k] < np.sqrt(np.log(2)) for k in ("js_heterogeneity", "js_heterogeneity_max_abs",
                                                        "js_heterogeneity_top10"))
    # reduce: sum (the seed's scale): block nodes are n_batches × those of the mean loss
    mean = analyze(model, batches, HessianConfig(**{**cfg.model_dump(), "reduce": "mean"}), progress=False)
    assert np.allclose(res["arrays"]["block_nodes"], 2 * mean["arrays"]["block_nodes"], rtol=1e-8, atol=1e-12)


# -- seed 000 preset end to end --------------------------------------------------------------------------------
def test_seed000_preset_reports_the_seeds_headlines_against_dense_references():
    """Half-IQR ‖H‖₁,₁ with k = 50 (median from the same samples), max|λ| after 50 Lanczos steps, ‖H‖_F² =
    E‖Hv‖² over 50 Rademacher vectors (the seed's compute_frobenius_norm), each against the dense Hessian."""
    model, batches = make_model("gpt"), make_batches()
    H = dense_reference(model, batches)
    exp = experiment("per_tensor")
    cfg = HessianConfig(preset="seed000", dtype="fp64", mode="fwd_rev")
    assert (cfg.cauchy_vectors, cfg.l11_estimator, cfg.top_eigs_steps, cfg.hutchinson_probes) == (50, "iqr", 50, 50)
    m = analyze(model, batches, cfg, progress=False, train_rotation=training_rotation(model, exp))["metrics"]
    exact = float(H.abs().sum())
    assert abs(m["l11"] / exact - 1) < 0.15 and abs(m["l11_median"] / exact - 1) < 0.15
    assert m["l11_over_d"] == pytest.approx(m["l11"] / H.shape[0])
    ev = torch.linalg.eigvalsh(H)
    assert m["lambda_max_abs"] == pytest.approx(float(ev.abs().max()), rel=1e-6)
    fro2 = float((H ** 2).sum())
    off = float((H @ H).pow(2).sum() - (H @ H).diagonal().pow(2).sum())
    assert abs(m["frobenius_sq"] - fro2) <= 4 * (2 * off / 50) ** 0.5


# -- presets ---------------------------------------------------------------------------------------------------
def test_presets_set_their_fields_and_explicit_fields_override():
    for name, values in HESSIAN_PRESETS.items():
        cfg = HessianConfig(preset=name)
        for k, v in values.items():
            got = getattr(cfg, k)
            assert all(got[t] == v[t] for t in v) if k == "reorth" else got == v, (name, k)
    cfg = validate({"hessian": {"preset": "seed001", "slq_steps": 20, "blocks": ["*wte*"]}}).hessian
    assert (cfg.slq_steps, cfg.blocks, cfg.reduce, cfg.probes) == (20, ["*wte*"], "sum", 10)
    again = validate(validate({"hessian": {"preset": "seed003", "power_top_n": 3}}).to_dict()).hessian
    assert (again.power_top_n, again.curvature_method) == (3, "power")  # a saved config keeps its values
    with pytest.raises(ConfigError, match=r"hessian\.preset.*seed000.*seed001.*seed003"):
        validate({"hessian": {"preset": "seed002"}})


def test_cli_lists_the_presets_and_applies_one_over_the_checkpoints_section(capsys):
    import argparse

    from rayexp.hessian.__main__ import _config, main
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in HESSIAN_PRESETS) and "curvature_method=power" in out
    base = HessianConfig(slq_steps=7, batches=3)
    args = argparse.Namespace(tasks=None, actors=None, overrides=["preset=seed001", "probes=2"])
    cfg = _config(args, base)
    assert (cfg.reduce, cfg.slq_steps, cfg.batches, cfg.probes, cfg.blocks) == ("sum", 100, 60, 2, "seed001")
    with pytest.raises(ConfigError, match="hessian.preset"):
        _config(argparse.Namespace(tasks=None, actors=None, overrides=["preset=nope"]), base)


def test_sweep_dry_run_accepts_a_hessian_preset_override(capsys):
    from rayexp.spaces import load_sweep
    from rayexp.sweep.__main__ import main
    assert main(["hessian.preset=seed001", "--dry-run"]) == 0
    assert "trials" in capsys.readouterr().out
    spec = load_sweep(None, ["hessian.preset=seed001", "hessian.probes=3"])
    assert (spec.base.hessian.reduce, spec.base.hessian.probes, spec.base.hessian.blocks) == ("sum", 3, "seed001")


# -- sweeps/seeds: GPT-2 124M files, and a CPU variant of each --------------------------------------------------
SWEEPS = {  # file → (its hessian preset, overrides shrinking the preset's estimator sizes for a CPU test)
    "seed000_l11.yaml": ("seed000", ["hessian.cauchy_vectors=6", "hessian.top_eigs_steps=4",
                                     "hessian.hutchinson_probes=4"]),
    "seed001_spectrum.yaml": ("seed001", ["hessian.probes=1", "hessian.slq_steps=4"]),
    "seed003_curvature.yaml": ("seed003", ["hessian.power_iters=4", "hessian.power_top_n=2"]),
}
CPU = ["model.preset=gpt2-tiny", "model.attention=naive", "data.corpus=builtin", "data.tokenizer=bytes",
       "train.steps=2", "train.batch_size=2", "train.grad_accum=1", "train.eval_every=2", "train.eval_batches=1",
       "train.warmup=0", "train.compile=false", "train.precision=fp32", "train.device=cpu", "resources.workers=1",
       "resources.gpus_per_worker=0", "resources.cpus_per_worker=1", "hessian.device=cpu", "hessian.batches=1",
       "hessian.batch_size=2"]


def sweep_file(name):
    from pathlib import Path
    return str(Path(__file__).resolve().parents[1] / "sweeps" / "seeds" / name)


@pytest.mark.parametrize("name", list(SWEEPS))
def test_seed_sweep_files_dry_run_at_gpt2_124m_scale(name, capsys):
    from rayexp.spaces import load_sweep
    from rayexp.sweep.__main__ import main
    assert main([sweep_file(name), "--dry-run"]) == 0
    assert "trials" in capsys.readouterr().out
    spec = load_sweep(sweep_file(name))
    assert spec.base.model.preset == "gpt2-124m" and spec.base.data.corpus.startswith("hf:")
    assert spec.base.hessian.preset == SWEEPS[name][0] and spec.base.hessian.after_training


@pytest.mark.parametrize("name", list(SWEEPS))
def test_seed_sweep_files_run_small_on_the_cpu(name, in_tmp):
    """The file's last trial (seed000: the rotated arm) trained 2 steps on gpt2-tiny, then its hessian section
    (the preset, estimator sizes shrunk) on the checkpoint, as ``hessian.after_training`` runs it."""
    from rayexp.hessian import analyze_checkpoint
    from rayexp.spaces import load_sweep
    from rayexp.sweep.plan import plan
    from rayexp.train.loop import run_training
    spec = load_sweep(sweep_file(name), CPU + SWEEPS[name][1] + [f"output_dir={in_tmp}"])
    exp = plan(spec, "test")[-1].exp
    res = run_training(exp)
    m = analyze_checkpoint(res.checkpoint_dir, progress=False)[0]["metrics"]
    want = {"seed000": ["l11", "l11_median", "l11_rotated", "lambda_max_abs", "frobenius_sq"],
            "seed001": ["js_heterogeneity", "js_heterogeneity_top10", "slq_moment1"],
            "seed003": ["curvature_gradnorm_logcorr", "grad_heterogeneity"]}[SWEEPS[name][0]]
    assert all(np.isfinite(m[k]) for k in want), {k: m.get(k) for k in want}
    if name == "seed000_l11.yaml":
        assert exp.rotation.kind == "randperm" and m["l11_rotated"] != m["l11"]


def test_memory_plan_counts_the_rotation_and_gpt2_124m_fits():
    """The plan's l11 vectors include the rotation's float64 matrices (counted from what it holds, checked
    against the U/V sizes from the shapes); on GPT-2 124M the seed000 l11 task keeps < 40 GiB."""
    from rayexp.config import RotationConfig
    from rayexp.hessian.tasks import TASKS
    from rayexp.models import GPT, GPTConfig
    from rayexp.optim.rotation import matrix_sides, rotation_memory
    op = operator(make_model("gpt"), make_batches())
    rot = FlatRotation.of_kind("per_tensor", 0, op.products.names, op.products.shapes)
    sides = [matrix_sides(s, 8192) for s in op.products.shapes]
    assert rot.nbytes == 8 * sum(k * k for mn in sides for k in mn if k)
    with torch.device("meta"):
        big = GPT(GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    shapes = [p.shape for p in big.parameters()]
    d = sum(p.numel() for p in big.parameters())
    rot_bytes = rotation_memory(shapes, RotationConfig(kind="per_tensor"), 8)
    cfg = HessianConfig(preset="seed000")
    keep = TASKS["l11"].vectors(cfg, {"l11_rotation": rot_bytes / (8 * d)}) * 8 * d
    assert keep == pytest.approx((3 + 25 + 2) * 8 * d + rot_bytes)
    assert 2 ** 30 < rot_bytes and keep < 40 * 2 ** 30
    curv = TASKS["block_curvature"].vectors(HessianConfig(preset="seed003"), {"curv_share": 0.5})
    assert curv == 4 + 6 * 0.5  # the power iterate and up to 5 deflation vectors per block


def test_js_uses_cell_masses_so_a_wide_block_cannot_hide_a_narrow_one():
    """Cell probabilities sum to 1 on any grid and equal φ × spacing where the grid resolves σ; with one block
    spanning 10⁴× the others' range (a near-zero λ₁₀), the JS distances stay finite and the two narrow
    identical blocks stay at distance 0."""
    q = Quadrature(np.array([[0.0, 1.0, 2.0]]), np.array([[0.2, 0.5, 0.3]]))
    fine = np.linspace(-1, 3, 40_001)
    assert np.allclose(q.masses(fine, 1e-3), q.density(fine, 1e-3)[1] * (fine[1] - fine[0]), atol=1e-9)
    assert q.masses(np.linspace(-1, 3, 7), 1e-5).sum() == pytest.approx(1.0)
    wide = Quadrature(q.nodes * 1e4, q.weights)
    _, _, mat, het = block_densities({"a": q, "b": q, "w": wide}, 1e-5, 2000)
    assert np.isfinite(mat).all() and mat[0, 1] < 1e-12 and mat[0, 2] > 0.5 and np.isfinite(het)

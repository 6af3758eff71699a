"""Edges no earlier test reached (issue 16): the three-term Lanczos recurrence alone, each divergence rule on
its own, the linear and constant schedules, ``checkpoint_every``, bf16 training, a resume that really starts
at its checkpoint, DeepSpeed's refusal of whole-tensor optimizers, the 1-1 median/IQR scale."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_hessian import numpy_lanczos, spread_matrix

from rayexp.config import ConfigError
from rayexp.hessian.lanczos import lanczos, lanczos_runs, top_eigs
from rayexp.hessian.operator import FunctionOperator
from rayexp.spaces import load_experiment
from rayexp.train.launch import check_strategy
from rayexp.train.loop import _Loop, lr_at, run_training

TINY = ["model.preset=null", "model.n_layer=1", "model.n_head=1", "model.n_embd=8", "model.block_size=8",
        "train.batch_size=4", "train.eval_batches=1", "train.log_every=1", "train.warmup=0",
        "train.log_block_grad_norms=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny(tmp, cache, *overrides):
    return load_experiment(None, TINY + [f"output_dir={tmp}", f"data.cache_dir={cache}", *overrides])


class Collect:
    def __init__(self):
        self.rows = []

    def report(self, step, metrics, checkpoint_dir=None):
        self.rows.append((step, dict(metrics), checkpoint_dir))


# -- Lanczos without reorthogonalization ----------------------------------------------------------------
def test_three_term_recurrence_alone_gives_the_extremes_of_eigvalsh():
    """12 steps on a 30×30 matrix whose ends are well separated: the recurrence is still orthogonal to ~1e-12,
    so reorth=none must give the top-3 and bottom-3 of eigvalsh (a flipped β·q_{j−1} gave 505/422/358)."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    ev = np.concatenate([[-40.0, -30.0, -20.0], np.linspace(-1.0, 1.0, 24), [20.0, 30.0, 40.0]])
    A = (q * ev) @ q.T
    top, bottom = top_eigs(FunctionOperator.numpy(lambda v: A @ v, 30), k=3, steps=12, which="both", reorth="none")
    assert np.allclose(top, [40, 30, 20], rtol=1e-8) and np.allclose(bottom, [-40, -30, -20], rtol=1e-8)


def test_lockstep_runs_without_reorthogonalization_each_follow_the_numpy_recurrence():
    """Three runs advancing in lockstep (one product call for all, as lanczos_batch did) keep their own
    α, β, q_{j−1}: each equals the independent numpy transcription of its own start vector."""
    A = spread_matrix()
    v0s = np.random.default_rng(4).standard_normal((3, 30))
    op = FunctionOperator.numpy(lambda v: A @ v, 30)
    for chunk in (0, 2):
        tris = lanczos_runs(op, [torch.from_numpy(v) for v in v0s], 8, "none", chunk=chunk)
        for T, v0 in zip(tris, v0s):
            a_ref, b_ref = numpy_lanczos(A, v0, 8)
            assert np.allclose(T.alpha, a_ref, atol=1e-10) and np.allclose(T.beta, b_ref, atol=1e-10)


def test_lanczos_stops_on_an_invariant_subspace_with_exact_ritz_values():
    """A start vector in the span of 3 eigenvectors: β_3 = 0, so T is 3×3 and its eigenvalues are exact."""
    q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((20, 20)))
    A = (q * np.arange(1.0, 21.0)) @ q.T
    v0 = q[:, [2, 9, 15]] @ np.array([1.0, -2.0, 0.5])
    for reorth in ("none", "full", "selective"):
        T = lanczos(FunctionOperator.numpy(lambda v: A @ v, 20), torch.from_numpy(v0), 10, reorth)
        assert T.steps == 3 and np.allclose(np.sort(T.eig()[0]), [3.0, 10.0, 16.0], atol=1e-10)
        assert np.allclose(T.eig()[1], np.array([1.0, 4.0, 0.25]) / 5.25, atol=1e-10)


# -- divergence: one case per rule ----------------------------------------------------------------------
def _detector(tmp, cache, factor=10.0):
    from rayexp.data import load_data
    from rayexp.models import block_size
    exp = tiny(tmp, cache, f"train.diverge_factor={factor}")
    return _Loop(exp, None, None, None, load_data(exp.data, block_size(exp.model)), None, None, 0, 1, Path(tmp), None,
                 {"step": 0, "history": [], "init_loss": None, "tokens": 0})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_diverges_even_below_ten_times_the_first(tmp_path, cache, bad):
    loop = _detector(tmp_path, cache)
    assert not loop.diverged(5.0)
    assert loop.diverged(bad)


def test_a_loss_above_ten_times_the_first_step_diverges_and_below_it_does_not(tmp_path, cache):
    loop = _detector(tmp_path, cache)
    assert [loop.diverged(x) for x in (2.0, 19.9, 20.0, 20.1)] == [False, False, False, True]
    three = _detector(tmp_path, cache, factor=3.0)
    assert [three.diverged(x) for x in (2.0, 5.9, 6.1)] == [False, False, True]


def test_the_reference_loss_is_the_first_steps_and_is_never_reset(tmp_path, cache):
    """2 → 15 → 25: 25 is over 10 × 2 (a detector that re-anchors on each step's loss would let it pass)."""
    loop = _detector(tmp_path, cache)
    assert [loop.diverged(x) for x in (2.0, 15.0, 18.0, 25.0)] == [False, False, False, True]
    assert loop.init_loss == 2.0


def test_a_resumed_run_keeps_the_first_runs_reference_loss(tmp_path, cache):
    """The checkpoint carries init_loss: a resumed run measures divergence against step 1 of the whole run."""
    exp = tiny(tmp_path, cache, "train.steps=4", "train.eval_every=2", "optimizer.lr=1e-3")
    first = run_training(exp, workdir=str(tmp_path / "a"))
    from rayexp.train.checkpoint import load_state
    state = load_state(first.checkpoint_dir)
    assert state["init_loss"] == pytest.approx(first.history[1]["train_loss"])


# -- schedules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "constant", "cosine"])
def test_schedules_follow_their_formulas(schedule):
    exp = load_experiment(None, ["train.steps=50", "train.warmup=10", "optimizer.lr=2.0", "train.min_lr_ratio=0.25",
                                 f"train.schedule={schedule}"])
    for step in range(1, 51):
        frac = (step - 10) / 40
        decay = {"linear": 1 - frac, "constant": 1.0, "cosine": 0.5 * (1 + np.cos(np.pi * frac))}[schedule]
        want = 2.0 * step / 10 if step <= 10 else (2.0 if schedule == "constant" else 2.0 * (0.25 + 0.75 * decay))
        assert lr_at(step, exp) == pytest.approx(want, rel=1e-12), step


def test_the_logged_lr_is_the_schedules(tmp_path, cache):
    exp = tiny(tmp_path, cache, "train.steps=6", "train.eval_every=6", "train.schedule=linear", "train.warmup=2",
               "optimizer.lr=0.01", "train.min_lr_ratio=0.0")
    rep = Collect()
    run_training(exp, reporter=rep, workdir=str(tmp_path))
    logged = {s: m["lr"] for s, m, _ in rep.rows if s > 0}
    assert logged == pytest.approx({1: 0.005, 2: 0.01, 3: 0.0075, 4: 0.005, 5: 0.0025, 6: 0.0})


# -- checkpoints, bf16 ---------------------------------------------------------------------------------
def test_checkpoint_every_is_independent_of_eval_every(tmp_path, cache):
    rep = Collect()
    res = run_training(tiny(tmp_path, cache, "train.steps=9", "train.eval_every=9", "train.checkpoint_every=4"),
                       reporter=rep, workdir=str(tmp_path))
    assert [s for s, _, c in rep.rows if c] == [4, 8, 9]
    assert [s for s, m, _ in rep.rows if "val_loss" in m] == [0, 9]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == ["checkpoint_000008", "checkpoint_000009"]
    assert res.checkpoint_dir.endswith("checkpoint_000009")


def test_bf16_training_runs_under_autocast_and_stays_near_fp32(tmp_path, cache):
    runs = {p: run_training(tiny(tmp_path, cache, "train.steps=6", "train.eval_every=6", "optimizer.lr=3e-3",
                                 f"train.precision={p}"), workdir=str(tmp_path / p)) for p in ("fp32", "bf16")}
    fp32, bf16 = ([h["train_loss"] for h in runs[p].history if "train_loss" in h] for p in ("fp32", "bf16"))
    assert runs["bf16"].status == "finished" and all(map(math.isfinite, bf16))
    assert fp32 != bf16  # autocast changed the arithmetic ...
    assert np.allclose(bf16, fp32, atol=0.05)  # ... by bf16 rounding only (losses ~5.5)


# -- DeepSpeed ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["rotation.kind=per_tensor", "optimizer.granularity=row",
                                      "optimizer.name=mada"])
def test_deepspeed_zero_refuses_whole_tensor_optimizers_in_one_line(override):
    exp = load_experiment(None, ["resources.strategy=deepspeed", "optimizer.name=adam", override])
    with pytest.raises(ConfigError, match="resources.strategy=deepspeed .* allowed: strategy: ddp") as e:
        check_strategy(exp)
    assert "\n" not in str(e.value)


def test_deepspeed_accepts_elementwise_optimizers_and_zero_0():
    for extra in (["optimizer.name=adamw"], ["optimizer.name=sgd"], ["rotation.kind=per_tensor", "deepspeed.zero_stage=0"]):
        check_strategy(load_experiment(None, ["resources.strategy=deepspeed", *extra]))


def test_hessian_reorth_per_task_reaches_lanczos():
    """120 steps on an 824-parameter model: the recurrence alone (reorth.top_eigs=none) loses orthogonality
    and repeats λ_max (ghosts), full reorthogonalization gives eigvalsh's top 4; slq keeps its own mode."""
    from test_hessian import dense_reference, make_batches, make_model

    from rayexp.config import HessianConfig
    from rayexp.hessian.analyze import analyze
    model, batches = make_model("mlp"), make_batches()
    ev = torch.linalg.eigvalsh(dense_reference(model, batches)).numpy()[::-1]
    runs = {}
    for mode in ("none", "full"):
        cfg = HessianConfig(tasks=["top_eigs"], dtype="fp64", top_k=4, top_eigs_steps=120, reorth={"top_eigs": mode})
        assert cfg.reorth["slq"] == "none" and cfg.reorth["block_curvature"] == "full"
        runs[mode] = analyze(model, batches, cfg, progress=False)["arrays"]["top_eigs"]
    assert np.allclose(runs["full"], ev[:4], rtol=1e-8)
    assert np.allclose(runs["none"], ev[0], rtol=1e-6)  # ghost copies of the top eigenvalue


# -- survivors of the mutation run (benchmarks/mutation_survivors.md) --------------------------------------
def test_top_ritz_gives_lambda_max_and_its_eigenvector():
    from rayexp.hessian.lanczos import top_ritz
    A = spread_matrix()
    lam, vecs = np.linalg.eigh(A)
    got, y = top_ritz(FunctionOperator.numpy(lambda v: A @ v, 30), torch.from_numpy(np.ones(30)), 30)
    assert got == pytest.approx(lam[-1], rel=1e-10)
    assert abs(abs(float(y @ torch.from_numpy(vecs[:, -1]))) - 1) < 1e-8 and float(y.norm()) == pytest.approx(1.0)


def test_quadratures_of_different_lengths_concatenate_with_zero_weight_padding():
    from rayexp.hessian.slq import Quadrature
    a = Quadrature(np.array([[1.0, 2.0]]), np.array([[0.25, 0.75]]))
    b = Quadrature(np.array([[3.0, 4.0, 5.0]]), np.array([[0.2, 0.3, 0.5]]))
    q = Quadrature.concat([a, b])
    assert q.nodes.shape == q.weights.shape == (2, 3) and q.weights[0, 2] == 0.0
    assert q.moment(1) == pytest.approx(0.5 * (0.25 + 1.5) + 0.5 * (0.6 + 1.2 + 2.5))


def test_global_rotation_is_held_in_the_parameters_dtype():
    from rayexp.config import OptimizerConfig, RotationConfig
    from rayexp.optim import build_optimizer
    for dtype in (torch.float32, torch.float64):
        net = torch.nn.Linear(4, 3).to(dtype)
        opt = build_optimizer(net, OptimizerConfig(name="adam"), RotationConfig(kind="global"))
        assert opt.rotation.q.dtype == dtype and opt.rotation.q.shape == (15, 15)


def test_signum_without_momentum_keeps_no_buffer():
    from rayexp.config import OptimizerConfig
    from rayexp.optim import build_optimizer
    net = torch.nn.Linear(4, 3)
    opt = build_optimizer(net, OptimizerConfig(name="signum", momentum=0.0, lr=0.1))
    net(torch.ones(2, 4)).sum().backward()
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert not any(torch.is_tensor(v) and k != "step" for st in opt.state.values() for k, v in st.items())
    for p, b, in zip(net.parameters(), before):  # plain sign descent
        assert torch.allclose(p, b - 0.1 * torch.sign(p.grad))


def test_random_search_samples_one_optimizer_per_sample_from_a_choice(tmp_path):
    from rayexp.spaces import SweepSpec
    from rayexp.sweep.plan import assignments
    raw = {"optimizer": {"name": {"choice": ["adamw", "sgd"]}, "lr": {"loguniform": [1e-4, 1e-1]}},
           "search": {"algorithm": "random", "num_samples": 6, "seed": 1}, "output_dir": str(tmp_path)}
    a = assignments(SweepSpec(raw))
    assert len(a) == 6 and {x["optimizer.name"] for x in a} == {"adamw", "sgd"}


def test_prune_keeps_the_two_latest_checkpoints_and_ignores_a_half_written_one(tmp_path):
    from rayexp.train.checkpoint import prune
    for name in ("checkpoint_000010", "checkpoint_000020", "checkpoint_000030", "checkpoint_000040.tmp"):
        (tmp_path / name).mkdir()
    prune(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000020", "checkpoint_000030",
                                                          "checkpoint_000040.tmp"]


def test_a_checkpoint_without_checksums_is_checked_by_loading_its_files(tmp_path):
    from rayexp.config import validate
    from rayexp.train.checkpoint import save_checkpoint, verify
    path = Path(save_checkpoint(tmp_path / "ckpt", torch.nn.Linear(2, 2), None, 3, validate({}), {"history": []}))
    (path / "checksums.json").unlink()  # the older format
    assert verify(path) == path
    (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:20])
    with pytest.raises(ConfigError, match="state.pt does not load .*corrupt or truncated"):
        verify(path)


def test_hvp_unflatten_keeps_leading_dimensions_and_flatten_inverts_it():
    from test_hessian import make_batches, make_model

    from rayexp.hessian.hvp import HVP
    h = HVP(make_model("mlp"), make_batches(), mode="fwd_rev", dtype="fp64")
    v = torch.randn(3, 2, h.d, dtype=torch.float64)
    parts = h.unflatten(v)
    assert [t.shape for t in parts.values()] == [torch.Size([3, 2, *s]) for s in h.shapes]
    assert torch.equal(h.flatten(parts, lead=2), v)


def test_divergence_read_one_step_late_stops_at_the_same_step_as_when_every_step_is_logged(tmp_path, cache):
    """Unlogged steps' losses are read after the next step is queued: a run logging every 1000 steps must end
    on the same diverged step, with the same loss and token count, as one logging every step."""
    runs = [run_training(tiny(tmp_path, cache, "train.steps=40", "train.eval_every=1000", f"train.log_every={every}",
                              "optimizer.name=sgd", "optimizer.lr=100", "train.warmup=0", "train.clip=0"),
                         workdir=str(tmp_path / f"log{every}"))
            for every in (1, 1000)]
    every, late = runs
    assert every.status == late.status == "diverged" and 1 < every.step < 40
    assert late.step == every.step and late.history[-1]["step"] == every.step
    assert late.history[-1]["diverged"] == 1.0 and late.history[-1]["train_loss"] == pytest.approx(
        every.history[-1]["train_loss"], nan_ok=True)
    assert [h["step"] for h in late.history] == [0, every.step]

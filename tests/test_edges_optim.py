"""Edge cases of the optimizer zoo, the search spaces and the sweep plan that the main suites left open
(mutants that survived a mutmut run), each against an independent reference:

- the fused step's control flow (eager kernels, ``fused.COMPILE = False``) under no rotation and a
  per-tensor rotation, against torch.optim.SGD (an orthogonal rotation leaves SGD unchanged);
- SGD at momentum 0 (no state, as torch keeps none) and at momentum 1 (torch.optim.SGD accepts it);
- Signum's momentum buffer is the documented EMA m ← βm + (1 − β)g, so a checkpoint moves between the
  per-tensor and the fused path (a numpy transcription of the formula);
- MADA: the seed quirk ``g_prev_zero`` (numpy transcription of docs/methods.md with g_prev = 0, and the
  hypergradient against central differences of the next-step loss), ``two_micro_batch_start``,
  ``optimizer.hypergrad_delay`` and ``optimizer.hypergrad_clip`` as built by ``build_optimizer``;
- spaces: param_label of ``*.kind``, the message of an empty space, what each space kind samples, the
  warm-up note; plan: Trial.label of a dict value, trials_of's indices (hand-counted).
"""
import copy
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_optim_mada import numpy_mada

from rayexp.config import MADA_COEFS, ConfigError, MadaConfig, OptimizerConfig, RotationConfig
from rayexp.optim import build_optimizer, fused
from rayexp.optim.core import ZooOptimizer
from rayexp.optim.sgd import SGD
from rayexp.spaces import Space, SweepSpec, param_label
from rayexp.sweep.plan import Trial, trials_of


# -- helpers ----------------------------------------------------------------------------------------------
class Params(nn.Module):
    def __init__(self, shapes, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))
                                    for s in shapes])


def grad_at(p: torch.Tensor, t: int, i: int) -> torch.Tensor:
    """A deterministic non-linear gradient field with per-step noise (float64)."""
    noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * t + i), dtype=torch.float64)
    return 0.5 * p.detach() + torch.sin(3 * p.detach()) + noise


def drive(params, opt, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = grad_at(p, t, i)
        opt.step()
        opt.zero_grad(set_to_none=True)


SHAPES = [(4, 3), (3,), (2, 5)]


# -- fused step ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rotation", ["none", "per_tensor"])
def test_fused_sgd_step_applies_once_with_and_without_rotation(monkeypatch, rotation):
    """The fused path (eager kernels) == torch.optim.SGD over 5 steps: without a rotation the kernel applies
    θ itself; under per_tensor the caller un-rotates and applies (SGD is invariant under R)."""
    monkeypatch.setattr(fused, "COMPILE", False)
    ours, ref = Params(SHAPES), Params(SHAPES)
    cfg = OptimizerConfig(name="sgd", lr=0.05, momentum=0.8, weight_decay=0.0, fused=True)
    opt = build_optimizer(ours, cfg, RotationConfig(kind=rotation))
    assert opt.fused_step is not None
    drive(list(ours.ps), opt, 5)
    drive(list(ref.ps), torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.8), 5)
    start = Params(SHAPES)
    for a, b, s in zip(ours.ps, ref.ps, start.ps):
        assert not torch.equal(b, s)  # the reference moved
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


# -- SGD -------------------------------------------------------------------------------------------------
def test_sgd_momentum_zero_keeps_no_state_and_is_torch_sgd():
    """Momentum 0: θ ← θ − lr·g exactly as torch.optim.SGD, and no momentum buffer (state_floats says 0)."""
    ours, ref = Params(SHAPES), Params(SHAPES)
    opt = build_optimizer(ours, OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, fused=False))
    drive(list(ours.ps), opt, 3)
    drive(list(ref.ps), torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.0), 3)
    for a, b in zip(ours.ps, ref.ps):
        assert torch.equal(a, b)
    for p in ours.ps:
        assert set(opt.state[p]) == {"step"}, opt.state[p].keys()


def test_sgd_family_at_momentum_one_is_torch_sgd():
    """The family's update at μ = 1 (b ← b + g, torch.optim.SGD allows it) == torch.optim.SGD(momentum=1)."""
    ours, ref = Params(SHAPES), Params(SHAPES)
    opt = ZooOptimizer([{"params": list(ours.ps)}], SGD,
                       {"lr": 0.02, "weight_decay": 0.0, "momentum": 1.0, "nesterov": False})
    drive(list(ours.ps), opt, 4)
    drive(list(ref.ps), torch.optim.SGD(ref.parameters(), lr=0.02, momentum=1.0), 4)
    for a, b in zip(ours.ps, ref.ps):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


# -- Signum ----------------------------------------------------------------------------------------------
def test_signum_buffer_is_the_documented_ema_and_resumes_in_the_fused_path(monkeypatch):
    """m ← βm + (1 − β)g in the saved state (numpy); 3 reference steps, checkpoint, 5 fused (eager) steps ==
    the numpy trajectory of θ ← θ(1 − lr·wd) − lr·sign(m)."""
    monkeypatch.setattr(fused, "COMPILE", False)
    beta, lr, wd = 0.9, 0.01, 0.1
    cfg = OptimizerConfig(name="signum", lr=lr, momentum=beta, weight_decay=wd)
    model = Params(SHAPES, 1)
    ps = [p.detach().numpy().copy() for p in model.ps]
    m = [np.zeros_like(p) for p in ps]

    def np_step(t):
        for i in range(len(ps)):
            g = grad_at(torch.from_numpy(ps[i]), t, i).numpy()
            m[i] = beta * m[i] + (1 - beta) * g
            decay = wd if ps[i].ndim >= 2 else 0.0
            ps[i] = ps[i] * (1 - lr * decay) - lr * np.sign(m[i])

    ref_opt = build_optimizer(model, cfg.model_copy(update={"fused": False}))
    drive(list(model.ps), ref_opt, 3)
    for t in range(3):
        np_step(t)
    sd = copy.deepcopy(ref_opt.state_dict())
    for i, p in enumerate(model.ps):
        np.testing.assert_allclose(ref_opt.state[p]["momentum_buffer"].numpy(), m[i], rtol=1e-12, atol=1e-14)
    fused_opt = build_optimizer(model, cfg.model_copy(update={"fused": True}))
    fused_opt.load_state_dict(sd)
    drive(list(model.ps), fused_opt, 5, start=3)
    for t in range(3, 8):
        np_step(t)
    for a, b in zip(model.ps, ps):
        np.testing.assert_allclose(a.detach().numpy(), b, atol=1e-12)


# -- MADA ------------------------------------------------------------------------------------------------
DATA = torch.Generator().manual_seed(5)
XS = torch.randn(10, 16, 4, generator=DATA, dtype=torch.float64)
YS = torch.randn(10, 16, 3, generator=DATA, dtype=torch.float64)
COEFS = dict(beta1=0.85, beta2=0.9, beta3=0.3, rho=1.0, c=0.6, gamma=0.7)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def loss_at(model, t):
    return F.mse_loss(model(XS[t]), YS[t])


def mada_cfg(quirks=(), hyper_lr=0.0, clip=None, delay=0, lr=0.05, **coefs):
    return OptimizerConfig(name="mada", lr=lr, weight_decay=0.0, hypergrad_clip=clip, hypergrad_delay=delay,
                           mada=MadaConfig(hyper_lr=hyper_lr, seed_quirks=list(quirks), **{**COEFS, **coefs}))


def train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss_at(model, t).backward()
        opt.step()


def test_mada_g_prev_zero_quirk_matches_numpy_transcription():
    """Fixed coefficients (hyper-lr 0), quirk g_prev_zero, 8 steps: θ == the numpy transcription to 1e-12,
    and differs from default MADA (the quirk is not vacuous here)."""
    coefs = dict(COEFS, rho=0.6)
    cfg = mada_cfg(quirks=["g_prev_zero"], rho=0.6)
    train(model := net(), build_optimizer(model, cfg), 8)
    ref = numpy_mada(net(), 8, 0.05, coefs, cfg.mada.eps, g_prev_zero=True, loss=loss_at)
    for a, b in zip(model.parameters(), ref):
        np.testing.assert_allclose(a.detach().numpy(), b, atol=1e-12)
    train(plain := net(), build_optimizer(plain, mada_cfg(rho=0.6)), 8)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), plain.parameters())) > 1e-4


def test_mada_g_prev_zero_hypergradient_matches_finite_difference():
    """Quirk g_prev_zero: h (computed inside step t+1) == dL(θ_t(k))/dk by central differences, 1e-3
    relative (ρ = 1, so the detached v̄ has no weight)."""
    model = net()
    opt = build_optimizer(model, mada_cfg(quirks=["g_prev_zero"]))
    train(model, opt, 3)
    snap_model, snap_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 2, start=3)  # the second of these computes ∂L_4(θ_4)/∂k
    h = opt.extra["hypergrad"].clone()

    def next_loss(name, value):
        model.load_state_dict(snap_model)
        opt.load_state_dict(copy.deepcopy(snap_opt))
        opt.extra["coefs"][name] = torch.tensor(value, dtype=torch.float64)
        train(model, opt, 1, start=3)
        with torch.no_grad():
            return loss_at(model, 4).item()

    for name in ("beta1", "beta2", "beta3", "c", "gamma"):
        j, e = MADA_COEFS.index(name), 1e-6
        fd = (next_loss(name, COEFS[name] + e) - next_loss(name, COEFS[name] - e)) / (2 * e)
        assert abs(fd) > 1e-7, name
        assert abs(h[j].item() - fd) <= 1e-3 * abs(fd) + 1e-9, (name, h[j].item(), fd)


def test_mada_two_micro_batch_start_accumulates_two_at_step_one_only():
    opt = build_optimizer(net(), mada_cfg(quirks=["two_micro_batch_start"]))
    assert [opt.micro_batches(1, ga) for ga in (1, 2, 3, 8)] == [1, 2, 2, 2]
    assert [opt.micro_batches(s, 8) for s in (2, 3)] == [8, 8]
    plain = build_optimizer(net(), mada_cfg())
    assert plain.micro_batches(1, 8) == 8


def test_mada_hypergrad_delay_from_config_holds_the_coefficients():
    """hypergrad_delay D = 2 (through build_optimizer): the coefficients stay at their start through step
    D + 1 = 3 and move at step D + 2 = 4 (docs/methods.md); with D = 0 they move at step 2."""
    def coefs_per_step(delay):
        model = net()
        opt = build_optimizer(model, mada_cfg(hyper_lr=0.1, delay=delay))
        out = []
        for t in range(4):
            train(model, opt, 1, start=t)
            out.append({n: float(c) for n, c in opt.extra["coefs"].items()})
        return out

    start = dict(COEFS)
    delayed = coefs_per_step(2)
    assert delayed[0] == delayed[1] == delayed[2] == start
    assert delayed[3] != start
    assert coefs_per_step(0)[1] != start


def test_mada_hypergrad_clip_from_config_clips_each_entry():
    """hypergrad_clip C (through build_optimizer): h_C == h·min(1, C/(|h| + 1e-6)) for the unclipped h of
    the same step (hyper-lr 0, so both runs see the same state), and it is active here."""
    def h_at_step_2(clip):
        model = net()
        opt = build_optimizer(model, mada_cfg(clip=clip))
        train(model, opt, 2)
        return opt.extra["hypergrad"].numpy().copy()

    raw, c = h_at_step_2(None), 1e-4
    clipped = h_at_step_2(c)
    assert (np.abs(raw) > 10 * c).any()
    np.testing.assert_allclose(clipped, raw * np.minimum(1.0, c / (np.abs(raw) + 1e-6)), rtol=1e-12, atol=0)
    assert (np.abs(clipped) <= c).all()


# -- spaces ------------------------------------------------------------------------------------------------
def test_param_label_of_a_kind_field_names_its_section():
    assert param_label("rotation.kind", "eigenbasis") == "rotation=eigenbasis"
    assert param_label("data.tokenizer.name", "gpt2") == "tokenizer=gpt2"
    assert param_label("optimizer.lr", 0.003) == "lr=0.003"
    assert param_label("model.kind", "gpt") == "gpt"


def test_an_empty_space_names_its_field_and_the_fault():
    with pytest.raises(ConfigError, match=r"^optimizer\.lr: \{grid: \.\.\.\} needs a non-empty list; got \[\]$"):
        Space("grid", [], "optimizer.lr")


def test_each_space_kind_samples_its_own_distribution():
    """2000 draws each: uniform [2, 3] floats with mean 2.5; loguniform [1e-4, 1] half below 1e-2;
    randint [0, 4] the integers 0..3."""
    rng = random.Random(0)
    uni = [Space("uniform", [2.0, 3.0], "u").sample(rng) for _ in range(2000)]
    assert all(isinstance(x, float) and 2.0 <= x <= 3.0 for x in uni)
    assert abs(sum(uni) / len(uni) - 2.5) < 0.03 and len(set(uni)) > 1000
    log = [Space("loguniform", [1e-4, 1.0], "l").sample(rng) for _ in range(2000)]
    assert all(1e-4 <= x <= 1.0 for x in log)
    assert abs(sum(x < 1e-2 for x in log) / len(log) - 0.5) < 0.05
    ints = [Space("randint", [0, 4], "r").sample(rng) for _ in range(2000)]
    assert all(type(x) is int for x in ints) and set(ints) == {0, 1, 2, 3}


def test_warmup_note_lists_the_too_short_step_counts():
    spec = SweepSpec({"train": {"steps": {"grid": [20, 5, 8]}, "warmup": 10}})
    assert spec.notes() == ["train.warmup=10 exceeds train.steps=5, 8: clamped to the run's length"]
    assert SweepSpec({"train": {"steps": 20, "warmup": 10}}).notes() == []


# -- plan -------------------------------------------------------------------------------------------------
def test_trial_label_formats_a_dict_value_in_braces():
    spec = SweepSpec({"optimizer": {"name": "mada"}})
    t = Trial("k", {"optimizer.mada.hyper_lr": {"beta1": 0.00051234, "c": 0.1}}, 3, spec.base)
    assert t.label() == "mada hyper_lr={beta1:0.000512,c:0.1} seed=3"


def test_trials_of_numbers_the_seeds_from_index():
    spec = SweepSpec({"optimizer": {"name": "sgd", "lr": {"grid": [0.1, 0.3]}}, "seeds": [3, 4, 5]})
    trials = trials_of(spec, "x", {"optimizer.lr": 0.3}, index=5)
    assert [(t.seed, t.index) for t in trials] == [(3, 5), (4, 6), (5, 7)]
    assert all(t.exp.optimizer.lr == 0.3 for t in trials)
    assert [t.index for t in trials_of(spec, "x", {"optimizer.lr": 0.3})] == [None, None, None]

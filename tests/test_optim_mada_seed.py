"""MADA against seed 004 (amazon-science/mada_optimizer_search @2beded8, gdtuo.py ``Meta`` driven as
train_ddp.py drives it): an independent transcription of the seed's loop in plain torch autograd, fp64.

The reference below keeps θ_k as a differentiable function of the coefficients (as the seed's
``ModuleWrapper`` does) and gets the hypergradient by backpropagating the next micro-batches' losses
into coefficient leaves; rayexp instead recomputes d_{k} under autograd one step later. With the seed's
quirks on it reproduces, from reading the seed:
- gdtuo.py:345 keeps ``cache['g'] = g``, a view of ``param.grad`` that ``zero_grad`` zeroes in place
  (gdtuo.py:518-521), so g_prev is always 0;
- train_ddp.py:369-384: the coefficients step after the *first* micro-batch following an update, with the
  hypergradient of that micro-batch's loss / grad_accum only (``mw.detach()`` cuts the rest);
- train_ddp.py:382/386: updates at micro-iterations 1, 1 + GA, ...: the first accumulates 2 micro-batches;
- gdtuo.py:294: ``Meta.step`` steps the coefficients again, with the zero gradients ``mw.detach()`` left
  (gdtuo.py:536), which under momentum repeats the momentum step;
- train_ddp.py:356-358: hypergradients zeroed while the micro-iteration < hypergrad_init_iter.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from rayexp.config import MADA_COEFS, ConfigError, OptimizerConfig, validate
from rayexp.optim import build_optimizer

GEN = torch.Generator().manual_seed(11)
BATCHES = [(torch.randn(6, 4, generator=GEN, dtype=torch.float64), torch.randn(6, 3, generator=GEN, dtype=torch.float64))
           for _ in range(80)]
INIT = dict(beta1=0.9, beta2=0.95, beta3=0.2, rho=0.6, c=0.8, gamma=0.9)
HYPER_LR = dict(beta1=5e-2, beta2=5e-2, beta3=1.0, rho=1.0, c=1.0, gamma=1.0)  # large: the coefficients move
RANGES = dict(beta1=(0.01, 0.99), beta2=(0.501, 0.99), beta3=(0.0, 0.99), rho=(0.0, 1.0), c=(0.0, 1.0),
              gamma=(0.0, 1.0))  # gdtuo.py:298-303


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def lr_at(k):
    return 0.02 * (1 + 0.1 * k)  # varies per update, so a wrong α in the hypergradient shows


def _meta_direction(k, t, g, st, quirks, eps):
    """gdtuo.py:331-364 for one tensor: the direction, differentiable in the coefficient leaves k; st updated."""
    if "n" not in st:
        st.update(m=torch.zeros_like(g), v=torch.zeros_like(g) + 1e-15, v_mean=torch.zeros_like(g) + 1e-15,
                  n=g * g, g=torch.zeros_like(g), m_lion=torch.zeros_like(g))
    g_hat = g + k["beta3"] * (g - st["g"])
    g_tilde_sq = k["c"] * g_hat * g_hat + (1 - k["c"]) * (st["v"] + g_hat * g_hat * torch.sign(g_hat * g_hat - st["v"]))
    m = k["beta1"] * st["m"].detach() + (1.0 - k["beta1"]) * g
    v = k["beta2"] * st["v"].detach() + (1.0 - k["beta2"]) * g_tilde_sq
    n = k["beta3"] * st["n"].detach() + (1.0 - k["beta3"]) * (g - st["g"])
    st["m_lion"] = 0.98 * st["m_lion"] + 0.02 * g
    u_lion = 0.95 * st["m_lion"] + 0.05 * g
    v_mean = (v + (t - 1) * st["v_mean"].detach()) / t
    st.update(m=m, v=v, n=n, v_mean=v_mean, g=torch.zeros_like(g) if quirks else g)
    m_hat = m / (1.0 - k["beta1"] ** float(t))
    v_hat = (k["rho"] * v + (1 - k["rho"]) * v_mean.detach()) / (1.0 - k["beta2"] ** float(t))
    return k["gamma"] * (m_hat + k["beta3"] * n) / (v_hat ** 0.5 + eps) + (1 - k["gamma"]) * torch.sign(u_lion)


def _coef_step(coefs, bufs, grads, hyper_lr, hyper_mom):
    """gdtuo.py:148-162 (SGDPerParamMo.step): buf = g the first time, then buf·μ + g; k ← k − buf·lr."""
    for n in MADA_COEFS:
        g = grads[n]
        if hyper_mom.get(n, 0.0) != 0.0:
            bufs[n] = g if n not in bufs else bufs[n] * hyper_mom[n] + g
            g = bufs[n]
        coefs[n] = coefs[n] - g * hyper_lr.get(n, 0.0)


def _clipped(h: torch.Tensor, clip: float) -> torch.Tensor:
    """train_ddp.py:372-373: torch's clip_grad_norm_ on the one-element coefficient."""
    p = torch.zeros((), dtype=torch.float64, requires_grad=True)
    p.grad = h.clone()
    torch.nn.utils.clip_grad_norm_(p, clip)
    return p.grad


def seed004_reference(updates, ga, quirks, delay=0, wd=0.1, clip=1.0, hclip=10.0, hyper_mom=None, eps=1e-6):
    """θ and the coefficients after each update of the seed's loop (quirks on) or of its intended math
    (quirks off: g_prev kept, hypergradient from the whole accumulated gradient, GA micro-batches from the
    start, one coefficient step per update)."""
    model, hyper_mom = net(), hyper_mom or {}
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone() for p in model.parameters()]
    coefs = {n: torch.tensor(INIT[n], dtype=torch.float64) for n in MADA_COEFS}
    bufs, states, leaves, out, b, it = {}, [{} for _ in theta], None, [], 0, 0
    for k in range(1, updates + 1):
        mbs = 2 if quirks and k == 1 else ga
        grads = [torch.zeros_like(t) for t in theta]
        for j in range(mbs):
            live = leaves is not None and (j == 0 or not quirks)  # seed: mw.detach() after the first
            ps = theta if live else [t.detach().requires_grad_(True) for t in theta]
            x, y = BATCHES[b]
            loss = F.mse_loss(functional_call(model, dict(zip(names, ps)), (x,)), y) / ga
            gs = torch.autograd.grad(loss, ps + (list(leaves.values()) if live else []), allow_unused=True,
                                     retain_graph=live)
            grads = [a + g for a, g in zip(grads, gs[:len(ps)])]
            if live:
                for (n, leaf), g in zip(leaves.items(), gs[len(ps):]):
                    leaf.hg = (getattr(leaf, "hg", 0.0) + (g if g is not None else 0.0))
            b, it = b + 1, it + 1
        if k > 1:
            first_iter = it - mbs  # micro-iteration of the hypergradient's micro-batch
            dropped = first_iter < delay * ga if quirks else k - 1 <= delay
            hg = {n: (torch.zeros(()) if dropped else leaves[n].hg).double() for n in MADA_COEFS}
            _coef_step(coefs, bufs, {n: _clipped(hg[n], hclip) for n in MADA_COEFS}, HYPER_LR, hyper_mom)
        if quirks:
            _coef_step(coefs, bufs, {n: torch.zeros((), dtype=torch.float64) for n in MADA_COEFS}, HYPER_LR, hyper_mom)
        coefs = {n: c.detach().clamp(*RANGES[n]) for n, c in coefs.items()}
        holders = [torch.zeros_like(t, requires_grad=True) for t in theta]
        for h, g in zip(holders, grads):
            h.grad = g
        torch.nn.utils.clip_grad_norm_(holders, clip)  # train_ddp.py:391-392
        grads = [h.grad for h in holders]
        alpha = lr_at(k)
        decayed = [t.detach() - alpha * wd * t.detach() if t.dim() >= 2 else t.detach() for t in theta]
        leaves = {n: c.clone().requires_grad_(True) for n, c in coefs.items()}
        theta = [p - _meta_direction(leaves, k, g, st, quirks, eps) * alpha for p, g, st in zip(decayed, grads, states)]
        out.append(([t.detach().clone() for t in theta], {n: float(c) for n, c in coefs.items()}))
    return out


def rayexp_run(cfg: OptimizerConfig, updates: int, ga: int, clip: float = 1.0):
    """rayexp's MADA driven as rayexp.train.loop drives it: micro_batches, backward of loss / ga with
    after_backward, clip, step; θ and coefficients after each step."""
    model = net()
    opt = build_optimizer(model, cfg)
    out, b = [], 0
    for k in range(1, updates + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(k)
        opt.zero_grad(set_to_none=True)
        n = opt.micro_batches(k, ga)
        for j in range(n):
            x, y = BATCHES[b]
            (F.mse_loss(model(x), y) / ga).backward()
            opt.after_backward(j, n)
            b += 1
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        out.append(([p.detach().clone() for p in model.parameters()], {n: float(c) for n, c in opt.extra["coefs"].items()}))
    return out


def mada(preset=None, **kw):
    base = dict(name="mada", lr=0.02, weight_decay=0.1,
                mada=dict(INIT, eps=1e-6, hyper_lr=HYPER_LR, hyper_momentum=kw.pop("hyper_momentum", 0.0),
                          **kw.pop("mada", {})))
    return OptimizerConfig(**({"preset": preset} if preset else {}), **base, **kw)


def max_diff(a, b):
    dp = max(float((x - y).abs().max()) for (pa, _), (pb, _) in zip(a, b) for x, y in zip(pa, pb))
    dc = max(abs(ca[n] - cb[n]) for (_, ca), (_, cb) in zip(a, b) for n in MADA_COEFS)
    return dp, dc


@pytest.mark.parametrize("delay", [0, 3])
def test_default_mada_equals_the_seed_math_with_its_quirks_off(delay):
    """Clip 10, delay, v̄ detached, unclipped next gradient, v = v̄ = 1e-15 and n = g² at start: rayexp's
    default mada == the reference with the quirks off, to 1e-12 in θ and coefficients over 10 steps."""
    ours = rayexp_run(mada(hypergrad_delay=delay), 10, 3)
    ref = seed004_reference(10, 3, quirks=False, delay=delay)
    dp, dc = max_diff(ours, ref)
    assert dp < 1e-12 and dc < 1e-12, (dp, dc)
    assert abs(ours[-1][1]["beta1"] - INIT["beta1"]) > 1e-4  # the coefficients did move


@pytest.mark.parametrize("ga, mom", [(3, {}), (4, {"c": 0.5, "rho": 0.9})])
def test_compat_preset_reproduces_the_seed_trajectory(ga, mom):
    """The mada_seed004_compat preset (all four quirks) == the seed's loop, 1e-10 in θ and coefficients;
    with hyper-momentum the double coefficient step matters."""
    cfg = mada("mada_seed004_compat", hypergrad_delay=2, hyper_momentum=mom)
    assert cfg.mada.seed_quirks and cfg.hypergrad_clip == 10.0
    ours = rayexp_run(cfg, 10, ga)
    ref = seed004_reference(10, ga, quirks=True, delay=2, hyper_mom=mom)
    dp, dc = max_diff(ours, ref)
    assert dp < 1e-10 and dc < 1e-10, (dp, dc)
    dp_default, _ = max_diff(ref, seed004_reference(10, ga, quirks=False, delay=2, hyper_mom=mom))
    assert dp_default > 1e-4  # the quirks change the trajectory: the comparison above is not vacuous


def test_clip_and_delay_take_effect_at_the_right_steps():
    """Delay D: coefficients fixed through step D + 1, moving at D + 2; a tight clip bounds |h| and changes
    the run exactly as the reference's clip_grad_norm_ does."""
    ours = rayexp_run(mada(hypergrad_delay=3, hypergrad_clip=1e-3), 8, 3)
    coefs = [c for _, c in ours]
    assert all(c == coefs[0] for c in coefs[:4]) and coefs[4] != coefs[3]
    assert coefs[0] == {n: INIT[n] for n in MADA_COEFS}
    ref = seed004_reference(8, 3, quirks=False, delay=3, hclip=1e-3)
    dp, dc = max_diff(ours, ref)
    assert dp < 1e-12 and dc < 1e-12
    moved = {n: coefs[4][n] - coefs[3][n] for n in MADA_COEFS}
    for n in ("beta3", "rho", "c", "gamma"):  # hyper-lr 1: one clipped step moves by at most 1e-3
        assert 0 < abs(moved[n]) <= 1e-3 + 1e-12, (n, moved[n])
    unclipped = rayexp_run(mada(hypergrad_delay=3, hypergrad_clip=None), 8, 3)
    assert max_diff(unclipped, ours)[1] > 1e-3  # the clip was active


def test_compat_refuses_grad_accum_one():
    with pytest.raises(ConfigError, match="optimizer.mada.seed_quirks.*grad_accum"):
        validate({"optimizer": {"preset": "mada_seed004_compat"}, "train": {"grad_accum": 1}})


def test_run_training_hands_mada_each_micro_batch_and_the_compat_start(tmp_path, monkeypatch):
    """rayexp.train.loop calls after_backward after every micro-batch (before clipping) and accumulates
    micro_batches(step) of them: 2 at the compat preset's first step, grad_accum after."""
    from rayexp.optim.core import ZooOptimizer
    from rayexp.spaces import load_experiment
    from rayexp.train.loop import run_training
    calls = []
    real = ZooOptimizer.after_backward
    monkeypatch.setattr(ZooOptimizer, "after_backward", lambda self, j, n: (calls.append((j, n)), real(self, j, n)))
    exp = load_experiment(None, ["optimizer.preset=mada_seed004_compat", "optimizer.hypergrad_delay=0",
                                 "train.steps=3", "train.grad_accum=3", "train.batch_size=2", "train.eval_every=3",
                                 "train.eval_batches=1", "train.warmup=0", f"output_dir={tmp_path}",
                                 f"data.cache_dir={tmp_path}/cache", "model.n_layer=1", "model.block_size=16"])
    res = run_training(exp, workdir=str(tmp_path))
    assert res.status == "finished"
    assert calls == [(0, 2), (1, 2)] + [(0, 3), (1, 3), (2, 3)] * 2

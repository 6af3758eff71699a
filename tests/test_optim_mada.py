"""MADA: fixed-coefficient limits against torch Adam and a numpy transcription of ALGORITHMS.md, the
one-step-unroll hypergradient against finite differences of the next-step loss, coefficient ranges."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rayexp.config import MADA_COEFS, MADA_RANGES, MadaConfig, OptimizerConfig, RotationConfig
from rayexp.optim import build_optimizer

DATA = torch.Generator().manual_seed(3)
XS = torch.randn(12, 16, 4, generator=DATA, dtype=torch.float64)
YS = torch.randn(12, 16, 3, generator=DATA, dtype=torch.float64)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def loss_at(model, t):
    return F.mse_loss(model(XS[t]), YS[t])


def mada_cfg(lr=0.05, hyper_lr=0.0, hyper_momentum=0.0, wd=0.0, **coefs):
    return OptimizerConfig(name="mada", lr=lr, weight_decay=wd,
                           mada=MadaConfig(hyper_lr=hyper_lr, hyper_momentum=hyper_momentum, **coefs))


def train(model, opt, steps):
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_at(model, t).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def numpy_mada(model, steps, lr, k, eps, wd=0.0, g_prev_zero=False, loss=None):
    """ALGORITHMS.md's MADA update, transcribed in numpy (float64), gradients from torch autograd of ``loss``
    (default this file's ``loss_at``); the seed's start (gdtuo.py:320-328): v = v̄ = 1e-15, n = g² at the first
    step. ``g_prev_zero``: seed quirk, g_prev stays 0, so ĝ = (1 + β3) g and n ← β3 n + (1 − β3) g."""
    loss = loss or loss_at
    params = [p.detach().numpy().copy() for p in model.parameters()]
    z = [np.zeros_like(p) for p in params]
    m, v, vbar, n, gp, ml = ([a.copy() for a in z] for _ in range(6))
    for a in v + vbar:
        a += 1e-15
    b1, b2, b3, rho, c, gam = (k[x] for x in MADA_COEFS)
    for t in range(1, steps + 1):
        with torch.no_grad():
            for p, q in zip(model.parameters(), params):
                p.copy_(torch.from_numpy(q))
        model.zero_grad()
        loss(model, t - 1).backward()
        gs = [p.grad.numpy().copy() for p in model.parameters()]
        for i, g in enumerate(gs):
            if t == 1:
                n[i] = g * g
            gh = g + b3 * (g - gp[i])
            s = c * gh ** 2 + (1 - c) * (v[i] + gh ** 2 * np.sign(gh ** 2 - v[i]))
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * s
            n[i] = b3 * n[i] + (1 - b3) * (g - gp[i])
            gp[i] = gp[i] if g_prev_zero else g
            vbar[i] = (v[i] + (t - 1) * vbar[i]) / t
            ml[i] = 0.98 * ml[i] + 0.02 * g
            u = 0.95 * ml[i] + 0.05 * g
            mhat = m[i] / (1 - b1 ** t)
            vhat = (rho * v[i] + (1 - rho) * vbar[i]) / (1 - b2 ** t)
            decay = wd if params[i].ndim >= 2 else 0.0
            params[i] = params[i] * (1 - lr * decay) - lr * (
                gam * (mhat + b3 * n[i]) / (np.sqrt(vhat) + eps) + (1 - gam) * np.sign(u))
    return params


def test_adam_corner_equals_torch_adam():
    """β3 = 0, c = 1, ρ = 1, γ = 1 with hyper-lr 0 is torch.optim.Adam(eps outside the sqrt), up to v's start
    at 1e-15 (the seed's; it moves θ by ~1e-10 here, so 1e-9 rather than bitwise)."""
    cfg = mada_cfg(lr=0.02, beta1=0.85, beta2=0.97, beta3=0.0, rho=1.0, c=1.0, gamma=1.0)
    ours = train(m := net(), build_optimizer(m, cfg), 12)
    ref = train(m := net(), torch.optim.Adam(m.parameters(), lr=0.02, betas=(0.85, 0.97), eps=cfg.mada.eps), 12)
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() < 1e-9


@pytest.mark.parametrize("coefs", [
    dict(beta1=0.9, beta2=0.95, beta3=0.3, rho=0.6, c=0.7, gamma=0.8),  # everything mixed
    dict(beta1=0.5, beta2=0.6, beta3=0.0, rho=0.0, c=0.0, gamma=1.0),   # AVGrad + Yogi-style corner
    dict(beta1=0.9, beta2=0.99, beta3=0.0, rho=1.0, c=1.0, gamma=0.0),  # Lion-like: sign(0.95 m_L + 0.05 g)
])
def test_fixed_coefficients_match_closed_form(coefs):
    cfg = mada_cfg(lr=0.03, wd=0.1, **coefs)
    ours = train(m := net(), build_optimizer(m, cfg), 10)
    ref = numpy_mada(net(), 10, 0.03, coefs, cfg.mada.eps, wd=0.1)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-12)


@pytest.mark.parametrize("rho, names", [
    (1.0, ("beta1", "beta2", "beta3", "c", "gamma")),  # ρ = 1: the detached v̄ has no weight in v̂
    (0.7, ("beta1", "rho", "gamma")),  # these do not reach v̄, so its detachment does not matter
])
def test_hypergradient_matches_finite_difference_of_next_step_loss(rho, names):
    """h_k (computed inside step t+1 from g_{t+1}) == d L(θ_t(k)) / dk by central differences, 1e-3 relative.
    v̄ enters v̂ detached (as in the seed), so h is the full derivative for β2, β3, c only where ρ = 1."""
    coefs = dict(beta1=0.85, beta2=0.9, beta3=0.2, rho=rho, c=0.6, gamma=0.7)
    cfg = mada_cfg(lr=0.05, wd=0.05, **coefs)
    model = net()
    opt = build_optimizer(model, cfg)
    train(model, opt, 3)  # at θ_3 now
    snap_model, snap_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_at(model, 3).backward()
    opt.step()  # θ_4(k)
    opt.zero_grad()
    loss_at(model, 4).backward()
    opt.step()  # computes ∂L_4(θ_4)/∂k from this gradient
    h = opt.extra["hypergrad"].clone()

    def next_loss(name, value):
        model.load_state_dict(snap_model)
        opt.load_state_dict(copy.deepcopy(snap_opt))
        opt.extra["coefs"][name] = torch.tensor(value, dtype=torch.float64)
        opt.zero_grad()
        loss_at(model, 3).backward()
        opt.step()
        with torch.no_grad():
            return loss_at(model, 4).item()

    for name in names:
        j, e = MADA_COEFS.index(name), 1e-6
        fd = (next_loss(name, coefs[name] + e) - next_loss(name, coefs[name] - e)) / (2 * e)
        assert abs(h[j].item() - fd) <= 1e-3 * abs(fd) + 1e-9, (name, h[j].item(), fd)
        assert abs(fd) > 1e-7, name  # every coefficient matters at this point


def test_hyper_step_is_sgd_with_momentum_and_coefficients_stay_in_range():
    lrs = {"beta1": 0.5, "beta2": 0.5, "beta3": 5.0, "rho": 5.0, "c": 5.0, "gamma": 5.0}
    cfg = mada_cfg(lr=0.05, hyper_lr=lrs, hyper_momentum=0.5, beta3=0.1, rho=0.5, c=0.5, gamma=0.5)
    model = net()
    opt = build_optimizer(model, cfg)
    seen = {n: [] for n in MADA_COEFS}
    expected = None
    for t in range(12):
        before = {n: c.clone() for n, c in opt.extra["coefs"].items()}
        buf = {n: b.clone() for n, b in opt.extra["hyper_buf"].items()}
        opt.zero_grad()
        loss_at(model, t).backward()
        opt.step()
        h = opt.extra["hypergrad"]
        if t >= 1:
            for j, n in enumerate(MADA_COEFS):
                lo, hi = MADA_RANGES[n]
                expected = float(np.clip(before[n] - lrs[n] * (0.5 * buf[n] + h[j]), lo, hi))
                assert abs(opt.extra["coefs"][n].item() - expected) < 1e-12
        for n, v in opt.metrics().items():
            seen[n.split("/")[1]].append(v)
    for n, vals in seen.items():
        lo, hi = MADA_RANGES[n]
        assert all(lo <= v <= hi for v in vals), n
        assert max(vals) > min(vals), f"{n} never moved"
    assert set(opt.metrics()) == {f"mada/{n}" for n in MADA_COEFS}


def test_hypergradient_in_rotated_basis_matches_finite_difference():
    """With a per-tensor rotation the hypergradient uses ⟨R g, ∂d/∂k⟩; still equal to the FD derivative
    (ρ = 1, see above)."""
    coefs = dict(beta1=0.85, beta2=0.9, beta3=0.2, rho=1.0, c=0.6, gamma=0.7)
    cfg, rot = mada_cfg(lr=0.05, **coefs), RotationConfig(kind="per_tensor", seed=2)
    model = net()
    opt = build_optimizer(model, cfg, rot)
    train(model, opt, 2)
    snap_model, snap_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for t in (2, 3):
        opt.zero_grad()
        loss_at(model, t).backward()
        opt.step()
    h = opt.extra["hypergrad"].clone()
    for j, name in enumerate(("beta1", "c")):
        vals = []
        for sign in (1, -1):
            model.load_state_dict(snap_model)
            opt.load_state_dict(copy.deepcopy(snap_opt))
            opt.extra["coefs"][name] = torch.tensor(coefs[name] + sign * 1e-6, dtype=torch.float64)
            opt.zero_grad()
            loss_at(model, 2).backward()
            opt.step()
            with torch.no_grad():
                vals.append(loss_at(model, 3).item())
        fd = (vals[0] - vals[1]) / 2e-6
        k = MADA_COEFS.index(name)
        assert abs(h[k].item() - fd) <= 1e-3 * abs(fd) + 1e-9, (name, h[k].item(), fd)


def _ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = net()
        ddp = DDP(model)
        opt = build_optimizer(model, mada_cfg(lr=0.05, hyper_lr=1.0, beta3=0.1, rho=0.5, c=0.5, gamma=0.5))
        for t in range(6):
            opt.zero_grad(set_to_none=True)
            half = slice(rank * 8, rank * 8 + 8)  # each rank sees half of the global batch
            F.mse_loss(ddp(XS[t][half]), YS[t][half]).backward()
            opt.step()
        results = [None] * world
        dist.all_gather_object(results, (opt.metrics(), [p.detach() for p in model.parameters()]))
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_identical_coefficients_and_match_single_process(tmp_path):
    """Two gloo ranks under DDP, half a batch each: identical coefficients and weights on both ranks, equal
    to one process on the whole batch (DDP's gradient average == the full-batch gradient here)."""
    import torch.multiprocessing as mp
    out = tmp_path / "out.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    (m0, w0), (m1, w1) = torch.load(out, weights_only=False)
    assert m0 == m1
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    single = net()
    opt = build_optimizer(single, mada_cfg(lr=0.05, hyper_lr=1.0, beta3=0.1, rho=0.5, c=0.5, gamma=0.5))
    train(single, opt, 6)
    assert all(abs(opt.metrics()[k] - m0[k]) < 1e-10 for k in m0)
    assert any(abs(m0[f"mada/{n}"] - v) > 1e-6 for n, v in dict(beta1=0.9, beta2=0.95, beta3=0.1).items())
    for a, b in zip(w0, single.parameters()):
        assert torch.allclose(a, b, atol=1e-10)

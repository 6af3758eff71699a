"""Rotations: orthogonality, reproducibility, SGD invariance, and Adam in a rotated basis against torch Adam
on the rotated-loss problem (an independent construction of the same optimizer)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rayexp.config import ConfigError, OptimizerConfig, RotationConfig
from rayexp.optim import build_optimizer, haar_orthogonal, rotation_memory
from rayexp.optim.rotation import seeded_generator, three_factors, training_rotation


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.c_proj = nn.Linear(6, 8), nn.Linear(8, 3)  # c_proj: randperm's second group

    def forward(self, x):
        return self.c_proj(torch.tanh(self.fc1(x)))


DATA = torch.Generator().manual_seed(7)
XS = torch.randn(20, 16, 6, generator=DATA)
YS = torch.randn(20, 16, 3, generator=DATA)


def train(model, opt, steps=20):
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        dt = next(model.parameters()).dtype
        F.mse_loss(model(XS[t].to(dt)), YS[t].to(dt)).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_haar_orthogonal_and_reproducible():
    for n in (1, 5, 64):
        q = haar_orthogonal(n, seeded_generator(3, 0, "u"), torch.float32)
        assert (q.T @ q - torch.eye(n)).abs().max() < 1e-6
        assert torch.equal(q, haar_orthogonal(n, seeded_generator(3, 0, "u"), torch.float32))
    assert not torch.allclose(haar_orthogonal(5, seeded_generator(3, 0, "u")), haar_orthogonal(5, seeded_generator(4, 0, "u")))
    assert not torch.allclose(haar_orthogonal(5, seeded_generator(3, 0, "u")), haar_orthogonal(5, seeded_generator(3, 1, "u")))


def test_haar_distribution_first_moments():
    """Haar: E[Q_ij] = 0 and E[Q_ij²] = 1/n (a sign-uncorrected QR would bias the diagonal)."""
    qs = torch.stack([haar_orthogonal(4, seeded_generator(0, i, "u")) for i in range(2000)])
    assert qs.mean(0).abs().max() < 0.06
    assert (qs.pow(2).mean(0) - 0.25).abs().max() < 0.03


def test_optimizer_rotations_orthogonal_and_seeded():
    a = build_optimizer(Net(), OptimizerConfig(name="adam"), RotationConfig(kind="per_tensor", seed=5))
    b = build_optimizer(Net(), OptimizerConfig(name="adam"), RotationConfig(kind="per_tensor", seed=5))
    c = build_optimizer(Net(), OptimizerConfig(name="adam"), RotationConfig(kind="per_tensor", seed=6))
    for (u, v), (u2, v2), (u3, _) in zip(a.rotation.mats, b.rotation.mats, c.rotation.mats):
        for m in (u, v):
            if m is not None:
                assert (m.T @ m - torch.eye(m.shape[0])).abs().max() < 1e-6
        assert torch.equal(u, u2) and (v is None or torch.equal(v, v2))
        assert not torch.allclose(u, u3)


KINDS = [("per_tensor", "both"), ("global", "both"), ("eigenbasis", "both"), ("randperm", "both"),
         ("per_tensor", "output"), ("per_tensor", "input"), ("eigenbasis", "output"), ("eigenbasis", "input")]


@pytest.mark.parametrize("kind, scope", KINDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_rotated_sgd_is_sgd(kind, scope, nesterov):
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    plain = train(m := Net(), build_optimizer(m, cfg, RotationConfig()))
    rotated = train(m := Net(), build_optimizer(m, cfg, RotationConfig(kind=kind, scope=scope, update_every=3)))
    assert (plain - rotated).abs().max() < 1e-5


@pytest.mark.parametrize("kind, scope", KINDS)
def test_rotated_adam_differs(kind, scope):
    cfg = OptimizerConfig(name="adam", lr=1e-2)
    plain = train(m := Net(), build_optimizer(m, cfg, RotationConfig()))
    rotated = train(m := Net(), build_optimizer(m, cfg, RotationConfig(kind=kind, scope=scope)))
    assert (plain - rotated).abs().max() > 1e-3


def test_one_sided_scopes_keep_one_side():
    """scope output: U only (vectors rotated); input: V only (vectors not); memory counts what is held."""
    for scope, has_u, has_v, vec_u in (("output", True, False, True), ("input", False, True, False)):
        opt = build_optimizer(Net(), OptimizerConfig(name="adam"), RotationConfig(kind="per_tensor", scope=scope))
        (u_w, v_w), (u_b, v_b) = opt.rotation.mats[0], opt.rotation.mats[1]  # fc1.weight, fc1.bias
        assert (u_w is not None, v_w is not None, u_b is not None, v_b) == (has_u, has_v, vec_u, None)
        held = sum(m.numel() * 4 for pair in opt.rotation.mats for m in pair if m is not None)
        assert opt.rotation_memory_bytes() == held


def test_global_adam_equals_torch_adam_on_the_globally_rotated_loss():
    """Adam in the basis φ = Q θ (one Haar Q over all parameters) == torch.optim.Adam on φ with loss L(Qᵀ φ)."""
    cfg = OptimizerConfig(name="adam", lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    net = Net().double()
    opt = build_optimizer(net, cfg, RotationConfig(kind="global", seed=5))
    ours = train(net, opt)
    q = haar_orthogonal(sum(p.numel() for p in net.parameters()), seeded_generator(5, "global", "q"))
    shapes = [p.shape for p in Net().parameters()]
    phi = nn.Parameter(q @ torch.cat([p.detach().double().reshape(-1) for p in Net().parameters()]))
    ref_opt = torch.optim.Adam([phi], lr=1e-2, betas=(0.9, 0.99), eps=1e-8)

    def weights():
        return [t.reshape(s) for t, s in zip(torch.split(q.T @ phi, [math.prod(s) for s in shapes]), shapes)]

    for t in range(20):
        ref_opt.zero_grad()
        w1, b1, w2, b2 = weights()
        F.mse_loss(F.linear(torch.tanh(F.linear(XS[t].double(), w1, b1)), w2, b2), YS[t].double()).backward()
        ref_opt.step()
    assert (ours - (q.T @ phi).detach()).abs().max() < 1e-10


def numpy_eigenbasis_adam(params, grads_of, steps, lr, b1, b2, eps, ema, every):
    """SOAP-like Adam, transcribed from docs/methods.md "Rotations" in numpy: per matrix L, Rs EMAs of G Gᵀ,
    Gᵀ G (vectors: L only); at t = 1, 1 + k, ... U, V = their eigenvectors (transposed) and the first moment
    re-projected into the new basis; Adam on U G Vᵀ; θ ← θ − lr Uᵀ D V."""
    state = [dict(m=np.zeros_like(p), v=np.zeros_like(p), L=None, R=None, U=None, V=None) for p in params]
    for t in range(1, steps + 1):
        for p, g, s in zip(params, grads_of(params, t - 1), state):
            a = g.reshape(len(g), -1)
            s["L"] = (1 - ema) * a @ a.T if s["L"] is None else ema * s["L"] + (1 - ema) * a @ a.T
            if g.ndim == 2:
                s["R"] = (1 - ema) * a.T @ a if s["R"] is None else ema * s["R"] + (1 - ema) * a.T @ a
            if (t - 1) % every == 0:
                U, V = np.linalg.eigh(s["L"])[1].T, (np.linalg.eigh(s["R"])[1].T if g.ndim == 2 else None)
                m = s["m"].reshape(len(g), -1)
                if s["U"] is not None:
                    m = s["U"].T @ m @ (s["V"] if s["V"] is not None else np.eye(1))
                s["m"] = (U @ m @ (V.T if V is not None else np.eye(1))).reshape(g.shape)
                s["U"], s["V"] = U, V
            gt = (s["U"] @ a @ (s["V"].T if s["V"] is not None else np.eye(1))).reshape(g.shape)
            s["m"] = b1 * s["m"] + (1 - b1) * gt
            s["v"] = b2 * s["v"] + (1 - b2) * gt ** 2
            d = (s["m"] / (1 - b1 ** t)) / (np.sqrt(s["v"] / (1 - b2 ** t)) + eps)
            d = s["U"].T @ d.reshape(len(g), -1) @ (s["V"] if s["V"] is not None else np.eye(1))
            p -= lr * d.reshape(p.shape)
    return np.concatenate([p.ravel() for p in params])


class Square(nn.Module):
    """Square weights, no biases: G Gᵀ and Gᵀ G are full rank from step 1, so every eigenbasis is unique up to
    signs (Adam does not see signs); a rank-deficient statistic would leave part of the basis arbitrary."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc1, self.fc2 = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("every", [1, 3])
def test_eigenbasis_adam_equals_a_numpy_transcription(every):
    cfg = OptimizerConfig(name="adam", lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    g = torch.Generator().manual_seed(2)
    xs, ys = (torch.randn(20, 16, 6, generator=g, dtype=torch.float64) for _ in range(2))
    net = Square().double()
    opt = build_optimizer(net, cfg, RotationConfig(kind="eigenbasis", update_every=every, ema=0.9))
    for t in range(20):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(net(xs[t]), ys[t]).backward()
        opt.step()
    ours = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).numpy()
    ref_net = Square().double()

    def grads_of(params, t):
        for p, q in zip(ref_net.parameters(), params):
            p.data, p.grad = torch.from_numpy(q.copy()), None
        F.mse_loss(ref_net(xs[t]), ys[t]).backward()
        return [p.grad.numpy().copy() for p in ref_net.parameters()]

    params = [p.detach().numpy().copy() for p in Square().double().parameters()]
    ref = numpy_eigenbasis_adam(params, grads_of, 20, 1e-2, 0.9, 0.99, 1e-8, 0.9, every)
    assert np.abs(ours - ref).max() < 1e-6  # Adam amplifies eigh round-off to ~1e-8; a wrong basis gives ~1e-2


def test_per_tensor_adam_equals_torch_adam_on_rotated_loss():
    """Adam in the basis φ = U W Vᵀ (vectors: U b) == torch.optim.Adam on φ with loss L(Uᵀ φ V)."""
    cfg = OptimizerConfig(name="adam", lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    net = Net().double()
    opt = build_optimizer(net, cfg, RotationConfig(kind="per_tensor", seed=11))
    ours = train(net, opt)
    ref_net = Net().double()
    mats = opt.rotation.mats
    params = list(ref_net.parameters())
    phis = [nn.Parameter(((u @ p.detach()) @ v.T) if v is not None else u @ p.detach())
            for p, (u, v) in zip(params, mats)]
    ref_opt = torch.optim.Adam(phis, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)

    def weights():
        return [(u.T @ phi @ v) if v is not None else u.T @ phi for phi, (u, v) in zip(phis, mats)]

    for t in range(20):
        ref_opt.zero_grad()
        w1, b1, w2, b2 = weights()
        out = F.linear(torch.tanh(F.linear(XS[t].double(), w1, b1)), w2, b2)
        F.mse_loss(out, YS[t].double()).backward()
        ref_opt.step()
    ref = torch.cat([w.detach().reshape(-1) for w in weights()])
    assert (ours - ref).abs().max() < 1e-10


def test_eigenbasis_diagonalises_statistics():
    net = Net().double()
    opt = build_optimizer(net, OptimizerConfig(name="adam", lr=1e-2), RotationConfig(kind="eigenbasis", update_every=4))
    train(net, opt, steps=9)  # refresh at steps 1, 5, 9: bases match the statistics now
    for st in opt.state.values():
        u, stat = st["rot_u"], st["eig_l"]
        rotated = u @ stat @ u.T
        off = rotated - torch.diag(torch.diagonal(rotated))
        assert off.abs().max() < 1e-10 * max(1.0, stat.abs().max().item())


def test_global_rotation_refused_for_large_models_with_memory():
    big = nn.Linear(200, 200)  # 40,200 parameters > 20,000
    with pytest.raises(ConfigError, match=r"rotation\.kind.*GiB"):
        build_optimizer(big, OptimizerConfig(name="adam"), RotationConfig(kind="global"))


def test_rotation_memory_matches_allocation():
    net = Net()
    for kind in ("per_tensor", "global"):
        opt = build_optimizer(net, OptimizerConfig(name="adam"), RotationConfig(kind=kind))
        held = (sum(m.numel() * 4 for pair in opt.rotation.mats for m in pair if m is not None)
                if kind == "per_tensor" else opt.rotation.q.numel() * 4)
        assert opt.rotation_memory_bytes() == held == rotation_memory([p.shape for p in net.parameters()],
                                                                      RotationConfig(kind=kind))


def test_max_dim_leaves_long_sides_unrotated_and_sgd_still_invariant():
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9)
    plain = train(m := Net(), build_optimizer(m, cfg))
    opt = build_optimizer(m := Net(), cfg, RotationConfig(kind="per_tensor", max_dim=6))
    assert opt.rotation.mats[0][0] is None and opt.rotation.mats[0][1] is not None  # fc1.weight 8×6
    assert (plain - train(m, opt)).abs().max() < 1e-5


# --- randperm: seed 000's rotations.py, transcribed in numpy ------------------------------------------------
def seed_forward(x, perms, qs):
    """rotations.py forward_impl + _apply_rotators (@1f2e323, :102-122): per round x ← x[perm], then
    einsum('ip,pqr,jq,kr->ijk', Q1, x.reshape(a, b, c), Q2, Q3) (the first a·b·c entries, see three_factors)."""
    for perm, (q1, q2, q3) in zip(perms, qs):
        x = x[perm]
        a, b, c = len(q1), len(q2), len(q3)
        head = np.einsum("ip,pqr,jq,kr->ijk", q1, x[:a * b * c].reshape(a, b, c), q2, q3).reshape(-1)
        x = np.concatenate([head, x[a * b * c:]])
    return x


def seed_backward(x, perms, qs):
    """rotations.py backward_impl (:125-132): rounds in reverse, the transposed factors, then [inverse_perm]."""
    for perm, (q1, q2, q3) in zip(reversed(perms), reversed(qs)):
        inv = np.empty_like(perm)
        inv[perm] = np.arange(len(perm))
        a, b, c = len(q1), len(q2), len(q3)
        head = np.einsum("ip,pqr,jq,kr->ijk", q1.T, x[:a * b * c].reshape(a, b, c), q2.T, q3.T).reshape(-1)
        x = np.concatenate([head, x[a * b * c:]])[inv]
    return x


def seed_groups(model):
    """rotations.py _make_vecs (:768-777): names ending in c_proj.weight form vec_2, all others vec_1."""
    named = list(model.named_parameters())
    return [[i for i, (n, _) in enumerate(named) if not n.endswith("c_proj.weight")],
            [i for i, (n, _) in enumerate(named) if n.endswith("c_proj.weight")]]


def tiny_gpt():
    from rayexp.config import ModelConfig
    from rayexp.models import build
    torch.manual_seed(0)
    return build(ModelConfig(preset=None, n_layer=1, n_head=1, n_embd=4, block_size=4, bias=False), 10).double()


def flat_parts(v, model):
    sizes = [p.numel() for p in model.parameters()]
    return np.split(v, np.cumsum(sizes)[:-1])


@pytest.mark.parametrize("factors", [None, [[4, 9, 11], [2, 5, 8]]])
def test_randperm_matches_numpy_transcription_of_seed000(factors):
    """R = Fᵀ (gradient → optimizer basis) and Rᵀ = F, with F the seed's forward map of each group, over
    the flat vector in named_parameters order; orthogonal to 1e-12 as a dense matrix."""
    model = tiny_gpt()
    ft = training_rotation(model, RotationConfig(kind="randperm", rounds=2, seed=3, factors=factors), dtype=torch.float64)
    rps = ft.rotation.randperms
    v = np.random.default_rng(0).standard_normal(ft.d)
    parts = flat_parts(v, model)
    fwd, bwd = [p.copy() for p in parts], [p.copy() for p in parts]
    for gi, (group, rp) in enumerate(zip(seed_groups(model), rps)):
        perms = [p.long().numpy() for p in rp.perms]
        qs = [[q.numpy() for q in round_qs] for round_qs in rp.qs]
        if factors is not None:
            assert [len(q) for q in qs[0]] == factors[gi]
        vec = np.concatenate([parts[i] for i in group])
        for out, mapped in ((fwd, seed_forward(vec, perms, qs)), (bwd, seed_backward(vec, perms, qs))):
            for i, x in zip(group, np.split(mapped, np.cumsum([parts[i].size for i in group])[:-1])):
                out[i] = x
    vt = torch.from_numpy(v)
    np.testing.assert_allclose(ft.apply(vt).numpy(), np.concatenate(bwd), atol=1e-12)
    np.testing.assert_allclose(ft.apply_t(vt).numpy(), np.concatenate(fwd), atol=1e-12)
    dense = ft.apply(torch.eye(ft.d, dtype=torch.float64)).T  # column j = R e_j
    assert (dense @ dense.T - torch.eye(ft.d, dtype=torch.float64)).abs().max() < 1e-12
    assert (dense - torch.eye(ft.d, dtype=torch.float64)).abs().max() > 0.1  # it does rotate
    assert len({int(p.numel()) for p in rps[0].perms}) == 1 and not torch.equal(rps[0].perms[0], rps[0].perms[1])


def test_randperm_factors_checked_and_fallback_orthogonal():
    with pytest.raises(ConfigError, match=r"rotation\.factors.*group sizes here are \[59, 24\]"):
        build_optimizer(Net(), OptimizerConfig(name="adam"), RotationConfig(kind="randperm", factors=[[2, 3, 4]]))
    assert three_factors(59) == (3, 3, 6) and three_factors(24) == (2, 3, 4)  # 59 is prime: a 54-entry prefix
    assert three_factors(88_984_325) == (139, 725, 883)  # seed 000: its [883, 139, 725] (rotations.py:156)
    assert three_factors(35_389_440) == (240, 384, 384)  # its c_proj group: [256, 256, 540] via rotation.factors
    ft = training_rotation(Net().double(), RotationConfig(kind="randperm", rounds=1), dtype=torch.float64)
    dense = ft.apply(torch.eye(ft.d, dtype=torch.float64))
    assert (dense @ dense.T - torch.eye(ft.d, dtype=torch.float64)).abs().max() < 1e-12


def test_randperm_adamw_is_seed000_rotated_training():
    """seed 000 (rotated_train_engine.py:146-178) trains φ with torch AdamW(weight decay 0.01 on every
    parameter) on L(F φ), φ₀ = the usual init. rayexp: adamw_seed000 preset + randperm + init rotated;
    its θ equals F φ of that reference run to 1e-10 (fp64)."""
    model = tiny_gpt()
    cfg = OptimizerConfig(preset="adamw_seed000", lr=1e-2)
    assert (cfg.name, cfg.weight_decay, cfg.decay, cfg.betas) == ("adamw", 0.01, "all", (0.9, 0.95))
    phi0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rot_cfg = RotationConfig(kind="randperm", rounds=2, seed=1, init="rotated")
    opt = build_optimizer(model, cfg, rot_cfg)
    ft = training_rotation(model, rot_cfg, dtype=torch.float64)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(ft.apply(theta0), phi0, atol=1e-12)  # φ₀ = R θ₀ = the built init
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    phi = nn.Parameter(phi0.clone())
    ref = torch.optim.AdamW([phi], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    idx = torch.randint(0, 10, (20, 3, 4), generator=torch.Generator().manual_seed(5))
    for t in range(20):
        opt.zero_grad()
        model(idx[t], idx[t])[1].backward()
        opt.step()
        ref.zero_grad()
        theta = ft.apply_t(phi)  # F φ, differentiable
        parts = dict(zip(names, torch.split(theta, [math.prod(s) for s in shapes])))
        params = {n: x.reshape(s) for (n, x), s in zip(parts.items(), shapes)}
        torch.func.functional_call(model, params, (idx[t], idx[t]))[1].backward()
        ref.step()
    ours = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (ours - ft.apply_t(phi.detach())).abs().max() < 1e-10


def test_randperm_on_a_million_entries_without_dense_matrices():
    """~1e6 coordinates (a 1000×1000 c_proj weight and 12,345 others): R and Rᵀ invert each other and keep
    norms (fp32, 1e-5), with the memory of k int32 permutations and small factors only."""
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_proj = nn.Linear(1000, 1000, bias=False)
            self.emb = nn.Parameter(torch.randn(12_345))
    model = Big()
    ft = training_rotation(model, RotationConfig(kind="randperm", rounds=2))
    v = torch.randn(ft.d)
    w = ft.apply(v)
    assert (ft.apply_t(w) - v).abs().max() < 1e-5
    assert abs(w.norm() / v.norm() - 1) < 1e-5 and (w - v).abs().max() > 0.1
    held = ft.rotation.memory_bytes()
    assert held < 2 * 4 * ft.d + 2 * 8 * 3 * 200 ** 2 and held < ft.d ** 2 / 1000  # permutations + factors
    assert all(p.dtype == torch.int32 for rp in ft.rotation.randperms for p in rp.perms)


@pytest.mark.parametrize("kind", ["per_tensor", "randperm", "global"])
def test_optimizer_indexes_named_parameters_whatever_the_param_groups(kind):
    """With weight decay the param groups put matrices first; the rotation still indexes named_parameters,
    so the gradient the optimizer rotates == training_rotation(...).apply(flat gradient) (the Hessian's map)."""
    model = Net().double()
    opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.1),
                          RotationConfig(kind=kind, seed=4))
    assert [id(p) for g in opt.param_groups for p in g["params"]] != [id(p) for p in model.parameters()]  # reordered
    assert opt.rotation.names == [n for n, _ in model.named_parameters()]
    F.mse_loss(model(XS[0].double()), YS[0].double()).backward()
    items = opt._items()
    rotated = opt.rotation.rotate([it.index for it in items], [it.g for it in items], [it.state for it in items])
    by_index = {it.index: g for it, g in zip(items, rotated)}
    ours = torch.cat([by_index[i].reshape(-1) for i in range(len(by_index))])
    grad = torch.cat([(p.grad + 0.1 * p.detach() * (p.dim() >= 2)).reshape(-1) for p in model.parameters()])
    rebuilt = training_rotation(model, RotationConfig(kind=kind, seed=4), dtype=torch.float64)
    assert torch.allclose(ours, rebuilt.apply(grad), atol=1e-6)
    assert torch.allclose(training_rotation(model, RotationConfig(kind=kind, seed=4), opt).apply(grad), ours, atol=1e-12)

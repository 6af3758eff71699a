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
from rayexp.optim.rotation import seeded_generator


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


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


@pytest.mark.parametrize("kind", ["per_tensor", "global", "eigenbasis"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_rotated_sgd_is_sgd(kind, nesterov):
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    plain = train(m := Net(), build_optimizer(m, cfg, RotationConfig()))
    rotated = train(m := Net(), build_optimizer(m, cfg, RotationConfig(kind=kind, update_every=3)))
    assert (plain - rotated).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["per_tensor", "global", "eigenbasis"])
def test_rotated_adam_differs(kind):
    cfg = OptimizerConfig(name="adam", lr=1e-2)
    plain = train(m := Net(), build_optimizer(m, cfg, RotationConfig()))
    rotated = train(m := Net(), build_optimizer(m, cfg, RotationConfig(kind=kind)))
    assert (plain - rotated).abs().max() > 1e-3


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

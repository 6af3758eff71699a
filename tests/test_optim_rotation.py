"""Rotations: orthogonality, reproducibility, SGD invariance, and Adam in a rotated basis against torch Adam
on the rotated-loss problem (an independent construction of the same optimizer)."""
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

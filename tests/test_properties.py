"""Property tests (hypothesis, few examples, no deadline): grid plans hit every point × seed exactly once,
overrides read a number in any YAML spelling, rotations are orthogonal, SGD is invariant under any
orthogonal rotation, batch shares cover the batches once, exact 1-1 rows come back in the order asked."""
import itertools
import re

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rayexp.config import ROTATION_SCOPES, OptimizerConfig, RotationConfig, parse_override
from rayexp.hessian.distributed import _split
from rayexp.hessian.estimators import l11_exact_rows
from rayexp.hessian.operator import FunctionOperator
from rayexp.optim import build_optimizer, haar_orthogonal
from rayexp.optim.rotation import apply_inverse, apply_rotation, seeded_generator
from rayexp.spaces import SweepSpec
from rayexp.sweep.plan import plan

FEW = settings(max_examples=25, deadline=None, database=None)

lrs = st.lists(st.sampled_from([1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3]), min_size=1, max_size=3, unique=True)


@FEW
@given(adam_lrs=lrs, sgd_lrs=lrs, steps=st.lists(st.integers(1, 9), min_size=1, max_size=2, unique=True),
       seeds=st.lists(st.integers(0, 99), min_size=1, max_size=3, unique=True), both=st.booleans())
def test_a_grid_plan_is_every_point_times_every_seed_exactly_once(tmp_path_factory, adam_lrs, sgd_lrs, steps, seeds,
                                                                 both):
    names = ["adamw", "sgd"] if both else ["adamw"]
    raw = {"optimizer": {"name": {"grid": names}, "adamw": {"lr": {"grid": adam_lrs}}, "sgd": {"lr": {"grid": sgd_lrs}}},
           "train": {"steps": {"grid": steps}, "warmup": 0}, "seeds": seeds,
           "output_dir": str(tmp_path_factory.getbasetemp() / "out")}
    trials = plan(SweepSpec(raw), "prop")
    want = {(n, lr, s, seed) for n in names for lr in {"adamw": adam_lrs, "sgd": sgd_lrs}[n]
            for s, seed in itertools.product(steps, seeds)}
    got = [(t.exp.optimizer.name, t.exp.optimizer.lr, t.exp.train.steps, t.exp.seed) for t in trials]
    assert len(got) == len(set(got)) == len(want) and set(got) == want
    assert len({t.key for t in trials}) == len(trials) and [t.index for t in trials] == list(range(len(trials)))


def _spellings(x: float) -> list[str]:
    """1e-3, 1E-03, 1.000000e-03, 0.001, +0.001, .001, 1.5e+3 ...: what a user may type for one number."""
    short = re.sub(r"e([+-])0*(\d)", r"e\1\2", f"{x:e}")
    out = [f"{x:e}", f"{x:E}", short, short.replace("e+", "e"), repr(x), f"{x:.12g}"]
    if x > 0:
        out.append(f"+{x!r}")
    if 0 < abs(x) < 1:
        out.append(f"{x:.15f}".replace("0.", ".", 1))
    return out


@FEW
@given(st.floats(min_value=1e-12, max_value=1e12, allow_nan=False), st.booleans())
def test_overrides_read_a_number_in_every_yaml_spelling(x, negative):
    x = -x if negative else x
    for text in _spellings(x):
        key, value = parse_override(f"optimizer.lr={text}")
        assert key == "optimizer.lr" and value == float(text), text
        assert isinstance(value, float) or (isinstance(value, int) and text.lstrip("+-").isdigit()), text
        _, space = parse_override(f"optimizer.lr={{grid: [{text}, {text}]}}")
        assert space == {"grid": [float(text), float(text)]}, text


@FEW
@given(st.integers(0, 10 ** 6), st.integers(1, 6), st.integers(1, 6))
def test_haar_rotations_are_orthogonal_and_keep_norms(seed, m, n):
    u, v = (haar_orthogonal(k, seeded_generator(seed, 0, side)) for k, side in ((m, "u"), (n, "v")))
    assert torch.allclose(u @ u.T, torch.eye(m, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(v.T @ v, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    r = apply_rotation(x, u, v)
    assert torch.allclose(r, u @ x @ v.T) and torch.allclose(r.norm(), x.norm())
    assert torch.allclose(apply_inverse(r, u, v), x, atol=1e-12)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(4, 5), torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _train(opt_cfg, rot_cfg, steps=8):
    net = Net().double()
    opt = build_optimizer(net, opt_cfg, rot_cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


@FEW
@given(kind=st.sampled_from(["per_tensor", "global", "eigenbasis", "randperm"]), seed=st.integers(0, 10 ** 6),
       lr=st.floats(1e-3, 0.5), momentum=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans(),
       wd=st.sampled_from([0.0, 0.01]), every=st.integers(1, 4), scope=st.sampled_from(ROTATION_SCOPES),
       rounds=st.integers(1, 3))
def test_sgd_is_the_same_under_any_orthogonal_rotation(kind, seed, lr, momentum, nesterov, wd, every, scope, rounds):
    if nesterov and momentum == 0.0:
        momentum = 0.5
    cfg = OptimizerConfig(name="sgd", lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    plain = _train(cfg, RotationConfig())
    extra = {"scope": scope} if kind in ("per_tensor", "eigenbasis") else {"rounds": rounds} if kind == "randperm" else {}
    rotated = _train(cfg, RotationConfig(kind=kind, seed=seed, update_every=every, **extra))
    assert torch.allclose(plain, rotated, atol=1e-10)


@FEW
@given(seed=st.integers(0, 10 ** 6), d=st.integers(2, 9), lr=st.floats(1e-3, 0.5),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), nesterov=st.booleans(), wd=st.sampled_from([0.0, 0.01]))
def test_zoo_sgd_commutes_with_an_arbitrary_orthogonal_change_of_variables(seed, d, lr, momentum, nesterov, wd):
    """Without rayexp's rotations: a Q drawn here (QR of a Gaussian), the zoo SGD on φ with loss f(Qᵀφ)
    from φ₀ = Qθ₀ stays at φ_t = Qθ_t, θ_t the zoo SGD on f from θ₀."""
    if nesterov and momentum == 0.0:
        momentum = 0.5
    g = np.random.default_rng(seed)
    Q = torch.from_numpy(np.linalg.qr(g.standard_normal((d, d)))[0])
    A, b = torch.from_numpy(g.standard_normal((d, d))), torch.from_numpy(g.standard_normal(d))
    f = lambda x: (torch.tanh(A @ x) - b).pow(2).sum()  # noqa: E731
    cfg = OptimizerConfig(name="sgd", lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)

    def run(x0, loss):
        net = torch.nn.Module()
        net.x = torch.nn.Parameter(x0.clone())
        opt = build_optimizer(net, cfg, RotationConfig())
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            loss(net.x).backward()
            opt.step()
        return net.x.detach()

    theta0 = torch.from_numpy(g.standard_normal(d))
    theta = run(theta0, f)
    phi = run(Q @ theta0, lambda p: f(Q.T @ p))
    assert torch.allclose(phi, Q @ theta, atol=1e-10)


@FEW
@given(st.integers(0, 40), st.integers(1, 12))
def test_batch_shares_cover_every_batch_once_contiguously_and_balanced(n, world):
    shares = _split(n, world)
    assert len(shares) == world and sum(shares, []) == list(range(n))
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


@FEW
@given(st.lists(st.integers(0, 11), min_size=1, max_size=20), st.integers(1, 5))
def test_exact_rows_come_back_in_the_order_asked(rows, chunk):
    H = torch.from_numpy(np.random.default_rng(0).standard_normal((12, 12)))
    H = H + H.T
    got = l11_exact_rows(FunctionOperator(lambda v: H @ v, 12), rows, chunk=chunk)
    assert np.allclose(got, H.abs().sum(1).numpy()[rows], rtol=1e-12)

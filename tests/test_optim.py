"""The optimizer zoo against torch.optim and against numpy references written from the formulas."""
import io
import random
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn

from rayexp.config import ConfigError, OptimizerConfig, RotationConfig, validate
from rayexp.optim import OPTIMIZERS, build_optimizer, is_elementwise, param_groups, state_bytes_per_param


class Params(nn.Module):
    """A bag of parameters of the given shapes (the 'model' of the property tests)."""

    def __init__(self, shapes, seed, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes])


def fake_grads(model, step):
    """Deterministic gradients depending on the current parameters: g = a⊙p + sin(3p) + noise_t."""
    for i, p in enumerate(model.ps):
        g = torch.Generator().manual_seed(1000 * step + i)
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        p.grad = 0.5 * p.detach() + torch.sin(3 * p.detach()) + noise


def run(model, opt, steps, lrs):
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        fake_grads(model, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.ps]


def random_case(rng: random.Random):
    shapes = [tuple(rng.randint(1, 7) for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(1, 4))]
    shapes.append((rng.randint(2, 6), rng.randint(2, 6)))  # at least one matrix so weight decay applies
    return shapes


def torch_reference(name, groups, cfg):
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_optim_property(name, dtype):
    """50 steps, random shapes and hyperparameters, a varying lr: max |Δθ| ≤ 1e-6 against torch.optim."""
    rng = random.Random(zlib.crc32(f"{name}/{dtype}".encode()))  # seeded (str hash is salted per process)
    worst = 0.0
    for case in range(6):
        shapes = random_case(rng)
        cfg = OptimizerConfig(name=name, lr=10 ** rng.uniform(-4, -1.5),
                              betas=(rng.uniform(0.0, 0.99), rng.uniform(0.5, 0.999)),
                              eps=10 ** rng.uniform(-10, -6), weight_decay=rng.choice([0.0, 10 ** rng.uniform(-3, -1)]),
                              momentum=rng.choice([0.0, rng.uniform(0.1, 0.99)]), nesterov=False)
        if name == "sgd" and cfg.momentum > 0:
            cfg.nesterov = rng.random() < 0.5
        lrs = [cfg.lr * (0.5 + 0.5 * np.cos(np.pi * t / 50)) + 1e-5 for t in range(50)]
        ours_model, ref_model = Params(shapes, case, dtype), Params(shapes, case, dtype)
        ours = run(ours_model, build_optimizer(ours_model, cfg, RotationConfig()), 50, lrs)
        ref = run(ref_model, torch_reference(name, param_groups(ref_model, cfg.weight_decay), cfg), 50, lrs)
        for a, b in zip(ours, ref):
            worst = max(worst, (a - b).abs().max().item())
    assert worst <= 1e-6, f"{name} {dtype}: max deviation from torch.optim {worst:.3g}"


def numpy_adam(ps, grads_fn, steps, lr, b1, b2, eps, granularity, freeze=None):
    """Adam with v shared over groups, written from the formula (float64 numpy)."""
    ps = [p.copy() for p in ps]
    m = [np.zeros_like(p) for p in ps]
    v = [None] * len(ps)
    for t in range(1, steps + 1):
        gs = grads_fn(ps, t - 1)
        total = sum((g ** 2).sum() for g in gs) / sum(g.size for g in gs)
        for i, (p, g) in enumerate(zip(ps, gs)):
            if granularity == "coordinate":
                sq = g ** 2
            elif granularity == "global":
                sq = np.full(g.shape, total)
            elif granularity == "row" and g.ndim >= 2:
                sq = np.broadcast_to((g ** 2).reshape(g.shape[0], -1).mean(1).reshape((-1,) + (1,) * (g.ndim - 1)), g.shape)
            elif granularity == "column" and g.ndim >= 2:
                sq = np.broadcast_to(np.moveaxis(g ** 2, 1, 0).reshape(g.shape[1], -1).mean(1)
                                     .reshape((1, -1) + (1,) * (g.ndim - 2)), g.shape)
            else:
                sq = np.full(g.shape, (g ** 2).mean())
            m[i] = b1 * m[i] + (1 - b1) * g
            if freeze is None or t <= freeze:
                v[i] = b2 * (v[i] if v[i] is not None else 0.0) + (1 - b2) * sq
            tv = t if freeze is None else min(t, freeze)
            p -= lr * (m[i] / (1 - b1 ** t)) / (np.sqrt(v[i] / (1 - b2 ** tv)) + eps)
    return ps


def np_grads(ps, t):
    out = []
    for i, p in enumerate(ps):
        g = torch.Generator().manual_seed(1000 * t + i)
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).numpy()
        out.append(0.5 * p + np.sin(3 * p) + noise)
    return out


@pytest.mark.parametrize("granularity", ["coordinate", "row", "column", "tensor", "global"])
@pytest.mark.parametrize("freeze", [None, 7])
def test_granularity_against_numpy(granularity, freeze):
    shapes = [(5, 3), (4, 3, 2), (6,), ()]
    model = Params(shapes, 0, torch.float64)
    start = [p.detach().numpy().copy() for p in model.ps]
    cfg = OptimizerConfig(name="adam", lr=0.01, betas=(0.9, 0.95), eps=1e-8, granularity=granularity,
                          freeze_v_after=freeze)
    ours = run(model, build_optimizer(model, cfg), 25, [0.01] * 25)
    ref = numpy_adam(start, np_grads, 25, 0.01, 0.9, 0.95, 1e-8, granularity, freeze)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-10)


def test_coordinate_is_adam_and_global_on_one_parameter_is_adam():
    """coordinate == torch Adam; every granularity on a single-coordinate problem == torch Adam."""
    lrs = [3e-2] * 50
    ref_model = Params([(1,)], 3, torch.float64)
    ref = run(ref_model, torch.optim.Adam(ref_model.parameters(), lr=3e-2, betas=(0.9, 0.95), eps=1e-8), 50, lrs)
    for gran in ("coordinate", "row", "column", "tensor", "global"):
        model = Params([(1,)], 3, torch.float64)
        out = run(model, build_optimizer(model, OptimizerConfig(name="adam", lr=3e-2, granularity=gran)), 50, lrs)
        assert torch.allclose(out[0], ref[0], atol=1e-12, rtol=0), gran


def test_frozen_v_after_more_steps_than_run_is_adam_and_otherwise_differs():
    shapes = [(4, 3)]
    lrs = [1e-2] * 20
    adam = run(m := Params(shapes, 1, torch.float64), build_optimizer(m, OptimizerConfig(name="adam", lr=1e-2)), 20, lrs)
    late = run(m := Params(shapes, 1, torch.float64),
               build_optimizer(m, OptimizerConfig(name="adam", lr=1e-2, freeze_v_after=20)), 20, lrs)
    early = run(m := Params(shapes, 1, torch.float64),
                build_optimizer(m, OptimizerConfig(name="adam", lr=1e-2, freeze_v_after=3)), 20, lrs)
    assert torch.equal(adam[0], late[0])
    assert (adam[0] - early[0]).abs().max() > 1e-4


@pytest.mark.parametrize("momentum", [0.0, 0.8])
def test_signum_against_formula(momentum):
    """m ← βm + (1−β)g; θ ← θ(1 − lr·wd) − lr·sign(m) (decoupled wd on matrices only); β = 0: signSGD."""
    shapes = [(3, 4), (5,)]
    model = Params(shapes, 2, torch.float64)
    ps = [p.detach().numpy().copy() for p in model.ps]
    lr, wd = 0.01, 0.1
    ours = run(model, build_optimizer(model, OptimizerConfig(name="signum", lr=lr, momentum=momentum,
                                                             weight_decay=wd)), 30, [lr] * 30)
    m = [np.zeros_like(p) for p in ps]
    for t in range(30):
        gs = np_grads(ps, t)
        for i, g in enumerate(gs):
            m[i] = momentum * m[i] + (1 - momentum) * g
            decay = wd if ps[i].ndim >= 2 else 0.0
            ps[i] = ps[i] * (1 - lr * decay) - lr * np.sign(m[i])
    for a, b in zip(ours, ps):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-12)


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name,rotation", [("sgd", "none"), ("signum", "none"), ("adam", "none"),
                                           ("adamw", "per_tensor"), ("adam", "eigenbasis"), ("mada", "none"),
                                           ("mada", "per_tensor")])
def test_state_dict_round_trip_is_exact(name, rotation):
    """Run 5 steps, checkpoint (torch.save/load, weights_only), resume in a fresh optimizer: bit-identical."""
    shapes = [(4, 3), (3,)]
    cfg = OptimizerConfig(name=name, lr=1e-2, weight_decay=0.1, granularity="row" if name == "adamw" else "coordinate")
    rot = RotationConfig(kind=rotation, update_every=3)
    lrs = [1e-2 * (1 + 0.1 * t) for t in range(10)]
    a = Params(shapes, 0)
    opt_a = build_optimizer(a, cfg, rot)
    run(a, opt_a, 5, lrs)
    sd = _save_load(opt_a.state_dict())
    b = Params(shapes, 0)
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, cfg, rot)
    opt_b.load_state_dict(sd)
    for t in range(5, 10):
        for m, o in ((a, opt_a), (b, opt_b)):
            for group in o.param_groups:
                group["lr"] = lrs[t]
            fake_grads(m, t)
            o.step()
    for p, q in zip(a.ps, b.ps):
        assert torch.equal(p, q)
    assert opt_a.metrics() == opt_b.metrics()


def test_weight_decay_only_on_matrices_and_lr_from_param_groups():
    model = Params([(3, 3), (3,)], 0)
    opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.5))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    before = [p.detach().clone() for p in model.ps]
    for g in opt.param_groups:
        g["lr"] = 0.2  # the loop's schedule
    for p in model.ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.ps[0], before[0] * (1 - 0.2 * 0.5))
    assert torch.equal(model.ps[1], before[1])


def test_state_bytes_match_allocated_state():
    """The bytes per parameter that --list prints equal the state actually allocated after one step."""
    model = Params([(8, 6), (6,)], 0)
    n = sum(p.numel() for p in model.ps)
    for name in OPTIMIZERS:
        cfg = OptimizerConfig(name=name)
        opt = build_optimizer(model, cfg)
        fake_grads(model, 0)
        opt.step()
        opt.step()  # MADA allocates its pre-step copies on the first step
        allocated = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
                        if torch.is_tensor(v) and k != "step")
        assert allocated == state_bytes_per_param(cfg) * n, name


def test_is_elementwise():
    assert is_elementwise(OptimizerConfig(name="adamw"), RotationConfig())
    assert is_elementwise(OptimizerConfig(name="sgd"), RotationConfig())
    assert is_elementwise(OptimizerConfig(name="signum"), None)
    assert not is_elementwise(OptimizerConfig(name="adam", granularity="row"), RotationConfig())
    assert not is_elementwise(OptimizerConfig(name="adamw"), RotationConfig(kind="per_tensor"))
    assert not is_elementwise(OptimizerConfig(name="mada"), RotationConfig())


@pytest.mark.parametrize("raw,field", [
    ({"optimizer": {"name": "lamb"}}, "optimizer.name"),
    ({"optimizer": {"granularity": "block"}}, "optimizer.granularity"),
    ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas"),
    ({"optimizer": {"betas": [-0.1, 0.9]}}, "optimizer.betas"),
    ({"optimizer": {"lr": -1e-3}}, "optimizer.lr"),
    ({"optimizer": {"momentum": 1.0}}, "optimizer.momentum"),
    ({"optimizer": {"name": "mada", "mada": {"beta2": 0.2}}}, "optimizer.mada.beta2"),
    ({"optimizer": {"mada": {"hyper_lr": {"delta": 0.1}}}}, "optimizer.mada.hyper_lr"),
    ({"rotation": {"kind": "random"}}, "rotation.kind"),
])
def test_bad_input_names_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(raw)


def test_list_prints_table(capsys):
    from rayexp.optim.__main__ import main
    main(["--list", "--preset", "gpt2-tiny"])
    out = capsys.readouterr().out
    for name in OPTIMIZERS:
        assert name in out
    assert "per_tensor" in out and "eigenbasis" in out and "global" in out


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("freeze", [None, 3])
def test_foreach_adam_is_bitwise_the_per_tensor_update(name, freeze):
    """The native-basis fast path (family.update_many, foreach kernels) against adam_update per tensor."""
    import dataclasses

    from rayexp.optim.core import ZooOptimizer
    from rayexp.optim.registry import hyperparameters
    cfg = OptimizerConfig(name=name, lr=3e-3, weight_decay=0.1, freeze_v_after=freeze)
    shapes = [(5, 4), (4,), (3, 2, 2), ()]
    fast_model, slow_model = Params(shapes, 0), Params(shapes, 0)
    fast = build_optimizer(fast_model, cfg, RotationConfig())
    defaults, _ = hyperparameters(cfg)
    per_tensor = dataclasses.replace(OPTIMIZERS[name], update_many=None)
    slow = ZooOptimizer(param_groups(slow_model, cfg.weight_decay), per_tensor, defaults, RotationConfig())
    lrs = [3e-3 * (1 - t / 10) for t in range(8)]
    for a, b in zip(run(fast_model, fast, 8, lrs), run(slow_model, slow, 8, lrs)):
        assert torch.equal(a, b)

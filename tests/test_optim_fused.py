"""The fused zoo steps (rayexp.optim.fused) against the per-tensor reference step, on random problems.

Most tests run the fused kernels eagerly (``fused.COMPILE = False``: the same list code, no inductor),
which checks the math, the state conventions and the bucketing quickly; ``test_compiled_*`` run the
inductor-compiled kernels (C++ via gcc on CPU), which is what CUDA runs.
"""
import random
import zlib

import pytest
import torch
import torch.nn as nn

from rayexp.config import OptimizerConfig, RotationConfig
from rayexp.optim import build_optimizer, fused
from rayexp.optim.registry import use_fused

TOL = 1e-6


class Params(nn.Module):
    def __init__(self, shapes, seed, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes])


def random_shapes(rng: random.Random) -> list[tuple]:
    shapes = [tuple(rng.randint(1, 6) for _ in range(rng.randint(0, 3))) for _ in range(rng.randint(1, 4))]
    return shapes + [(rng.randint(2, 6), rng.randint(2, 6))]  # a matrix, so weight decay has a group


def train(model, opt, steps: int, skip: int | None = None) -> None:
    """``steps`` steps of g = p/2 + sin(3p) + noise_t at a varying lr; parameter ``skip`` has no gradient
    on odd steps (its step count falls behind: a second bucket)."""
    base = [g["lr"] for g in opt.param_groups]
    for t in range(steps):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * (1 - t / (2 * steps))
        for i, p in enumerate(model.ps):
            gen = torch.Generator().manual_seed(1000 * t + i)
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad = None if (i == skip and t % 2) else 0.5 * p.detach() + torch.sin(3 * p.detach()) + noise
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_fused_equals_reference(cfg: OptimizerConfig, rot: RotationConfig, shapes, steps=6, skip=None,
                                  dtype=torch.float32) -> None:
    ref_model, fused_model = Params(shapes, 0, dtype), Params(shapes, 0, dtype)
    ref = build_optimizer(ref_model, cfg.model_copy(update={"fused": False}), rot)
    fus = build_optimizer(fused_model, cfg.model_copy(update={"fused": True}), rot)
    assert ref.fused_step is None and fus.fused_step is not None
    train(ref_model, ref, steps, skip)
    train(fused_model, fus, steps, skip)
    for a, b in zip(ref_model.ps, fused_model.ps):
        torch.testing.assert_close(b, a, atol=TOL, rtol=TOL)
    for pa, pb in zip(ref_model.ps, fused_model.ps):
        sa, sb = ref.state[pa], fus.state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], atol=TOL, rtol=TOL, msg=lambda m: f"state {key}: {m}")


@pytest.fixture
def eager_kernels(monkeypatch):
    monkeypatch.setattr(fused, "COMPILE", False)


CASES = ([dict(name="sgd", momentum=m, nesterov=n, weight_decay=wd) for m, n in ((0.0, False), (0.9, False),
                                                                                  (0.9, True)) for wd in (0.0, 0.1)]
         + [dict(name="signum", momentum=m, weight_decay=0.1) for m in (0.0, 0.9)]
         + [dict(name=n, granularity=g, freeze_v_after=f, weight_decay=0.1)
            for n in ("adam", "adamw") for g in ("coordinate", "row", "column", "tensor", "global") for f in (None, 3)]
         + [dict(name="mada", weight_decay=0.1,
                 mada=dict(beta3=0.3, rho=0.5, c=0.5, gamma=0.7, hyper_lr=0.05, hyper_momentum=0.5))]
         + [dict(name="adamw", weight_decay=0.1, decay="all"),
            dict(name="mada", weight_decay=0.1, decay="all", hypergrad_delay=2, hypergrad_clip=1e-3,
                 mada=dict(beta3=0.3, rho=0.5, c=0.5, gamma=0.7, hyper_lr=0.05, hyper_momentum=0.5,
                           seed_quirks=["g_prev_zero", "double_coef_step"]))])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for k, v in c.items() if k != "mada"))
def test_fused_step_equals_reference(case, eager_kernels):
    """Every family, v granularity and frozen v, 3 random problems each, one tensor without a gradient on
    odd steps: parameters and every state tensor within 1e-6 of the per-tensor step."""
    rng = random.Random(zlib.crc32(repr(case).encode()))
    for _ in range(3):
        shapes = random_shapes(rng)
        cfg = OptimizerConfig(lr=rng.choice([1e-3, 3e-2]), **case)
        assert_fused_equals_reference(cfg, RotationConfig(), shapes, skip=rng.randrange(len(shapes)))


@pytest.mark.parametrize("kind", ["per_tensor", "eigenbasis", "global", "randperm", "per_tensor:output",
                                  "eigenbasis:input"])
@pytest.mark.parametrize("case", [dict(name="adamw", granularity="row"), dict(name="sgd", momentum=0.9),
                                  dict(name="mada"), dict(name="adamw", decay="all")], ids=lambda c: c["name"])
def test_fused_step_under_rotations_equals_reference(kind, case, eager_kernels):
    """Rotated bases: the fused kernel gives the directions, the optimizer un-rotates and applies them."""
    kind, _, scope = kind.partition(":")
    rot = RotationConfig(kind=kind, scope=scope or "both", update_every=2, max_dim=5)
    assert_fused_equals_reference(OptimizerConfig(lr=1e-2, weight_decay=0.1, **case), rot,
                                  [(4, 3), (3,), (6, 2), ()], skip=1 if kind not in ("global", "randperm") else None)


def test_fused_float64(eager_kernels):
    assert_fused_equals_reference(OptimizerConfig(name="adamw", weight_decay=0.1), RotationConfig(),
                                  [(5, 4), (4,)], dtype=torch.float64)


def test_fused_auto_is_on_for_cuda_only():
    cpu = Params([(2, 2)], 0)
    assert not use_fused(cpu, OptimizerConfig())
    assert use_fused(cpu, OptimizerConfig(fused=True))
    assert not use_fused(cpu, OptimizerConfig(fused=False))
    with torch.device("meta"):
        meta = Params([(2, 2)], 0)
    assert not use_fused(meta, OptimizerConfig())


def test_compiled_adamw_equals_reference_and_compiles_once():
    """The inductor-compiled AdamW kernel (what CUDA runs) within 1e-6 of the reference; after the first
    step (one graph per bucket) no step compiles again although lr and the bias corrections change."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    cfg, shapes = OptimizerConfig(name="adamw", lr=3e-3, weight_decay=0.1), [(5, 4), (3, 2, 2)]  # one bucket
    assert_fused_equals_reference(cfg, RotationConfig(), shapes, steps=3)
    model = Params(shapes, 1)
    opt = build_optimizer(model, cfg.model_copy(update={"fused": True}))
    train(model, opt, 1)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    train(model, opt, 6)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
@pytest.mark.parametrize("case", [dict(name="sgd", momentum=0.9, nesterov=True), dict(name="signum"),
                                  dict(name="adam", granularity="row", freeze_v_after=2),
                                  dict(name="adamw", granularity="global"), dict(name="mada", mada=dict(beta3=0.2))],
                         ids=lambda c: c["name"])
def test_compiled_families_equal_reference(case):
    """The compiled kernels of the other families (~10-40 s each on CPU), and no recompilation in the
    steady state (MADA's coefficients change every step; adam's frozen v adds one graph at the freeze)."""
    from torch._dynamo.utils import counters
    cfg, shapes = OptimizerConfig(lr=1e-2, weight_decay=0.1, **case), [(5, 4), (4,), (3, 2, 2)]
    assert_fused_equals_reference(cfg, RotationConfig(), shapes, steps=4, skip=1)
    model = Params(shapes, 1)
    opt = build_optimizer(model, cfg.model_copy(update={"fused": True}))
    train(model, opt, 1)
    graphs = counters["stats"]["unique_graphs"]
    train(model, opt, 8)
    assert counters["stats"]["unique_graphs"] - graphs <= (1 if case.get("freeze_v_after") else 0)


@pytest.mark.slow
def test_run_training_with_the_compiled_fused_step_follows_the_reference(tmp_path):
    """run_training on CPU with optimizer.fused=true (the compiled kernels, as on CUDA) against fused=false:
    the same loss curve to 1e-5 over 12 steps of gpt2-tiny (clip on, two param groups)."""
    from rayexp.spaces import load_experiment
    from rayexp.train.loop import run_training
    curves = {}
    for flag in ("false", "true"):
        exp = load_experiment(None, ["train.steps=12", "train.log_every=1", "train.eval_every=12",
                                     "train.eval_batches=1", "train.batch_size=4", "train.warmup=2",
                                     "optimizer.lr=3e-3", "optimizer.weight_decay=0.1", f"optimizer.fused={flag}",
                                     f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache"])
        res = run_training(exp, workdir=str(tmp_path / flag))
        curves[flag] = [h["train_loss"] for h in res.history if "train_loss" in h]
    assert len(curves["true"]) == 12
    assert max(abs(a - b) for a, b in zip(curves["false"], curves["true"])) < 1e-5

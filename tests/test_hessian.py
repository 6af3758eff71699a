"""Curvature engine vs dense Hessians from torch.autograd.functional.hessian (models ≤ 2,000 params, fp64)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from rayexp.config import ConfigError
from rayexp.hessian.hvp import HVP, param_blocks
from rayexp.hessian.lanczos import power_iteration, top_eigs
from rayexp.models import GPT, ConvConfig, GPTConfig, TokenCNN, TokenMLP

V = 16


def make_model(kind: str, **over):
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(GPTConfig(**{**dict(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=8,
                                       attention="naive"), **over}))
    cfg = ConvConfig(vocab_size=V, block_size=8, n_layer=1 if kind == "mlp" else 2, n_embd=8)
    return TokenCNN(cfg) if kind == "cnn" else TokenMLP(cfg)


def make_batches(n=2, bs=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(V, (bs, 8), generator=g), torch.randint(V, (bs, 8), generator=g)) for _ in range(n)]


def dense_reference(model, batches) -> torch.Tensor:
    """Hessian of the mean fp64 cross-entropy over batches, by torch.autograd.functional.hessian."""
    m = copy.deepcopy(model).double()
    named = list(m.named_parameters())
    sizes = [p.numel() for _, p in named]

    def loss(flat):
        params = {n: t.view(p.shape) for (n, p), t in zip(named, torch.split(flat, sizes))}
        tot = 0
        for x, y in batches:
            logits = functional_call(m, params, (x,))[0]
            tot = tot + F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        return tot / len(batches)

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    return torch.autograd.functional.hessian(loss, flat, vectorize=True)


@pytest.fixture(scope="module", params=["gpt", "mlp", "cnn"])
def case(request):
    model, batches = make_model(request.param), make_batches()
    H = dense_reference(model, batches)
    assert H.shape[0] <= 2000
    return request.param, model, batches, H


@pytest.mark.parametrize("mode", ["fwd_rev", "double_backward"])
def test_hvp_matches_dense_hessian(case, mode):
    _, model, batches, H = case
    op = HVP(model, batches, mode=mode, dtype="fp64")
    assert op.d == H.shape[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(op.d, generator=g, dtype=torch.float64)
        ref = H @ v
        assert (op(v) - ref).norm() / ref.norm() < 1e-5
    assert op.count == 3
    # numpy in, numpy out; fp32 mode still close
    v = np.random.default_rng(0).standard_normal(op.d)
    out = HVP(model, batches, mode=mode, dtype="fp32")(v)
    assert isinstance(out, np.ndarray)
    assert np.linalg.norm(out - H.numpy() @ v) / np.linalg.norm(H.numpy() @ v) < 1e-3


def test_vmapped_and_block_products(case):
    _, model, batches, H = case
    op = HVP(model, batches)
    V_ = torch.randn(4, op.d, dtype=torch.float64)
    assert torch.allclose(op.many(V_, chunk=3), V_ @ H, rtol=0, atol=1e-10 * H.abs().max())
    blocks = op.blocks[:3]
    vs = [torch.randn(b.size, dtype=torch.float64) for b in blocks]
    for b, vb, hb in zip(blocks, vs, op.block_many(blocks, vs)):
        ref = H[b.slice, b.slice] @ vb
        assert torch.allclose(hb, ref, atol=1e-10 * H.abs().max())
        assert torch.allclose(op.block_matvec(b)(vb), ref, atol=1e-10 * H.abs().max())


def test_gradient_matches_autograd(case):
    _, model, batches, _ = case
    op = HVP(model, batches)
    m = copy.deepcopy(model).double()
    for x, y in batches:
        (F.cross_entropy(m(x)[0].reshape(-1, V), y.reshape(-1)) / len(batches)).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert torch.allclose(op.grad(), ref, rtol=1e-10, atol=1e-14)


def test_lanczos_top5_matches_eigvalsh(case):
    _, model, batches, H = case
    ev = torch.linalg.eigvalsh(H).numpy()[::-1]
    op = HVP(model, batches)
    got = top_eigs(op, op.d, k=5, steps=80)
    assert np.all(np.abs(got - ev[:5]) <= 1e-6 * np.abs(ev[:5]))
    # seed-000 start (normalized mean gradient) and largest magnitude
    got_mag = top_eigs(op, op.d, k=1, steps=80, v0=op.grad(), by="magnitude")
    top_mag = ev[np.argmax(np.abs(ev))]
    assert abs(got_mag[0] - top_mag) <= 1e-6 * abs(top_mag)


def test_power_iteration_baseline_finds_top_magnitude():
    model, batches = make_model("mlp"), make_batches()
    H = dense_reference(model, batches)
    ev = torch.linalg.eigvalsh(H).numpy()
    top = ev[np.argmax(np.abs(ev))]
    lam, used = power_iteration(HVP(model, batches), H.shape[0], k=1, iters=500, tol=1e-9)
    assert abs(lam[0] - top) < 1e-4 * abs(top) and used > 1


def test_qkv_blocks_partition_the_vector():
    model = make_model("gpt")
    blocks = param_blocks(model)
    names = [b.name for b in blocks]
    assert "transformer.h.0.attn.c_attn.weight.q" in names and "transformer.h.0.attn.c_attn.bias.v" in names
    assert blocks[0].start == 0 and blocks[-1].stop == sum(p.numel() for p in model.parameters())
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    q = next(b for b in blocks if b.name.endswith("c_attn.weight.q"))
    assert q.size == 8 * 8  # C rows of the (3C, C) weight


@pytest.mark.parametrize("over, field", [({"attention": "sdpa"}, "attention"), ({"dropout": 0.1}, "dropout")])
def test_refuses_models_without_exact_hvps(over, field):
    with pytest.raises(ConfigError, match=f"model.{field}"):
        HVP(make_model("gpt", **over), make_batches())


def test_bad_arguments():
    model = make_model("mlp")
    with pytest.raises(ConfigError, match="hessian.mode"):
        HVP(model, make_batches(), mode="finite_diff")
    with pytest.raises(ValueError, match="batch"):
        HVP(model, [])
    op = HVP(model, make_batches())
    with pytest.raises(ValueError, match="length d"):
        op(torch.zeros(3))


def test_numpy_operator_adapter_feeds_lanczos():
    from rayexp.hessian.lanczos import numpy_matvec
    g = np.random.default_rng(0)
    a = g.standard_normal((30, 30))
    A = a + a.T
    got = top_eigs(numpy_matvec(lambda v: A @ v), 30, k=3, steps=30)
    assert np.allclose(got, np.linalg.eigvalsh(A)[::-1][:3], rtol=1e-10)

"""Curvature engine vs dense Hessians from torch.autograd.functional.hessian (models ≤ 2,000 params, fp64),
and Lanczos vs an independent numpy transcription of Golub & Van Loan's Alg. 10.1.1."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from rayexp.config import ConfigError
from rayexp.hessian.hvp import HVP, MODES, param_blocks
from rayexp.hessian.lanczos import lanczos, power_iteration, top_eigs
from rayexp.hessian.operator import FunctionOperator, Operator
from rayexp.hessian.probes import CHUNK, probe
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
    """Hessian of the mean fp64 cross-entropy over batches, by torch.autograd.functional.hessian, of the model in
    eval mode (BatchNorm on running statistics) with the math attention kernel (twice differentiable); targets
    equal to IGNORE_INDEX (cross_entropy's default ignore_index) are left out of each batch's mean.
    (``torch.func.hessian`` and ``jacrev(jacrev)`` of a ViT loss are not even symmetric in torch 2.13: no
    reference.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    m = copy.deepcopy(model).double().eval()
    named = list(m.named_parameters())
    sizes = [p.numel() for _, p in named]

    def loss(flat):
        params = {n: t.view(p.shape) for (n, p), t in zip(named, torch.split(flat, sizes))}
        tot = 0
        for x, y in batches:
            logits = functional_call(m, params, (x,))[0]
            tot = tot + F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        return tot / len(batches)

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(loss, flat, vectorize=True)


@pytest.fixture(scope="module", params=["gpt", "mlp", "cnn"])
def case(request):
    model, batches = make_model(request.param), make_batches()
    H = dense_reference(model, batches)
    assert H.shape[0] <= 2000
    return request.param, model, batches, H


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", MODES)
def test_products_match_dense_hessian(case, mode):
    _, model, batches, H = case
    op = Operator(HVP(model, batches, mode=mode, dtype="fp64"))
    assert op.d == H.shape[0]
    V_ = torch.randn(3, op.d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tol = 1e-6 if mode == "fd" else 1e-12  # central difference: O(ε²) truncation, ε = ∛eps·(1+‖θ‖)/‖v‖
    assert rel(op.matmat(V_), V_ @ H) < tol
    assert rel(op.matvec(V_[0]), H @ V_[0]) < tol
    assert op.count == 4


@pytest.mark.parametrize("dtype, tol", [("fp32", 1e-4), ("tf32", 1e-4)])
def test_fp32_products_are_close(case, dtype, tol):
    _, model, batches, H = case
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for mode in ("cached", "fwd_rev", "fd"):
        err = rel(Operator(HVP(model, batches, mode=mode, dtype=dtype)).matvec(v), H @ v)
        assert err < (1e-1 if mode == "fd" else tol), (mode, err)  # fp32 central differences: a few % (docs/methods.md)


def test_block_view_is_the_diagonal_block(case):
    from rayexp.hessian.operator import BlockView, block_products
    _, model, batches, H = case
    op = Operator(HVP(model, batches, mode="fwd_rev"))
    blocks = op.blocks[:3]
    vs = [torch.randn(b.size, dtype=torch.float64) for b in blocks]
    _, products = block_products(op, blocks)
    for b, vb, hb in zip(blocks, vs, products([0, 1, 2], vs)):
        ref = H[b.slice, b.slice] @ vb
        assert torch.allclose(hb, ref, atol=1e-10 * H.abs().max())
        assert torch.allclose(BlockView(op, b).matvec(vb), ref, atol=1e-10 * H.abs().max())


def test_gradient_and_loss_match_autograd(case):
    _, model, batches, _ = case
    op = Operator(HVP(model, batches))
    m = copy.deepcopy(model).double()
    loss = 0.0
    for x, y in batches:
        ell = F.cross_entropy(m(x)[0].reshape(-1, V), y.reshape(-1)) / len(batches)
        ell.backward()
        loss += float(ell.detach())
    ref = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert torch.allclose(op.grad(), ref, rtol=1e-10, atol=1e-14)
    assert abs(op.loss() - loss) < 1e-12


class Regressor(torch.nn.Module):
    """A user's module: plain outputs (no tuple, no targets), trained with MSE plus an L2 penalty."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))

    def forward(self, x):
        return self.net(x)


def mse_l2(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y) + 1e-2 * sum((p ** 2).sum() for p in model.parameters())


def test_user_module_with_its_own_loss():
    """Any (model, loss_fn(model, batch), batches): HVPs and both ends of the spectrum vs a dense Hessian of
    the same loss written with torch.autograd.functional.hessian."""
    model = Regressor()
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g)) for _ in range(2)]
    named = list(model.double().named_parameters())
    sizes = [p.numel() for _, p in named]

    def loss(flat):
        params = {n: t.view(p.shape) for (n, p), t in zip(named, torch.split(flat, sizes))}
        return sum(F.mse_loss(functional_call(model, params, (x.double(),)), y.double())
                   + 1e-2 * sum((t ** 2).sum() for t in params.values()) for x, y in batches) / len(batches)

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    H = torch.autograd.functional.hessian(loss, flat)
    ev = torch.linalg.eigvalsh(H).numpy()
    for mode in ("cached", "double_backward", "fd"):  # fwd_rev: torch 2.13 has no forward AD of mse_loss's backward
        op = Operator(HVP(model, batches, mse_l2, mode=mode, dtype="fp64"))
        v = torch.randn(op.d, dtype=torch.float64)
        assert rel(op.matvec(v), H @ v) < (1e-6 if mode == "fd" else 1e-12)
    op = Operator(HVP(model, batches, mse_l2, mode="cached", dtype="fp64"))
    top, bottom = top_eigs(op, k=2, steps=op.d, which="both")
    assert np.allclose(top, ev[::-1][:2], rtol=1e-9) and np.allclose(bottom, ev[:2], rtol=1e-9, atol=1e-12)


def test_sdpa_math_kernel_equals_naive_attention():
    naive = make_model("gpt")
    sdpa = make_model("gpt", attention="sdpa")
    sdpa.load_state_dict(naive.state_dict())
    batches = make_batches()
    H = dense_reference(naive, batches)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    for mode in ("cached", "fwd_rev"):
        assert rel(Operator(HVP(sdpa, batches, mode=mode, dtype="fp64")).matvec(v), H @ v) < 1e-12


def numpy_lanczos(A: np.ndarray, v0: np.ndarray, m: int):
    """Golub & Van Loan Alg. 10.1.1 with full reorthogonalization, written independently of rayexp."""
    Q = [v0 / np.linalg.norm(v0)]
    alpha, beta = [], []
    for j in range(m):
        w = A @ Q[j]
        alpha.append(Q[j] @ w)
        w = w - alpha[j] * Q[j] - (beta[j - 1] * Q[j - 1] if j else 0)
        for q in Q:
            w = w - (q @ w) * q
        if j < m - 1:
            beta.append(np.linalg.norm(w))
            Q.append(w / beta[j])
    return np.array(alpha), np.array(beta)


def spread_matrix(n=30, seed=0, top=15.0) -> np.ndarray:
    """Q diag(λ) Qᵀ with λ evenly in [−5, 10] and a separated top eigenvalue ``top``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.append(np.linspace(-5.0, 10.0, n - 1), top)) @ q.T


@pytest.mark.parametrize("reorth", ["none", "full", "selective"])
def test_lanczos_recurrence_matches_numpy_transcription(reorth):
    """At 8 steps of a 30×30 matrix the three-term recurrence is still orthogonal to ~1e-12, so every
    reorthogonalization mode must reproduce the reference α and β; a dropped or flipped β·q_{j−1} term
    changes them at O(1)."""
    A = spread_matrix()
    v0 = np.random.default_rng(1).standard_normal(30)
    a_ref, b_ref = numpy_lanczos(A, v0, 8)
    T = lanczos(FunctionOperator.numpy(lambda v: A @ v, 30), torch.from_numpy(v0), 8, reorth)
    assert np.allclose(T.alpha, a_ref, atol=1e-10) and np.allclose(T.beta, b_ref, atol=1e-10)


@pytest.mark.parametrize("reorth", ["full", "selective"])
def test_lanczos_extremes_match_eigvalsh_with_reorthogonalization(reorth):
    A = spread_matrix()
    ev = np.linalg.eigvalsh(A)
    op = FunctionOperator.numpy(lambda v: A @ v, 30)
    top, bottom = top_eigs(op, k=3, steps=30, which="both", reorth=reorth)
    assert np.allclose(top, ev[::-1][:3], atol=1e-9) and np.allclose(bottom, ev[:3], atol=1e-9)


def test_three_term_recurrence_alone_reaches_the_top_eigenvalue():
    """Without reorthogonalization, 12 steps already give λ_max to 1e-6 (well separated top of a wide spectrum)."""
    A = spread_matrix(200, seed=2)
    ev = np.linalg.eigvalsh(A)
    got = top_eigs(FunctionOperator.numpy(lambda v: A @ v, 200), k=1, steps=40, reorth="none")
    assert abs(got[0] - ev[-1]) < 1e-6 * abs(ev[-1])


def test_lanczos_top5_and_magnitude_on_a_model(case):
    _, model, batches, H = case
    ev = torch.linalg.eigvalsh(H).numpy()[::-1]
    op = Operator(HVP(model, batches, mode="fwd_rev"))
    got = top_eigs(op, k=5, steps=80)
    assert np.all(np.abs(got - ev[:5]) <= 1e-6 * np.abs(ev[:5]))
    got_mag = top_eigs(op, k=1, steps=80, v0=op.grad(), which="magnitude")  # seed 000's start and report
    top_mag = ev[np.argmax(np.abs(ev))]
    assert abs(got_mag[0] - top_mag) <= 1e-6 * abs(top_mag)


def test_power_iteration_baseline_finds_top_magnitude():
    model, batches = make_model("mlp"), make_batches()
    H = dense_reference(model, batches)
    ev = torch.linalg.eigvalsh(H).numpy()
    top = ev[np.argmax(np.abs(ev))]
    lam, used = power_iteration(Operator(HVP(model, batches, mode="fwd_rev")), k=1, iters=500, tol=1e-9)
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


def test_probe_parts_compose_the_whole_probe():
    """A process holding only span [lo, hi) draws exactly those entries (chunk boundaries crossed)."""
    d = 2 * CHUNK + 12345
    whole = probe(d, "gaussian", 7, 3, "t")
    cuts = [0, 5, CHUNK - 1, CHUNK + 2, 2 * CHUNK + 100, d]
    parts = [probe(d, "gaussian", 7, 3, "t", slice(a, b)) for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(probe(d, "gaussian", 7, 4, "t", slice(0, 9)), whole[:9])


def test_refuses_dropout():
    with pytest.raises(ConfigError, match="model.dropout"):
        HVP(make_model("gpt", dropout=0.1), make_batches())


def test_bad_arguments():
    model = make_model("mlp")
    with pytest.raises(ConfigError, match="hessian.mode"):
        HVP(model, make_batches(), mode="finite_diff")
    with pytest.raises(ConfigError, match="hessian.dtype"):
        HVP(model, make_batches(), dtype="bf16")
    with pytest.raises(ValueError, match="reorth"):
        lanczos(FunctionOperator(lambda v: v, 4), torch.ones(4), 3, "partial")

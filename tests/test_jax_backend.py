"""JAX port of GPT-2 (pre- and post-LN) / TokenMLP / TokenCNN vs torch: logits, loss, gradient, HVP (torch.func and
dense Hessian), Lanczos on the JAX operator vs on the torch one, and ``hessian.backend=jax`` through ``analyze`` and
the CLI against ``backend=torch``. Skipped without the ``jax`` extra (``pip install .[jax]``)."""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, jvp  # noqa: E402

from rayexp.hessian import HVP, Operator, top_eigs  # noqa: E402
from rayexp.hessian.jax_backend import (arch, forward, jax_grad_fn, jax_hvp_fn, loss_fn,  # noqa: E402
                                        params_from_torch, x64)
from rayexp.hessian.operator import FunctionOperator  # noqa: E402
from rayexp.models import GPT, ConvConfig, GPTConfig, TokenCNN, TokenMLP  # noqa: E402

V = 16


def make_model(kind: str, n_layer: int = 1, **over):
    """A tiny fp64 model with every parameter perturbed (nonzero biases, LayerNorm gains ≠ 1)."""
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(**{**dict(vocab_size=V, block_size=8, n_layer=n_layer, n_head=2, n_embd=8,
                                        attention="naive", dropout=0.0), **over}))
    else:
        cfg = ConvConfig(vocab_size=V, block_size=8, n_layer=n_layer, n_embd=8, **over)
        model = TokenCNN(cfg) if kind == "cnn" else TokenMLP(cfg)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def make_batches(n=2, bs=3, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(V, (bs, T), generator=g), torch.randint(V, (bs, T), generator=g)) for _ in range(n)]


def torch_mean_loss(model, batches):
    """Flat θ and L(flat θ) = mean fp64 cross-entropy over batches, through functional_call."""
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]

    def loss(flat):
        params = {n: t.view(p.shape) for (n, p), t in zip(named, torch.split(flat, sizes))}
        tot = 0
        for x, y in batches:
            logits = functional_call(model, params, (x,))[0]
            tot = tot + F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        return tot / len(batches)

    return torch.cat([p.detach().reshape(-1) for _, p in named]), loss


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_logits_and_loss_match_torch(bias):
    """GPT only (TokenMLP/TokenCNN: their gradients and HVPs match torch to 1e-10 below; a compile each spared)."""
    model = make_model("gpt", bias=bias)
    (x, y), = make_batches(n=1, T=6)  # T < block_size: position table and causal mask are sliced
    logits_t = model(x)[0].detach()
    loss_t = F.cross_entropy(logits_t.reshape(-1, V), y.reshape(-1)).item()
    with x64():
        params = params_from_torch(model)
        assert all(p.dtype == jnp.float64 for p in params.values())
        both = jax.jit(lambda p, x, y: (forward(p, x, arch(model)), loss_fn(p, x, y, arch(model))))
        logits_j, loss_j = both(params, x.numpy(), y.numpy())
    assert np.abs(np.asarray(logits_j) - logits_t.numpy()).max() < 1e-12
    assert abs(float(loss_j) - loss_t) < 1e-10 * loss_t
    # the model's own loss: outside autocast GPT.forward casts the logits with .float(), so fp32 even for fp64
    assert abs(float(loss_j) - model(x, y)[1].item()) < 1e-5 * loss_t


def test_flat_ordering_and_tied_weights():
    model = make_model("gpt")
    params = params_from_torch(model)
    assert "lm_head.weight" not in params  # tied to transformer.wte.weight, counted once
    assert list(params) == [n for n, _ in model.named_parameters()]
    assert sum(p.size for p in params.values()) == sum(p.numel() for p in model.parameters())


def test_grad_matches_autograd():
    """jax_grad_fn vs torch.autograd.grad, at the model's θ and at another flat θ. (The MLP: the flattening
    is the HVP's, checked on GPT below; GPT's XLA compile costs ~10 s of CPU per function.)"""
    model = make_model("mlp")
    batches = make_batches()
    theta, loss = torch_mean_loss(model, batches)
    g_ref = torch.autograd.grad(loss(theta.requires_grad_()), theta)[0].numpy()
    gfn = jax_grad_fn(model, batches)
    g = gfn()
    assert g.shape == theta.shape and g.dtype == np.float64
    assert rel(g, g_ref) < 1e-10
    theta2 = theta.detach() + 0.1 * torch.randn(theta.numel(), dtype=torch.float64)
    g2_ref = torch.autograd.grad(loss(theta2.requires_grad_()), theta2)[0].numpy()
    assert rel(gfn(theta2.detach().numpy()), g2_ref) < 1e-10
    assert rel(g2_ref, g_ref) > 1e-3  # θ really moved


@pytest.mark.parametrize("kind", ["gpt", "mlp", "cnn"])
def test_hvp_matches_torch_func(kind):
    """Independent torch reference: jvp(grad(L)) over functional_call, in fp64."""
    model = make_model(kind)
    batches = make_batches()
    theta, loss = torch_mean_loss(model, batches)
    hvp = jax_hvp_fn(model, batches, dtype="float64")
    rng = np.random.default_rng(0)
    for _ in range(3):
        v = rng.standard_normal(theta.numel())
        ref = jvp(grad(loss), (theta,), (torch.from_numpy(v),))[1].numpy()
        out = hvp(v)
        assert out.dtype == np.float64 and out.shape == v.shape
        assert rel(out, ref) < 1e-5
        assert rel(out, ref) < 1e-10  # in fact equal to rounding


@pytest.fixture(scope="module")
def gpt_case():
    """The tiny GPT (d = 1080), its batches, flat θ, the torch loss of flat θ and its dense Hessian."""
    model = make_model("gpt")
    batches = make_batches()
    theta, loss = torch_mean_loss(model, batches)
    H = torch.autograd.functional.hessian(loss, theta, vectorize=True).numpy()
    assert H.shape[0] <= 2000
    return model, batches, H


def test_hvp_matches_dense_hessian(gpt_case):
    model, batches, H = gpt_case
    hvp = jax_hvp_fn(model, batches)
    rng = np.random.default_rng(1)
    for _ in range(3):
        v = rng.standard_normal(H.shape[0])
        assert rel(hvp(v), H @ v) < 1e-5
    # a column: H e_i, on a LayerNorm gain coordinate and on an embedding row
    for i in (0, H.shape[0] - 10):
        e = np.zeros(H.shape[0])
        e[i] = 1.0
        assert rel(hvp(e), H[:, i]) < 1e-5


def test_lanczos_on_jax_operator_matches_torch_operator(gpt_case):
    """The hessian package's Lanczos (same start vector) on the JAX operator, through ``FunctionOperator.numpy``, and
    on the torch ``HVP``: equal top Ritz values, both equal to eigvalsh of the dense Hessian."""
    model, batches, H = gpt_case
    exact = np.linalg.eigvalsh(H)[::-1][:2]
    jax_top = top_eigs(FunctionOperator.numpy(jax_hvp_fn(model, batches), H.shape[0]), k=2, steps=20)
    torch_top = top_eigs(Operator(HVP(model, batches, dtype="fp64")), k=2, steps=20)
    assert np.abs(jax_top - torch_top).max() < 1e-10 * abs(exact[0])
    assert np.abs(jax_top - exact).max() < 1e-8 * abs(exact[0])


def test_float32_and_global_x64_untouched():
    model = make_model("mlp")  # the dtype plumbing is model-independent; the MLP compiles fastest
    batches = make_batches()
    v = np.random.default_rng(2).standard_normal(sum(p.numel() for p in model.parameters()))
    h64 = jax_hvp_fn(model, batches, dtype="float64")(v)
    h32 = jax_hvp_fn(model, batches, dtype="fp32")(v)
    assert h32.dtype == np.float64  # returned as float64, computed in float32
    assert 1e-9 < rel(h32, h64) < 1e-4
    assert not jax.config.jax_enable_x64  # x64 only inside our calls
    assert jnp.asarray(np.ones(2)).dtype == jnp.float32


def test_bad_inputs():
    model = make_model("gpt")
    with pytest.raises(ValueError, match="dtype"):
        jax_hvp_fn(model, make_batches(), dtype="float16")
    with pytest.raises(ValueError, match="length d="):
        jax_hvp_fn(model, make_batches())(np.zeros(3))
    with pytest.raises(ValueError, match="no JAX port"):
        params_from_torch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch"):
        jax_hvp_fn(model, [])
    with pytest.raises(ValueError, match="block_size 8"):
        jax_hvp_fn(model, make_batches(T=9))


# -- hessian.backend: torch | jax ----------------------------------------------------------------------
def test_post_ln_port_matches_torch():
    model = make_model("gpt", norm="post")
    (x, y), = make_batches(n=1, T=6)
    with x64():
        logits = forward(params_from_torch(model), x.numpy(), arch(model))
    assert arch(model).norm == "post" and "transformer.ln_f.weight" not in params_from_torch(model)
    assert np.abs(np.asarray(logits) - model(x)[0].detach().numpy()).max() < 1e-12


def test_backend_jax_equals_torch_through_analyze_in_fp64():
    """The same tasks on the same post-LN GPT with hessian.backend=torch and =jax (one Operator interface:
    gradient start vector, per-batch operators, rotated basis): equal to 1e-6, in fact to rounding."""
    from rayexp.config import HessianConfig
    from rayexp.hessian import analyze
    model, batches = make_model("gpt", norm="post"), make_batches()
    out = {}
    for backend in ("torch", "jax"):
        cfg = HessianConfig(tasks=["top_eigs", "trace", "l11", "block_curvature"], dtype="fp64", backend=backend,
                            top_eigs_steps=20, hutchinson_probes=4, cauchy_vectors=4, curvature_steps=4,
                            blocks=["transformer.h.0.attn.c_attn.weight.q", "transformer.h.0.mlp.c_fc.weight"])
        out[backend] = analyze(model, batches, cfg, progress=False)
    assert "jax products" in out["jax"]["plan"] and "jax" not in out["torch"]["plan"]
    for key in ("top_eigs", "block_curvature", "l11_rows", "l11_rotated_rows"):
        a, b = out["torch"]["arrays"][key], out["jax"]["arrays"][key]
        assert np.abs(a).max() > 0 and np.abs(a - b).max() < 1e-6 * np.abs(a).max(), key
        assert np.abs(a - b).max() < 1e-12 * np.abs(a).max(), key
    for key in ("lambda_max", "grad_norm", "hutchinson_trace"):
        assert abs(out["jax"]["metrics"][key] - out["torch"]["metrics"][key]) < 1e-10 * abs(out["torch"]["metrics"][key])
    assert out["jax"]["hvps"] == out["torch"]["hvps"]


def test_backend_jax_refuses_what_it_cannot_compute():
    from rayexp.config import ConfigError, HessianConfig, validate
    from rayexp.hessian import analyze
    from rayexp.hessian.hvp import token_cross_entropy
    cfg = HessianConfig(backend="jax", dtype="fp64")
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten())
    with pytest.raises(ConfigError, match="hessian.backend=jax: Sequential has no JAX port; allowed: model.kind gpt2"):
        analyze(conv, [(torch.rand(1, 3, 4, 4), torch.tensor([0]))], cfg, progress=False)
    with pytest.raises(ConfigError, match="custom loss needs hessian.backend=torch"):
        analyze(make_model("mlp"), make_batches(), cfg, token_cross_entropy, progress=False)
    with pytest.raises(ConfigError, match="hessian.dtype=tf32 has no JAX counterpart; allowed"):
        analyze(make_model("mlp"), make_batches(), HessianConfig(backend="jax", dtype="tf32"), progress=False)
    with pytest.raises(ConfigError, match="backend=jax runs in one process"):
        validate({"hessian": {"backend": "jax", "actors": 2}})
    with pytest.raises(ConfigError, match=r"hessian\.backend: 'xla' is not allowed; allowed: 'torch' or 'jax'"):
        validate({"hessian": {"backend": "xla"}})


def test_cli_backend_jax_top_eigs_equal_torch_in_fp64(in_tmp, capsys):
    """``python -m rayexp.hessian --checkpoint C backend=jax dtype=fp64``: the top eigenvalues equal torch's to 1e-6
    (relative to λ_max; in fact to rounding); a bad backend value is one line naming the field and the values."""
    from rayexp.config import validate
    from rayexp.data import load_tokens
    from rayexp.hessian.__main__ import main
    from rayexp.models import build
    from rayexp.train.checkpoint import save_checkpoint
    exp = validate({"model": {"preset": None, "n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8},
                    "hessian": {"batches": 2, "batch_size": 2, "top_eigs_steps": 12, "top_k": 3}})
    vocab = load_tokens(exp.data, 8).vocab_size
    torch.manual_seed(0)
    save_checkpoint("ckpt", build(exp.model, vocab), None, 0, exp, {"vocab_size": vocab})
    tops = {}
    for backend in ("torch", "jax"):
        args = ["--checkpoint", "ckpt", "--tasks", "top_eigs", f"backend={backend}", "dtype=fp64", "--out", backend]
        assert main(args + ["--no-progress"]) == 0
        assert f"({backend if backend == 'jax' else 'fwd_rev'} products" in capsys.readouterr().out
        tops[backend] = np.load(f"{backend}/hessian.npz")["top_eigs"]
    assert len(tops["jax"]) == 3 and np.abs(tops["jax"] - tops["torch"]).max() < 1e-6 * abs(tops["torch"][0])
    assert main(["--checkpoint", "ckpt", "backend=xla"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "hessian.backend" in err and "'torch' or 'jax'" in err

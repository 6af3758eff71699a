"""GPT-2 model: attention kernels agree, weight tying, parameter count and MFU formula."""
import math

import pytest
import torch

from rayexp.config import ModelConfig
from rayexp.models.gpt2 import GPT, GPTConfig, PRESETS, gpt_config


def _pair(**kw):
    torch.manual_seed(0)
    naive = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, attention="naive", **kw))
    sdpa = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, attention="sdpa", **kw))
    sdpa.load_state_dict(naive.state_dict())
    return naive, sdpa


def test_naive_and_sdpa_attention_agree_in_fp32():
    naive, sdpa = _pair(loss="full")  # the logits too
    x = torch.randint(97, (3, 32))
    ln, loss_n = naive(x, x)
    ls, loss_s = sdpa(x, x)
    assert torch.allclose(ln, ls, atol=1e-5, rtol=1e-5)
    assert abs(loss_n.item() - loss_s.item()) < 1e-5
    loss_n.backward(), loss_s.backward()
    for (name, a), b in zip(naive.named_parameters(), sdpa.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_attention_is_causal():
    naive, _ = _pair()
    x = torch.randint(97, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 97
    assert torch.allclose(naive(x)[0][0, :10], naive(y)[0][0, :10], atol=1e-6)


def test_weight_tying_and_parameter_count():
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8)
    m = GPT(cfg)
    assert m.lm_head.weight is m.transformer.wte.weight
    d, L, V, T = 8, 1, 50, 16
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    expected = V * d + T * d + L * per_block + 2 * d
    assert m.num_params(non_embedding=False) == expected == sum(p.numel() for p in m.parameters())
    assert m.num_params() == expected - T * d


def test_presets_and_mfu_formula():
    """6N + 12·L·d·T against torch's FlopCounterMode on a real forward + backward (naive attention): the
    counted matmul FLOPs are exactly 6 × (matrix parameters, the tied head once) + 12·L·d·T per token, and
    nanoGPT's N differs from the matrix parameters only by the biases and LayerNorm gains (6 FLOPs each)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = gpt_config(ModelConfig(preset="gpt2-124m"), 50304)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    m = GPT(gpt_config(ModelConfig(preset="gpt2-tiny", attention="naive"), 256))
    c, B = m.config, 2
    x, y = torch.randint(256, (B, c.block_size)), torch.randint(256, (B, c.block_size))
    with FlopCounterMode(display=False) as counter:
        m(x, y)[1].backward()
    counted = counter.get_total_flops() / (B * c.block_size)
    named = dict(m.named_parameters())
    matrices = sum(p.numel() for n, p in named.items() if p.dim() == 2 and "wpe" not in n)
    vectors = sum(p.numel() for p in named.values() if p.dim() == 1)
    assert counted == 6 * matrices + 12 * c.n_layer * c.n_embd * c.block_size
    assert m.flops_per_token() == counted + 6 * vectors
    assert math.isclose(m.estimate_mfu(1000.0, 1e12), (counted + 6 * vectors) * 1000.0 / 1e12)
    assert m.flops_per_token(seq_len=16) == m.flops_per_token() - 12 * c.n_layer * c.n_embd * (c.block_size - 16)
    assert set(PRESETS) == {"gpt2-tiny", "gpt2-mini", "gpt2-124m", "gpt2-350m"}


def test_dropout_is_active_only_in_train_mode():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8, dropout=0.5))
    x = torch.randint(20, (2, 8))
    m.eval()
    assert torch.equal(m(x)[0], m(x)[0])
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])


def test_sequence_longer_than_block_is_rejected():
    m = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_gpt_vocabulary_is_rounded_up_to_model_vocab_multiple():
    assert gpt_config(ModelConfig(), 50257).vocab_size == 50304  # nanoGPT's padded GPT-2 vocabulary
    assert gpt_config(ModelConfig(), 256).vocab_size == 256  # bytes: already a multiple
    assert gpt_config(ModelConfig(vocab_multiple=1), 50257).vocab_size == 50257


def _loss_pair(**kw):
    torch.manual_seed(0)
    full = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, loss="full", **kw))
    chunked = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, loss="chunked", **kw))
    chunked.load_state_dict(full.state_dict())
    return full, chunked


@pytest.mark.parametrize("chunk", [None, 7, 64])
def test_chunked_loss_equals_full_loss_and_gradients_fp32(chunk, monkeypatch):
    """model.loss=chunked (fused lm_head + cross-entropy over token chunks, uneven last chunk included)
    against logits + F.cross_entropy: loss and every parameter gradient (tied wte/lm_head too) to 1e-5."""
    import rayexp.models.gpt2 as gpt2
    if chunk:
        monkeypatch.setattr(gpt2, "LOSS_CHUNK_ELEMENTS", chunk * 97)
    full, chunked = _loss_pair()
    x, y = torch.randint(97, (3, 32)), torch.randint(97, (3, 32))
    logits, loss_f = full(x, y)
    none, loss_c = chunked(x, y)
    assert logits.shape == (3, 32, 97) and none is None
    assert abs(loss_f.item() - loss_c.item()) < 1e-5
    (2.5 * loss_f).backward(), (2.5 * loss_c).backward()  # the incoming gradient scales both
    for (name, a), b in zip(full.named_parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-5), name


def test_chunked_loss_function_against_cross_entropy_on_random_shapes():
    from rayexp.models.gpt2 import chunked_cross_entropy
    g = torch.Generator().manual_seed(0)
    for n, c, v, chunk in [(1, 3, 5, 1), (10, 4, 11, 3), (33, 8, 50, 64), (17, 2, 3, 16)]:
        h = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(v, c, generator=g, dtype=torch.float64, requires_grad=True)
        y = torch.randint(v, (n,), generator=g)
        ref = torch.nn.functional.cross_entropy(h @ w.T, y)
        got = chunked_cross_entropy(h, w, y, chunk)
        assert torch.allclose(got, ref, atol=1e-12, rtol=1e-12)
        gr = torch.autograd.grad(ref, (h, w))
        gg = torch.autograd.grad(got, (h, w))
        for a, b in zip(gr, gg):
            assert torch.allclose(a, b, atol=1e-12, rtol=1e-12)
        with torch.no_grad():  # the loss-only path (evaluation)
            assert torch.allclose(chunked_cross_entropy(h, w, y, chunk), ref, atol=1e-12, rtol=1e-12)


def test_chunked_loss_under_bf16_autocast_is_close_to_full():
    """Under CPU bf16 autocast both paths run the matmuls in bf16 and the softmax in fp32."""
    full, chunked = _loss_pair()
    x, y = torch.randint(97, (3, 32)), torch.randint(97, (3, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_f, loss_c = full(x, y)[1], chunked(x, y)[1]
    assert loss_c.dtype == torch.float32
    assert abs(loss_f.item() - loss_c.item()) < 2e-2
    loss_f.backward(), loss_c.backward()
    for a, b in zip(full.parameters(), chunked.parameters()):
        assert (a.grad - b.grad).norm() <= 0.05 * a.grad.norm() + 1e-6


def test_chunked_loss_has_no_double_backward():
    """The Hessian differentiates the full logits (model(x)[0]); the chunked loss refuses create_graph use."""
    _, chunked = _loss_pair()
    x = torch.randint(97, (2, 8))
    loss = chunked(x, x)[1]
    g = torch.autograd.grad(loss, list(chunked.parameters()), create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(sum((t * t).sum() for t in g), list(chunked.parameters()))


def test_sdpa_backend_is_validated_and_cpu_keeps_torchs_kernel():
    with pytest.raises(ValueError, match="sdpa_backend"):
        GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=4, sdpa_backend="fast"))
    from rayexp.models.gpt2 import sdpa_context
    import contextlib
    assert isinstance(sdpa_context("cudnn", torch.zeros(1)), contextlib.nullcontext)


def test_precise_fp32_sdpa_training_curve_equals_naive(tmp_path):
    """Precise mode: 20 fp32 steps of gpt2-tiny through run_training with attention=sdpa (on CUDA the
    memory-efficient kernel; here torch's CPU kernel) follow the naive-attention run to 1e-5 per step."""
    from rayexp.spaces import load_experiment
    from rayexp.train.loop import run_training
    curves = {}
    for attention in ("naive", "sdpa"):
        exp = load_experiment(None, ["train.steps=20", "train.log_every=1", "train.eval_every=20",
                                     "train.eval_batches=1", "train.batch_size=4", "train.warmup=2",
                                     "train.precision=fp32", "optimizer.lr=3e-3", f"model.attention={attention}",
                                     f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache"])
        res = run_training(exp, workdir=str(tmp_path / attention))
        curves[attention] = [h["train_loss"] for h in res.history if "train_loss" in h]
    assert len(curves["naive"]) == 20
    assert max(abs(a - b) for a, b in zip(curves["naive"], curves["sdpa"])) < 1e-5


@pytest.mark.parametrize("loss", ["chunked", "full"])
def test_training_forward_traces_without_graph_breaks(loss):
    """train.compile: dynamo captures the training forward (sdpa kernel choice, chunked loss and its
    autograd.Function) as one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=16, loss=loss))
    x = torch.randint(97, (2, 16))
    explanation = torch._dynamo.explain(model)(x, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# -- model.norm: pre | post ----------------------------------------------------------------------------
def _post_ln_reference(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Post-LN GPT written out from the formula (Vaswani et al. 2017; RoBERTa's layers, seed 003):
    x ← LN₁(x + Attn(x)), x ← LN₂(x + W₂ GELU(W₁ x)), logits = x Eᵀ, no final LayerNorm."""
    import torch.nn.functional as F
    sd = {k: v for k, v in model.state_dict().items()}
    C, H = model.config.n_embd, model.config.n_head
    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(model.config.n_layer):
        w = lambda name: sd[f"transformer.h.{i}.{name}"]  # noqa: E731
        qkv = x @ w("attn.c_attn.weight").T + w("attn.c_attn.bias")
        q, k, v = (t.reshape(B, T, H, C // H).permute(0, 2, 1, 3) for t in qkv.chunk(3, dim=-1))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(C // H)
        att = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1) @ v
        att = att.permute(0, 2, 1, 3).reshape(B, T, C) @ w("attn.c_proj.weight").T + w("attn.c_proj.bias")
        x = F.layer_norm(x + att, (C,), w("ln_1.weight"), w("ln_1.bias"), eps=1e-5)
        h = F.gelu(x @ w("mlp.c_fc.weight").T + w("mlp.c_fc.bias")) @ w("mlp.c_proj.weight").T + w("mlp.c_proj.bias")
        x = F.layer_norm(x + h, (C,), w("ln_2.weight"), w("ln_2.bias"), eps=1e-5)
    return x @ sd["transformer.wte.weight"].T


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
def test_post_ln_forward_equals_the_written_out_formula(attention):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16, attention=attention,
                          norm="post")).double()
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0, so their placement matters
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    assert "ln_f" not in model.transformer
    idx = torch.randint(29, (3, 11))
    logits = model(idx)[0]
    assert torch.allclose(logits, _post_ln_reference(model, idx), atol=1e-12, rtol=1e-12)
    pre = GPT(GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16, attention=attention)).double()
    pre.load_state_dict(model.state_dict(), strict=False)  # same weights, pre-LN placement: another function
    assert (pre(idx)[0] - logits).abs().max() > 1e-2


def test_pre_ln_is_the_default_and_unchanged():
    """norm=pre keeps nanoGPT's blocks: the forward equals x + attn(ln_1 x), x + mlp(ln_2 x), ln_f, head, bitwise,
    and the parameters (names, order, initial values) are those of a model built without the setting."""
    assert ModelConfig().norm == "pre" and GPTConfig().norm == "pre"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16, attention="naive"))
    torch.manual_seed(0)
    explicit = GPT(GPTConfig(vocab_size=29, block_size=16, n_layer=2, n_head=2, n_embd=16, attention="naive",
                             norm="pre"))
    assert [n for n, _ in model.named_parameters()][-2:] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    for (n, a), (m, b) in zip(model.state_dict().items(), explicit.state_dict().items()):
        assert n == m and torch.equal(a, b)
    idx = torch.randint(29, (2, 16))
    t = model.transformer
    x = t.wte(idx) + t.wpe(torch.arange(16))
    for blk in t.h:
        x = x + blk.attn(blk.ln_1(x))
        x = x + blk.mlp(blk.ln_2(x))
    assert torch.equal(model(idx)[0], model.lm_head(t.ln_f(x)))


def test_model_norm_is_validated():
    from rayexp.config import ConfigError, validate
    with pytest.raises(ConfigError, match=r"model\.norm: 'mid' is not allowed; allowed: 'pre' or 'post'"):
        validate({"model": {"norm": "mid"}})
    assert gpt_config(ModelConfig(norm="post"), 97).norm == "post"

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
    naive, sdpa = _pair()
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
    cfg = gpt_config(ModelConfig(preset="gpt2-124m"), 50304)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    m = GPT(gpt_config(ModelConfig(preset="gpt2-tiny"), 256))
    c = m.config
    fpt = 6 * m.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size
    assert m.flops_per_token() == fpt
    assert math.isclose(m.estimate_mfu(1000.0, 1e12), fpt * 1000.0 / 1e12)
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

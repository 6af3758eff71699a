"""GPT-2 as in nanoGPT: learned positions, pre-LayerNorm blocks, GELU MLP 4x, tied embeddings.

Init: N(0, 0.02) for linear/embedding weights, residual projections (``c_proj``) scaled by
1/sqrt(2 n_layer). Attention is ``naive`` (explicit softmax: exact, supports double backward and
forward-mode AD, which Hessian-vector products need) or ``sdpa`` (torch's fused kernel: fast).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "gpt2-tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "gpt2-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
}


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attention: str = "sdpa"  # naive | sdpa

    def to_dict(self) -> dict:
        return asdict(self)


def gpt_config(model_cfg, vocab_size: int) -> GPTConfig:
    """GPTConfig from a ``rayexp.config.ModelConfig`` (preset, then explicit sizes override it); the
    vocabulary is rounded up to ``model.vocab_multiple``."""
    sizes = dict(PRESETS[model_cfg.preset]) if model_cfg.preset else {}
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        if getattr(model_cfg, k) is not None:
            sizes[k] = getattr(model_cfg, k)
    if sizes["n_embd"] % sizes["n_head"]:
        raise ValueError(f"model.n_embd ({sizes['n_embd']}) must be divisible by model.n_head ({sizes['n_head']})")
    m = model_cfg.vocab_multiple
    return GPTConfig(vocab_size=-(-vocab_size // m) * m, dropout=model_cfg.dropout, bias=model_cfg.bias,
                     attention=model_cfg.attention, **sizes)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.attention not in ("naive", "sdpa"):
            raise ValueError(f"attention {cfg.attention!r}; allowed: naive, sdpa")
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout, self.attention = cfg.n_head, cfg.n_embd, cfg.dropout, cfg.attention
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; nanoGPT's convention subtracts position embeddings (tied wte stays)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, V) and, given targets, the mean token cross-entropy."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            # Under autocast, cross_entropy already runs in fp32 (autocast's fp32 op list) straight from the
            # bf16 logits; an explicit upcast there costs a second (B·T, V) copy (benchmarks/RESULTS.md).
            flat = logits.view(-1, logits.size(-1))
            # bf16/fp16 weights without autocast: upcast; fp32 and fp64 models keep their own precision
            if flat.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(flat.device.type):
                flat = flat.float()
            loss = F.cross_entropy(flat, targets.reshape(-1))
        return logits, loss

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token as nanoGPT estimates them: 6N + 12 L H Q T."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    def estimate_mfu(self, tokens_per_second: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device peak."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak_flops

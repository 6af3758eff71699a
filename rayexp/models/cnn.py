"""Small non-transformer baselines over token sequences: a causal 1-D CNN and a per-token MLP.

Both take ``(idx, targets)`` like ``GPT`` and return ``(logits (B, T, V), mean token cross-entropy)``, so
the training loop and the curvature engine treat them exactly like GPT-2. They exist to compare
curvature across architectures (docs/methods.md, "Curvature": blockwise spectra, transformers vs CNNs).

- ``TokenCNN``: embedding → ``n_layer`` residual blocks ``x + GELU(CausalConv1d_k(x))`` → linear head.
  The convolution is left-padded by ``kernel − 1``, so position t sees tokens t−k+1..t only.
- ``TokenMLP``: embedding → ``n_layer`` residual blocks ``x + W₂ GELU(W₁ x)`` (hidden 4C) → head;
  each position predicts the next token from its own token (a bigram model with an MLP).
No normalization layers, so each block is a plain weight tensor (+ bias).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ConvConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_embd: int = 64
    kernel: int = 3
    dropout: float = 0.0
    bias: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02 if isinstance(module, nn.Embedding) else
                        (module.weight[0].numel()) ** -0.5)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor | None):
    if targets is None:
        return None
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class TokenCNN(nn.Module):
    def __init__(self, cfg: ConvConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.convs = nn.ModuleList([nn.Conv1d(cfg.n_embd, cfg.n_embd, cfg.kernel, bias=cfg.bias)
                                    for _ in range(cfg.n_layer)])
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.bias)
        self.apply(_init)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, V) and, given targets, the mean token cross-entropy."""
        x = self.wte(idx).transpose(1, 2)  # (B, C, T)
        for conv in self.convs:
            x = x + self.drop(F.gelu(conv(F.pad(x, (self.config.kernel - 1, 0)))))
        logits = self.lm_head(x.transpose(1, 2))
        return logits, _lm_loss(logits, targets)


class TokenMLP(nn.Module):
    def __init__(self, cfg: ConvConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.fc = nn.ModuleList([nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias) for _ in range(cfg.n_layer)])
        self.proj = nn.ModuleList([nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias) for _ in range(cfg.n_layer)])
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.bias)
        self.apply(_init)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, V) and, given targets, the mean token cross-entropy."""
        x = self.wte(idx)
        for fc, proj in zip(self.fc, self.proj):
            x = x + self.drop(proj(F.gelu(fc(x))))
        logits = self.lm_head(x)
        return logits, _lm_loss(logits, targets)


def build(model_cfg, vocab_size: int) -> nn.Module:
    """A TokenCNN (``model.kind: cnn``) or TokenMLP (``mlp``) sized by the preset, then explicit sizes."""
    from rayexp.models.gpt2 import PRESETS

    sizes = {k: v for k, v in PRESETS[model_cfg.preset].items() if k != "n_head"} if model_cfg.preset else {}
    for k in ("n_layer", "n_embd", "block_size"):
        if getattr(model_cfg, k) is not None:
            sizes[k] = getattr(model_cfg, k)
    cfg = ConvConfig(vocab_size=vocab_size, dropout=model_cfg.dropout, bias=model_cfg.bias, **sizes)
    if model_cfg.kind == "cnn":
        return TokenCNN(cfg)
    if model_cfg.kind == "mlp":
        return TokenMLP(cfg)
    raise ValueError(f"model.kind {model_cfg.kind!r} is not a baseline; allowed: cnn, mlp")

"""GPT-2 as in nanoGPT: learned positions, pre-LayerNorm blocks, GELU MLP 4x, tied embeddings.

``norm="post"`` places the LayerNorms after each residual sum instead (Post-LN, the original Transformer's
and RoBERTa's): x ← LN₁(x + attn(x)); x ← LN₂(x + mlp(x)), and no final ``ln_f`` (docs/methods.md "GPT-2").

Init: N(0, 0.02) for linear/embedding weights, residual projections (``c_proj``) scaled by
1/sqrt(2 n_layer). Attention is ``naive`` (explicit softmax: exact, supports double backward and
forward-mode AD, which Hessian-vector products need) or ``sdpa`` (torch's fused kernel: fast; on CUDA
``sdpa_backend`` picks the kernel, and fp32 runs the memory-efficient one). The training loss with
targets is ``chunked`` (lm_head and cross-entropy fused over token chunks, ``chunked_cross_entropy``: the
(B·T, V) logits never exist) or ``full`` (logits, then ``F.cross_entropy``). Without targets the model
returns the full logits (the Hessian's path: exact, differentiable to any order).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from rayexp.config import NORMS

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
    sdpa_backend: str = "auto"  # auto | flash | cudnn | efficient | math (CUDA only)
    loss: str = "full"  # full | chunked (rayexp.config.ModelConfig.loss)
    norm: str = "pre"  # pre | post (rayexp.config.NORMS)

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
                     attention=model_cfg.attention, sdpa_backend=model_cfg.sdpa_backend, loss=model_cfg.loss,
                     norm=model_cfg.norm, **sizes)


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
LOSS_CHUNK_ELEMENTS = 1 << 26  # logits per chunk of chunked_cross_entropy: 256 MiB in fp32


def sdpa_context(backend: str, q: torch.Tensor):
    """The SDPA kernel choice for ``q``: CUDA only (CPU keeps torch's); ``auto`` is the memory-efficient
    kernel for fp32 (flash has none; exact softmax without the T×T scores) and torch's order otherwise."""
    if q.device.type != "cuda":
        return nullcontext()
    if backend == "auto":
        return sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION) if q.dtype == torch.float32 else nullcontext()
    return sdpa_kernel(SDPA_BACKENDS[backend])


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(h_i Wᵀ, y_i) and its gradients, chunk by chunk over the N tokens:

        z = h_c Wᵀ;  ℓ_i = logsumexp(z_i) − z_{i,y_i};  ∂/∂z = softmax(z) − onehot(y)
        ∂/∂h_c = (∂/∂z) W / N,   ∂/∂W = Σ_c (∂/∂z)ᵀ h_c / N

    The matmuls run in ``dtype`` (autocast's, or W's), the softmax in at least fp32 (as autocast's
    cross_entropy); the gradients are kept from the forward and scaled by the incoming one in backward."""

    @staticmethod
    def forward(ctx, h, w, y, chunk: int, dtype):
        hc_all, wc, acc = h.to(dtype), w.to(dtype), torch.promote_types(dtype, torch.float32)
        n = h.shape[0]
        loss = torch.zeros((), dtype=acc, device=h.device)
        gh = torch.empty(h.shape, dtype=dtype, device=h.device)
        gw = torch.zeros(w.shape, dtype=acc, device=w.device)
        for s in range(0, n, chunk):
            hc, yc = hc_all[s:s + chunk], y[s:s + chunk, None]
            logp = torch.log_softmax(hc @ wc.T, dim=-1, dtype=acc)
            loss -= logp.gather(1, yc).sum()
            dz = logp.exp_().scatter_add_(1, yc, torch.full_like(yc, -1, dtype=acc)).to(dtype)
            gh[s:s + chunk] = dz @ wc
            gw.addmm_(dz.T, hc) if dtype == acc else gw.add_(dz.T @ hc)
        ctx.save_for_backward(gh, gw.div_(n))
        ctx.n, ctx.h_dtype = n, h.dtype
        return loss / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gh, gw = ctx.saved_tensors
        return gh.to(ctx.h_dtype) * (grad / ctx.n), gw * grad, None, None, None


def chunked_cross_entropy(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int | None = None):
    """mean token cross-entropy of the logits h Wᵀ (h: (N, C), w: (V, C), y: (N,)) without the (N, V)
    logits: ``chunk`` tokens at a time (default: LOSS_CHUNK_ELEMENTS / V, a multiple of 64). Under
    autocast the matmuls run in its dtype. Not twice differentiable (the Hessian uses the full logits)."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w.dtype
    if dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(dev):
        dtype = w.dtype  # low-precision weights without autocast: matmuls in them, softmax in fp32
    chunk = chunk or max(64, LOSS_CHUNK_ELEMENTS // w.shape[0] // 64 * 64)
    with torch.autocast(dev, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            return _LinearCrossEntropy.apply(h, w, y, chunk, dtype)
        hc, wc, acc = h.to(dtype), w.to(dtype), torch.promote_types(dtype, torch.float32)
        total = sum(-torch.log_softmax(hc[s:s + chunk] @ wc.T, -1, dtype=acc)
                    .gather(1, y[s:s + chunk, None]).sum() for s in range(0, h.shape[0], chunk))
        return total / h.shape[0]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.attention not in ("naive", "sdpa"):
            raise ValueError(f"attention {cfg.attention!r}; allowed: naive, sdpa")
        if cfg.sdpa_backend != "auto" and cfg.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"sdpa_backend {cfg.sdpa_backend!r}; allowed: auto, {', '.join(SDPA_BACKENDS)}")
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout, self.attention = cfg.n_head, cfg.n_embd, cfg.dropout, cfg.attention
        self.sdpa_backend = cfg.sdpa_backend
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.attention == "sdpa":
            with sdpa_context(self.sdpa_backend, q):
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
        self.post = cfg.norm == "post"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:
            x = self.ln_1(x + self.attn(x))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.loss not in ("chunked", "full"):
            raise ValueError(f"loss {cfg.loss!r}; allowed: chunked, full")
        if cfg.norm not in NORMS:
            raise ValueError(f"norm {cfg.norm!r}; allowed: {', '.join(NORMS)}")
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
        ))
        if cfg.norm == "pre":  # Post-LN blocks end in a LayerNorm already
            self.transformer.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
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
        """(logits (B, T, V), None), or given targets the mean token cross-entropy: (None, loss) with
        ``loss="chunked"`` (no logits are formed), (logits, loss) with ``loss="full"``."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        if "ln_f" in self.transformer:
            x = self.transformer.ln_f(x)
        if targets is not None and self.config.loss == "chunked":
            return None, chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        logits = self.lm_head(x)
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

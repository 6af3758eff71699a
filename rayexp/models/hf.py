"""Hugging Face transformers models behind rayexp's ``forward(x, y=None) -> (logits, loss)`` (docs/methods.md,
"HF models").

``model.kind: hf`` builds a transformers model with one of two heads (``model.hf.head``):
``causal_lm`` (AutoModelForCausalLM: logits (B, T, V) against next tokens y (B, T)) or
``sequence_classification`` (AutoModelForSequenceClassification with ``num_labels`` = the data's classes:
logits (B, C) against labels y (B,)). Its source is ``model.hf.config``, a model type (``gpt2``, ``roberta``,
...) whose config class builds it with random weights offline, the other keys of ``model.hf`` setting config
fields; or ``model.pretrained``, a local folder (a hub name online). Random init sets the vocabulary to the
data's, the position table to ``block_size`` (plus the pad offset of RoBERTa-style position ids) and every
dropout field to ``model.dropout`` (default 0) unless ``model.hf`` sets them. ``model.attention`` picks the
kernel: ``naive`` → ``attn_implementation="eager"`` (the Hessian's), ``sdpa`` → ``sdpa``.

GPT-2's ``Conv1D`` layers (weight (in, out)) become ``nn.Linear`` (weight (out, in)) at build, so a fused
``c_attn`` weight has Q, K, V as contiguous row blocks, exactly as in rayexp's GPT, and the Hessian's blocks
split it the same way (rayexp.hessian.hvp.param_blocks); RoBERTa-style models keep separate query/key/value.
The loss is the mean cross-entropy over targets not equal to ``IGNORE_INDEX``; with ``pad_id`` set, positions
where x == pad_id are masked out of attention, so padding does not change a classifier's logits.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rayexp.config import IGNORE_INDEX, ConfigError

PADDED_POSITIONS = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "xmod", "roberta-prelayernorm")
DROPOUT_SUFFIXES = ("dropout", "pdrop", "dropout_prob", "dropout_rate")  # config fields that hold a dropout p


class HFModel(nn.Module):
    """A transformers model ``hf`` with rayexp's forward signature (see the module docstring)."""

    def __init__(self, hf: nn.Module, head: str, pad_id: int | None):
        super().__init__()
        self.hf, self.head, self.pad_id = hf, head, pad_id
        self.config = hf.config

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """(logits, mean cross-entropy over targets ≠ IGNORE_INDEX, or None without y)."""
        mask = None if self.pad_id is None else (x != self.pad_id).long()
        logits = self.hf(input_ids=x, attention_mask=mask).logits
        if y is None:
            return logits, None
        flat = logits.reshape(-1, logits.size(-1))
        if flat.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(flat.device.type):
            flat = flat.float()
        return logits, F.cross_entropy(flat, y.reshape(-1), ignore_index=IGNORE_INDEX)


def _linear_from_conv1d(model: nn.Module) -> None:
    """Replace every transformers ``Conv1D`` (y = x W + b, W (in, out)) by the equal ``nn.Linear`` (W transposed)."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                lin = nn.Linear(n_in, n_out, device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.T)
                    lin.bias.copy_(child.bias)
                setattr(parent, name, lin)


def check(model_cfg):
    """Raise ConfigError unless transformers imports and ``model.hf`` names a model type and fields of its config
    (or ``model.pretrained`` is a folder, or a hub name with the hub on); returns the type's default config."""
    try:
        from transformers import CONFIG_MAPPING, AutoConfig
    except ImportError:
        raise ConfigError("model.kind=hf needs transformers: pip install 'rayexp[hf]'") from None
    if model_cfg.pretrained:
        if not Path(model_cfg.pretrained).expanduser().exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"model.pretrained={model_cfg.pretrained!r} is no local folder and the hub is off "
                              f"(HF_HUB_OFFLINE=1)")
        return None
    name, fields = model_cfg.hf.config, model_cfg.hf.fields()
    if name not in CONFIG_MAPPING:
        raise ConfigError(f"model.hf.config={name!r} is not a transformers model type; e.g. gpt2, roberta, bert, "
                          f"llama ({len(CONFIG_MAPPING)} types in transformers.CONFIG_MAPPING)")
    base = AutoConfig.for_model(name)
    known = set(base.to_dict()) | set(getattr(base, "attribute_map", {}))
    bad = sorted(k for k in fields if k not in known)
    if bad:
        raise ConfigError(f"model.hf.{bad[0]}: not a field of {type(base).__name__}; allowed: "
                          f"{', '.join(sorted(k for k in base.to_dict() if not k.startswith('_')))}")
    return base


def _random_config(model_cfg, vocab_size: int, block: int, n_classes, pad_id):
    """The transformers config of ``model.hf``: its model type's defaults, then rayexp's, then its own fields."""
    from transformers import AutoConfig

    base, name, fields = check(model_cfg), model_cfg.hf.config, model_cfg.hf.fields()
    ours = {"vocab_size": vocab_size, **_dropouts(base, model_cfg.dropout)}
    if pad_id is not None:
        ours["pad_token_id"] = pad_id
    for k in ("bos_token_id", "eos_token_id"):  # the type's defaults (GPT-2: 50256) may lie outside a small vocab
        if isinstance(getattr(base, k, None), int) and getattr(base, k) >= vocab_size:
            ours[k] = None
    pad = fields.get("pad_token_id", ours.get("pad_token_id", base.pad_token_id)) or 0
    positions = block + (pad + 1 if base.model_type in PADDED_POSITIONS else 0)
    for k in ("n_positions", "max_position_embeddings"):
        if k in base.to_dict():
            ours[k] = positions
    if n_classes is not None:
        ours["num_labels"] = n_classes
    return AutoConfig.for_model(name, **{**ours, **fields})


def _dropouts(config, p: float) -> dict:
    """Every dropout field of a transformers ``config`` set to ``p``."""
    return {k: p for k, v in config.to_dict().items() if k.endswith(DROPOUT_SUFFIXES) and (v is None or isinstance(v, float))}


def _auto_class(head: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    return AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification


def _pretrained(model_cfg, vocab_size: int, n_classes, attn: str) -> nn.Module:
    path, head = model_cfg.pretrained, model_cfg.hf.head
    kw = {"num_labels": n_classes} if head == "sequence_classification" else {}
    try:
        from transformers import AutoConfig
        kw.update(_dropouts(AutoConfig.from_pretrained(path), model_cfg.dropout), **model_cfg.hf.fields())
        model = _auto_class(head).from_pretrained(path, attn_implementation=attn, **kw)
    except Exception as e:  # no such folder, a hub name offline, no weights
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.pretrained={path!r} could not be loaded: {first[:200]}") from None
    if vocab_size > model.config.vocab_size:
        raise ConfigError(f"model.pretrained={path!r} has a vocabulary of {model.config.vocab_size}, smaller than the "
                          f"data's {vocab_size}: use its tokenizer (data.tokenizer=hf:{path})")
    return model


def build(model_cfg, vocab_size: int, block: int, n_classes: int | None = None, pad_id: int | None = None) -> HFModel:
    """The ``HFModel`` ``model_cfg`` (kind hf) describes, for data of ``vocab_size`` tokens and ``n_classes`` labels
    padded with ``pad_id``."""
    check(model_cfg)
    head = model_cfg.hf.head
    if head == "sequence_classification" and not n_classes:
        raise ConfigError("model.hf.head=sequence_classification needs labelled data (glue:NAME or data.label_column)")
    attn = "eager" if model_cfg.attention == "naive" else "sdpa"
    if model_cfg.pretrained:
        model = _pretrained(model_cfg, vocab_size, n_classes, attn)
        if pad_id is not None and head == "sequence_classification":
            model.config.pad_token_id = pad_id
    else:
        cfg = _random_config(model_cfg, vocab_size, block, n_classes, pad_id)
        model = _auto_class(head).from_config(cfg, attn_implementation=attn)
    model.config.use_cache = False
    _linear_from_conv1d(model)
    return HFModel(model, head, pad_id)

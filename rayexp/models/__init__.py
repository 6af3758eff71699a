"""Models: GPT-2 (gpt2.py), small CNN/MLP baselines (cnn.py), Hugging Face transformers (hf.py) and
image classifiers from transformers and torchvision (vision.py). No Ray, no MLflow here.
Every model's ``forward(x, y=None)`` returns ``(logits, loss)``: the mean cross-entropy over the
targets not equal to ``rayexp.config.IGNORE_INDEX`` (token models: logits (B, T, V), y (B, T); classifiers:
logits (B, C), y (B,)).

``build(model_cfg, vocab_size, n_classes=None, pad_id=None)`` is the one way to make the model a config
describes for data of ``vocab_size`` tokens (and ``n_classes`` labels, padded with ``pad_id``), and
``block_size(model_cfg)`` the sequence length it trains on.
"""
from rayexp.config import VISION_KINDS, ConfigError, ModelConfig
from rayexp.models.gpt2 import GPT, GPTConfig, PRESETS, gpt_config  # noqa: F401
from rayexp.models.cnn import ConvConfig, TokenCNN, TokenMLP  # noqa: F401


def build(model_cfg: ModelConfig, vocab_size: int, n_classes: int | None = None, pad_id: int | None = None):
    """The model ``model_cfg`` describes (GPT-2, a baseline from ``rayexp.models.cnn``, a transformers model, or
    an image classifier over ``n_classes`` classes from ``rayexp.models.vision``), randomly initialized (or
    from ``model.pretrained``)."""
    if model_cfg.kind in VISION_KINDS:
        from rayexp.models import vision
        return vision.build(model_cfg, n_classes)
    if model_cfg.kind == "gpt2":
        try:
            return GPT(gpt_config(model_cfg, vocab_size))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if model_cfg.kind == "hf":
        from rayexp.models import hf
        return hf.build(model_cfg, vocab_size, block_size(model_cfg), n_classes, pad_id)
    from rayexp.models import cnn
    return cnn.build(model_cfg, vocab_size)


def block_size(model_cfg: ModelConfig) -> int:
    """Sequence length the model trains on: ``model.block_size``, else its preset's (a vision model: the
    image side, ``model.image_size``)."""
    if model_cfg.kind in VISION_KINDS:
        return model_cfg.image_size
    if model_cfg.block_size is not None:
        return model_cfg.block_size
    return PRESETS[model_cfg.preset or "gpt2-tiny"]["block_size"]


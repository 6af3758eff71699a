"""Models: GPT-2 (gpt2.py) and small CNN/MLP baselines (cnn.py). No Ray, no MLflow here."""
from rayexp.models.gpt2 import GPT, GPTConfig, PRESETS, gpt_config  # noqa: F401
from rayexp.models.cnn import ConvConfig, TokenCNN, TokenMLP  # noqa: F401

"""Image classifiers, randomly initialized: ResNet-18/34/50 and ViT-B/16 from transformers
(``ResNetForImageClassification``, ``ViTForImageClassification``), VGG-16 and DenseNet-121 from torchvision
(``weights=None``; the ``vision`` extra). docs/methods.md "Vision models".

``ImageClassifier`` wraps one network as ``net``: it takes float32 images x (B, 3, H, W) in [0, 1], normalizes
them with ImageNet's mean and std, and returns ``(logits (B, C), mean cross-entropy or None)``, so the training
loop and the curvature engine treat it like GPT-2. Parameter names are the library's under ``net.``
(``net.resnet.embedder.embedder.convolution.weight``, ``net.vit.layers.0.attention.q_proj.weight``), one
Hessian block per tensor (a ViT's Q, K, V are separate tensors).

Sizes: ResNets take ``model.stem`` (``imagenet``: 7×7/2 conv + 3×3/2 max-pool; ``cifar``: 3×3/1 conv, no pool,
for 32×32 inputs) and ``model.width`` (base width, 64 in ResNet-18/50; the stages have width·(1, 2, 4, 8)
channels, ×4 at a bottleneck's output). ViT-B/16 takes ``image_size``, ``patch_size`` and
``n_layer``/``n_head``/``n_embd`` (12/12/768 unless set; MLP 4·n_embd). ``model.dropout`` replaces VGG's and
ViT's dropout rates (VGG's torchvision default is 0.5; ours is 0). ``model.attention`` picks a ViT's kernel as
for kind hf (``naive`` → eager). ``model.pretrained`` is a local state_dict file (``.pth``) of ``net``, or for
the transformers kinds a local model folder (``save_pretrained``; a hub name online) whose head is re-sized to
the data's classes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rayexp.config import VISION_KINDS, ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's and HF's ResNets expect
VIT_B = dict(n_layer=12, n_head=12, n_embd=768)  # ViT-B/16 (Dosovitskiy et al. 2021, Table 1)
RESNETS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
           "resnet50": ("bottleneck", [3, 4, 6, 3])}  # He et al. 2016, Table 1: block type and stage depths
HF_KINDS = (*RESNETS, "vit_b16")  # built by transformers; the rest of VISION_KINDS by torchvision
EXPANSION = {"basic": 1, "bottleneck": 4}  # a stage's output channels / its width


def import_torchvision():
    """``import torchvision``, or one line saying how to install it. torchvision must be built for the installed
    torch: PyPI's 0.28.0 is a CUDA build whose C++ ops do not load next to a CPU torch (docs/methods.md
    "Vision models")."""
    try:
        import torchvision as tv
    except ImportError:
        raise ConfigError("vgg16 and densenet121 need torchvision: pip install 'rayexp[vision]'") from None
    except RuntimeError as e:  # "operator torchvision::nms does not exist": a torchvision for another torch
        raise ConfigError(f"torchvision does not load next to torch {torch.__version__} ({e}); install the "
                          f"torchvision built for it (a CPU torch needs the CPU build)") from None
    return tv


class ImageClassifier(nn.Module):
    """``net`` on normalized images: forward(x, y=None) -> (logits (B, C), mean cross-entropy or None)."""

    def __init__(self, net: nn.Module, kind: str, n_classes: int):
        super().__init__()
        self.net, self.kind, self.n_classes = net, kind, n_classes
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits (B, C) for images x in [0, 1]."""
        z = (x - self.mean) / self.std
        return self.net(pixel_values=z).logits if self.kind in HF_KINDS else self.net(z)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        logits = self.logits(x)
        return logits, None if y is None else F.cross_entropy(logits, y)


def _resnet_config(model_cfg, n_classes: int):
    from transformers import ResNetConfig
    layer, depths = RESNETS[model_cfg.kind]
    w = model_cfg.width
    return ResNetConfig(embedding_size=w, hidden_sizes=[w * 2 ** i * EXPANSION[layer] for i in range(4)],
                        depths=depths, layer_type=layer, num_labels=n_classes)


def _resnet(model_cfg, n_classes: int) -> nn.Module:
    """transformers' ResNet (torchvision's v1.5 layout: stride in the 3×3 conv) with ``model.width`` and
    ``model.stem``."""
    from transformers import ResNetForImageClassification
    from transformers.models.resnet.modeling_resnet import ResNetConvLayer
    net = ResNetForImageClassification(_resnet_config(model_cfg, n_classes))
    if model_cfg.stem == "cifar":
        emb = net.resnet.embedder
        emb.embedder, emb.pooler = ResNetConvLayer(3, model_cfg.width, kernel_size=3, stride=1), nn.Identity()
        nn.init.kaiming_normal_(emb.embedder.convolution.weight, mode="fan_out", nonlinearity="relu")
    return net


def _vit_config(model_cfg, n_classes: int):
    from transformers import ViTConfig
    sizes = {k: getattr(model_cfg, k) or v for k, v in VIT_B.items()}
    if sizes["n_embd"] % sizes["n_head"]:
        raise ConfigError(f"model.n_embd ({sizes['n_embd']}) must be divisible by model.n_head ({sizes['n_head']})")
    if model_cfg.image_size % model_cfg.patch_size:
        raise ConfigError(f"model.image_size ({model_cfg.image_size}) must be divisible by model.patch_size "
                          f"({model_cfg.patch_size})")
    return ViTConfig(image_size=model_cfg.image_size, patch_size=model_cfg.patch_size, num_labels=n_classes,
                     num_hidden_layers=sizes["n_layer"], num_attention_heads=sizes["n_head"],
                     hidden_size=sizes["n_embd"], intermediate_size=4 * sizes["n_embd"], layer_norm_eps=1e-6,
                     hidden_dropout_prob=model_cfg.dropout, attention_probs_dropout_prob=model_cfg.dropout)


def _attn(model_cfg) -> str:
    return "eager" if model_cfg.attention == "naive" else "sdpa"


def _from_folder(model_cfg, n_classes: int) -> nn.Module:
    """A transformers image classifier saved at ``model.pretrained`` (its own sizes and the ImageNet stem), with
    a freshly initialized head when the data has another number of classes; any other weight that does not load
    is an error."""
    from transformers import AutoConfig, AutoModelForImageClassification
    path = model_cfg.pretrained
    if model_cfg.stem != "imagenet":
        raise ConfigError(f"model.stem={model_cfg.stem} applies to random init; a model.pretrained folder brings its "
                          f"own stem (use a state_dict .pth for a cifar-stem ResNet)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # no such folder, a hub name offline
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.pretrained={path!r} could not be loaded: {first[:200]}") from None
    want = "resnet" if model_cfg.kind in RESNETS else "vit"
    if config.model_type != want:
        raise ConfigError(f"model.pretrained={path!r} is a {config.model_type} model, not model.kind={model_cfg.kind}")
    config.num_labels = n_classes  # resets id2label; the check below keeps the re-init to the head
    extra = {} if model_cfg.kind in RESNETS else {"attn_implementation": _attn(model_cfg)}
    try:
        net, info = AutoModelForImageClassification.from_pretrained(
            path, config=config, output_loading_info=True, ignore_mismatched_sizes=True, **extra)
    except Exception as e:  # no weights, a broken file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.pretrained={path!r} could not be loaded: {first[:200]}") from None
    bad = [k for k in [*info["missing_keys"]] + [m[0] if isinstance(m, tuple) else m for m in info["mismatched_keys"]]
           if not k.startswith("classifier")]
    if bad:
        raise ConfigError(f"model.pretrained={path!r}: weights missing or of other shapes, e.g. {sorted(bad)[:2]}")
    return net


def _hf_network(model_cfg, n_classes: int) -> nn.Module:
    from transformers import AutoModelForImageClassification
    path = model_cfg.pretrained
    if path and not Path(path).expanduser().is_file():  # a model folder (or a hub name)
        return _from_folder(model_cfg, n_classes)
    if model_cfg.kind in RESNETS:
        return _resnet(model_cfg, n_classes)
    return AutoModelForImageClassification.from_config(_vit_config(model_cfg, n_classes),
                                                       attn_implementation=_attn(model_cfg))


def _network(model_cfg, n_classes: int) -> nn.Module:
    if model_cfg.kind in HF_KINDS:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ConfigError(f"model.kind={model_cfg.kind} needs transformers: pip install 'rayexp[hf]'") from None
        return _hf_network(model_cfg, n_classes)
    tv = import_torchvision()
    if model_cfg.kind == "vgg16":
        return tv.models.vgg16(weights=None, num_classes=n_classes, dropout=model_cfg.dropout)
    return tv.models.densenet121(weights=None, num_classes=n_classes, drop_rate=model_cfg.dropout)


def load_state(net: nn.Module, path: str) -> None:
    """Load a state_dict file (a ``.pth`` of tensors, keys with or without ``net.``) into ``net``, or one line
    naming the problem."""
    p = Path(path).expanduser()
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"model.pretrained={path}: not a torch state_dict ({type(e).__name__})") from None
    state = {k.removeprefix("net."): v for k, v in state.items()}
    own = net.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"model.pretrained={path}: does not fit model.kind (missing keys e.g. {missing[:2]}, "
                          f"unexpected {unexpected[:2]}, other shapes {wrong[:2]})")
    net.load_state_dict(state)


def build(model_cfg, n_classes: int | None) -> ImageClassifier:
    """The ``model.kind`` classifier (one of VISION_KINDS) for ``n_classes`` classes, randomly initialized
    (or from ``model.pretrained``)."""
    if model_cfg.kind not in VISION_KINDS:
        raise ConfigError(f"model.kind={model_cfg.kind} is not a vision model; allowed: {', '.join(VISION_KINDS)}")
    if not n_classes or n_classes < 2:
        raise ConfigError(f"model.kind={model_cfg.kind} needs the data's number of classes (≥ 2); got {n_classes}: "
                          f"use an image corpus (images:PATH, task:images, hf:cifar10)")
    path = model_cfg.pretrained
    if path and model_cfg.kind not in HF_KINDS and not Path(path).expanduser().is_file():
        raise ConfigError(f"model.pretrained={path}: no such file")
    net = _network(model_cfg, n_classes)
    if path and Path(path).expanduser().is_file():
        load_state(net, path)
    return ImageClassifier(net, model_cfg.kind, n_classes)

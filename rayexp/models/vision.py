"""Image classifiers from torchvision (``weights=None``): ResNet-18/34/50, VGG-16, DenseNet-121, ViT-B/16.

``ImageClassifier`` wraps one network as ``net``: it takes float32 images x (B, 3, H, W) in [0, 1], normalizes
them with ImageNet's mean and std (torchvision's convention), and returns ``(logits (B, C), mean cross-entropy
or None)``, so the training loop and the curvature engine treat it like GPT-2. Parameter names are
torchvision's under ``net.`` (``net.layer1.0.conv1.weight``), one Hessian block per tensor; a ViT's fused
``in_proj`` splits into Q, K, V as GPT's ``c_attn`` does (``rayexp.hessian.hvp.param_blocks``).

Sizes (docs/methods.md "Vision models"): ResNets take ``model.stem`` (``imagenet``: 7×7/2 conv + 3×3/2
max-pool, torchvision's; ``cifar``: 3×3/1 conv, no pool, for 32×32 inputs) and ``model.width`` (base width, 64
in torchvision; the stages have width·(1, 2, 4, 8) channels). ViT-B/16 takes ``image_size``, ``patch_size``
and ``n_layer``/``n_head``/``n_embd`` (12/12/768 unless set; MLP 4·n_embd). ``model.dropout`` replaces
VGG's and ViT's dropout rates (VGG's torchvision default is 0.5; ours is 0). ``model.pretrained`` loads a local
torchvision-format state_dict into ``net``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rayexp.config import VISION_KINDS, ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's weights expect
VIT_B = dict(n_layer=12, n_head=12, n_embd=768)  # ViT-B/16 (Dosovitskiy et al. 2021, Table 1)
RESNETS = {"resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet34": ("BasicBlock", [3, 4, 6, 3]),
           "resnet50": ("Bottleneck", [3, 4, 6, 3])}  # torchvision.models.resnet's block and stage depths


def import_torchvision():
    """``import torchvision``, or one line saying how to install it. torchvision must be built for the installed
    torch: PyPI's 0.28.0 is a CUDA build whose C++ ops do not load next to a CPU torch (docs/methods.md
    "Vision models")."""
    try:
        import torchvision as tv
    except ImportError:
        raise ConfigError("vision models need torchvision: pip install 'rayexp[vision]'") from None
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

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        logits = self.net((x - self.mean) / self.std)
        return logits, None if y is None else F.cross_entropy(logits, y)


def _resnet(tv, model_cfg, n_classes: int) -> nn.Module:
    """torchvision's ResNet with ``model.width`` and ``model.stem`` (its own ``_make_layer`` builds the stages)."""
    block_name, depths = RESNETS[model_cfg.kind]
    block = getattr(tv.models.resnet, block_name)
    net = tv.models.resnet.ResNet(block, depths, num_classes=n_classes)
    w = model_cfg.width
    if w != 64:  # rebuild every stage at the new width; then initialize as torchvision's ResNet.__init__
        net.inplanes = w
        net.conv1, net.bn1 = nn.Conv2d(3, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w)
        for i, stride in enumerate((1, 2, 2, 2)):
            setattr(net, f"layer{i + 1}", net._make_layer(block, w * 2 ** i, depths[i], stride=stride))
        net.fc = nn.Linear(8 * w * block.expansion, n_classes)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if model_cfg.stem == "cifar":
        net.conv1, net.maxpool = nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.Identity()
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


def _vit(tv, model_cfg, n_classes: int) -> nn.Module:
    sizes = {k: getattr(model_cfg, k) or v for k, v in VIT_B.items()}
    if sizes["n_embd"] % sizes["n_head"]:
        raise ConfigError(f"model.n_embd ({sizes['n_embd']}) must be divisible by model.n_head ({sizes['n_head']})")
    if model_cfg.image_size % model_cfg.patch_size:
        raise ConfigError(f"model.image_size ({model_cfg.image_size}) must be divisible by model.patch_size "
                          f"({model_cfg.patch_size})")
    return tv.models.vision_transformer.VisionTransformer(
        image_size=model_cfg.image_size, patch_size=model_cfg.patch_size, num_layers=sizes["n_layer"],
        num_heads=sizes["n_head"], hidden_dim=sizes["n_embd"], mlp_dim=4 * sizes["n_embd"],
        dropout=model_cfg.dropout, attention_dropout=model_cfg.dropout, num_classes=n_classes)


def _network(tv, model_cfg, n_classes: int) -> nn.Module:
    kind = model_cfg.kind
    if kind in RESNETS:
        return _resnet(tv, model_cfg, n_classes)
    if kind == "vgg16":
        return tv.models.vgg16(weights=None, num_classes=n_classes, dropout=model_cfg.dropout)
    if kind == "densenet121":
        return tv.models.densenet121(weights=None, num_classes=n_classes, drop_rate=model_cfg.dropout)
    return _vit(tv, model_cfg, n_classes)


def load_pretrained(net: nn.Module, path: str) -> None:
    """Load a torchvision-format state_dict (a ``.pth`` of tensors) into ``net``, or one line naming the problem."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"model.pretrained={path}: no such file")
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
    net = _network(import_torchvision(), model_cfg, n_classes)
    if model_cfg.pretrained:
        load_pretrained(net, model_cfg.pretrained)
    return ImageClassifier(net, model_cfg.kind, n_classes)

"""Image classification data as uint8 arrays (docs/methods.md "Image data").

``load_images(corpus, seed, val_fraction, image_size)`` reads

- ``images:PATH``: a CIFAR-10 python-batch folder (``data_batch_*`` and ``test_batch`` pickles, optional
  ``batches.meta``; PATH may also be its parent holding ``cifar-10-batches-py``), or an ImageFolder tree
  (``PATH/<class>/<image>``, or ``PATH/train/<class>/…`` with ``PATH/val|test/<class>/…``), decoded with PIL
  as RGB and resized to ``image_size`` (bilinear);
- ``hf:NAME[:CONFIG]``: a Hugging Face image dataset (e.g. ``hf:cifar10``; needs the hub or its cache);
- ``task:images``: a synthetic task made here from ``seed``: each class is a fixed smooth colour pattern
  (a sinusoidal grating with its own frequency, orientation and colour), and an example is its class
  pattern, randomly shifted, plus Gaussian noise; learnable by a small CNN in a few dozen steps.

Where the source has its own test split (CIFAR's ``test_batch``, an ImageFolder ``val``/``test`` folder,
a dataset's ``test`` split) it is the validation set; otherwise the last ``val_fraction`` of a seeded
permutation is. No augmentation: the batcher turns x into float32/255 and nothing else.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rayexp.config import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm")
SPLIT_DIRS = ("val", "test")  # an ImageFolder's validation folder, first found


@dataclass
class ImageArrays:
    """Images x uint8 (N, 3, H, W) and labels y int64 (N,), train and validation."""
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    n_classes: int
    classes: list[str] = field(default_factory=list)


def load_images(corpus: str, seed: int, val_fraction: float, image_size: int = 32, examples: int = 2000,
                n_classes: int = 10) -> ImageArrays:
    """The image corpus ``corpus`` at ``image_size``² (see the module docstring); ``examples`` and
    ``n_classes`` size ``task:images``."""
    kind, _, arg = corpus.partition(":")
    if kind == "task" and arg == "images":
        return synthetic_images(examples, n_classes, image_size, seed, val_fraction)
    if kind == "images":
        root = Path(arg).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.corpus={corpus}: no such directory")
        cifar = _cifar_dir(root)
        return (read_cifar(cifar, image_size, seed, val_fraction) if cifar else
                read_image_folder(root, image_size, seed, val_fraction))
    if kind == "hf":
        return _hf_images(arg, image_size, seed, val_fraction)
    raise ConfigError(f"data.corpus={corpus} is not an image corpus; allowed: images:PATH, hf:NAME, task:images")


# -- splits and resizing ---------------------------------------------------------------------------
def _split(x: np.ndarray, y: np.ndarray, seed: int, val_fraction: float) -> tuple:
    """(train_x, train_y, val_x, val_y): the last ``val_fraction`` of a permutation seeded by ``seed``."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(val_fraction * len(x))))
    if n_val >= len(x):
        raise ConfigError(f"data.val_fraction={val_fraction} leaves no training image of {len(x)}")
    tr, va = order[:-n_val], order[-n_val:]
    return x[tr], y[tr], x[va], y[va]


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, 3, H, W) resized to (N, 3, size, size), bilinear with antialiasing (unchanged if equal)."""
    if x.shape[-2:] == (size, size):
        return x
    import torch
    import torch.nn.functional as F
    t = F.interpolate(torch.from_numpy(x).float(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


# -- CIFAR python batches ---------------------------------------------------------------------------
def _cifar_dir(root: Path) -> Path | None:
    for d in (root, root / "cifar-10-batches-py"):
        if list(d.glob("data_batch_*")):
            return d
    return None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:
        raise ConfigError(f"{path}: not a CIFAR python batch ({type(e).__name__})") from None


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch: b"data" (N, 3072) uint8 rows (R, G, B planes of 32×32) and b"labels"."""
    d = _unpickle(path)
    data, labels = d.get(b"data"), d.get(b"labels", d.get(b"fine_labels"))
    if data is None or labels is None:
        raise ConfigError(f"{path}: a CIFAR batch needs the keys data and labels")
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def read_cifar(root: Path, image_size: int, seed: int, val_fraction: float) -> ImageArrays:
    """CIFAR-10's python version: ``data_batch_*`` train, ``test_batch`` validation (else a split)."""
    parts = [_cifar_batch(p) for p in sorted(root.glob("data_batch_*"))]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if (root / "test_batch").is_file():
        vx, vy = _cifar_batch(root / "test_batch")
    else:
        x, y, vx, vy = _split(x, y, seed, val_fraction)
    n = int(max(y.max(), vy.max())) + 1
    meta = root / "batches.meta"
    names = [b.decode() for b in _unpickle(meta).get(b"label_names", [])] if meta.is_file() else []
    return ImageArrays(resize(x, image_size), y, resize(vx, image_size), vy, max(n, len(names)),
                       names or [str(i) for i in range(n)])


# -- ImageFolder -------------------------------------------------------------------------------------
def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except Exception as e:
        raise ConfigError(f"{path}: not a readable image ({type(e).__name__})") from None


def _folder(root: Path, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()) if (root / name).is_dir() else []:
            if f.suffix.lower() in IMAGE_SUFFIXES:
                xs.append(_decode(f, size))
                ys.append(c)
    if not xs:
        raise ConfigError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) under <class>/ folders")
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def read_image_folder(root: Path, image_size: int, seed: int, val_fraction: float) -> ImageArrays:
    """``root/<class>/<image>`` (classes sorted by name), or ``root/train/...`` with ``root/val|test/...``."""
    val_dir = next((root / s for s in SPLIT_DIRS if (root / "train").is_dir() and (root / s).is_dir()), None)
    train_dir = root / "train" if val_dir else root
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise ConfigError(f"images:{root}: expected a CIFAR python-batch folder or an ImageFolder with ≥ 2 class "
                          f"folders; found {len(classes)}")
    x, y = _folder(train_dir, classes, image_size)
    if val_dir:
        vx, vy = _folder(val_dir, classes, image_size)
    else:
        x, y, vx, vy = _split(x, y, seed, val_fraction)
    return ImageArrays(x, y, vx, vy, len(classes), classes)


# -- Hugging Face -----------------------------------------------------------------------------------
def _hf_images(spec: str, image_size: int, seed: int, val_fraction: float) -> ImageArrays:
    """A hub image dataset: the first image column (``img``/``image``) and ``label``/``labels``."""
    name, _, config = spec.partition(":")
    try:
        import datasets
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:
        raise ConfigError(f"data.corpus=hf:{spec}: could not load the dataset ({type(e).__name__}; offline?); "
                          f"use images:PATH with a local copy") from None
    train = ds["train"]
    col = next((c for c in ("img", "image") if c in train.column_names), None)
    lab = next((c for c in ("label", "labels") if c in train.column_names), None)
    if col is None or lab is None:
        raise ConfigError(f"data.corpus=hf:{spec}: needs an img/image and a label column; has {train.column_names}")

    def arrays(split):
        x = np.stack([np.asarray(im.convert("RGB").resize((image_size, image_size)), dtype=np.uint8).transpose(2, 0, 1)
                      for im in split[col]])
        return x, np.asarray(split[lab], dtype=np.int64)

    x, y = arrays(train)
    if "test" in ds:
        vx, vy = arrays(ds["test"])
    else:
        x, y, vx, vy = _split(x, y, seed, val_fraction)
    names = getattr(train.features[lab], "names", None) or [str(i) for i in range(int(y.max()) + 1)]
    return ImageArrays(x, y, vx, vy, len(names), list(names))


# -- the synthetic task -----------------------------------------------------------------------------
def class_patterns(n_classes: int, size: int, seed: int) -> np.ndarray:
    """float (C, 3, size, size) in [0, 1]: per class a grating ½ + ¼ cos(2π f (u cos φ + v sin φ))·colour
    plus a colour offset, with f ∈ [1, 3] cycles per image, φ, colour drawn from ``seed``."""
    rng = np.random.default_rng([seed, 7])
    u, v = np.meshgrid(np.arange(size) / size, np.arange(size) / size, indexing="ij")
    out = np.empty((n_classes, 3, size, size))
    for c in range(n_classes):
        f, phi = rng.uniform(1, 3), rng.uniform(0, np.pi)
        wave = np.cos(2 * np.pi * f * (u * np.cos(phi) + v * np.sin(phi)))
        colour, offset = rng.uniform(-1, 1, 3), rng.uniform(-0.15, 0.15, 3)
        out[c] = 0.5 + offset[:, None, None] + 0.25 * colour[:, None, None] * wave
    return out.clip(0, 1)


def synthetic_images(examples: int, n_classes: int, size: int, seed: int, val_fraction: float,
                     noise: float = 0.1) -> ImageArrays:
    """``examples`` images of ``task:images`` (module docstring): class pattern rolled by a random shift
    of up to size/8 pixels, plus N(0, noise²), quantized to uint8."""
    if n_classes < 2 or examples < 2 * n_classes:
        raise ConfigError(f"task:images needs ≥ 2 classes and ≥ 2 examples a class; got {n_classes}, {examples}")
    rng = np.random.default_rng([seed, 11])
    pats = class_patterns(n_classes, size, seed)
    y = rng.permutation(np.arange(examples) % n_classes).astype(np.int64)
    shifts = rng.integers(-(size // 8), size // 8 + 1, size=(examples, 2))
    x = np.stack([np.roll(pats[c], tuple(s), axis=(1, 2)) for c, s in zip(y, shifts)])
    x = (x + noise * rng.standard_normal(x.shape)).clip(0, 1)
    x = (x * 255).round().astype(np.uint8)
    return ImageArrays(*_split(x, y, seed, val_fraction), n_classes, [f"class{c}" for c in range(n_classes)])

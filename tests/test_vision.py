"""Vision models and image data: every kind builds and follows the (logits, loss) contract; the ResNets and the
ViT (transformers) have the published parameter counts at their defaults, and the ResNet stem/width and ViT
sizes apply; local pretrained weights (state_dict and model folder); the CIFAR python-batch and ImageFolder
readers on files written here; a ResNet18 trained through ``python -m rayexp.train`` on ``task:images``; the
curvature engine on a ResNet18 and a ViT against dense Hessians in fp64 (eval-mode BatchNorm), also through
``python -m rayexp.hessian``. VGG-16 and DenseNet-121 (torchvision) are skipped without the ``vision`` extra."""
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayexp.config import VISION_KINDS, ConfigError, HessianConfig, ModelConfig, validate
from rayexp.data.images import ImageArrays, load_images
from rayexp.models import build
from rayexp.models.vision import HF_KINDS
from test_hessian import dense_reference

pytest.importorskip("PIL")
pytest.importorskip("transformers")
try:
    import torchvision as tv
except (ImportError, RuntimeError):  # absent, or a CUDA build beside a CPU torch
    tv = None
TV_KINDS = [k for k in VISION_KINDS if k not in HF_KINDS]
KINDS = [*HF_KINDS, *[pytest.param(k, marks=pytest.mark.skipif(tv is None, reason="needs the vision extra "
                                                                "(torchvision)")) for k in TV_KINDS]]


def vision(kind: str, n_classes: int = 3, **kw):
    return build(ModelConfig(kind=kind, **kw), 0, n_classes)


TINY = {"resnet18": dict(stem="cifar", width=4), "resnet34": dict(width=2), "resnet50": dict(width=2),
        "vgg16": {}, "densenet121": {}, "vit_b16": dict(patch_size=8, n_layer=1, n_head=2, n_embd=8)}


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_builds_and_returns_logits_and_mean_cross_entropy(kind):
    torch.manual_seed(0)
    model = vision(kind, **TINY[kind]).eval()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    logits, loss = model(x, y)
    assert logits.shape == (2, 3) and model(x)[1] is None
    assert torch.allclose(loss, F.cross_entropy(logits, y))
    z = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    direct = model.net(pixel_values=z).logits if kind in HF_KINDS else model.net(z)
    assert torch.allclose(logits, direct, atol=1e-6)  # ImageNet normalization inside, then the library's net
    assert all(n.startswith("net.") for n, _ in model.named_parameters())


# torchvision's published counts at 1000 classes (its model docs' num_params; He et al. 2016, Dosovitskiy et al. 2021)
PUBLISHED = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "vit_b16": 86_567_656}


@pytest.mark.parametrize("kind", HF_KINDS)
def test_default_sizes_have_the_published_parameter_counts(kind):
    model = vision(kind, 1000, **({"image_size": 224} if kind == "vit_b16" else {}))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[kind]


def test_resnet_stem_and_width():
    cifar = vision("resnet18", 5, stem="cifar", width=8)
    stem = cifar.net.resnet.embedder
    assert stem.embedder.convolution.kernel_size == (3, 3) and stem.embedder.convolution.stride == (1, 1)
    assert isinstance(stem.pooler, torch.nn.Identity)
    stages = cifar.net.resnet.encoder.stages
    assert [s.layers[0].layer[0].convolution.out_channels for s in stages] == [8, 16, 32, 64]
    assert cifar.net.classifier[-1].in_features == 64
    assert cifar(torch.rand(2, 3, 32, 32))[0].shape == (2, 5)
    assert vision("resnet50", 5, width=2).net.classifier[-1].in_features == 4 * 16  # bottleneck expansion 4
    imagenet = vision("resnet18", 5, width=8).net.resnet.embedder
    assert imagenet.embedder.convolution.kernel_size == (7, 7) and isinstance(imagenet.pooler, torch.nn.MaxPool2d)


def test_vit_sizes_and_separate_qkv_blocks():
    from rayexp.hessian.hvp import param_blocks
    model = vision("vit_b16", 4, image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=12, attention="naive")
    c = model.net.config
    assert (c.image_size, c.patch_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (16, 4, 12, 48, 2)
    assert c._attn_implementation == "eager" and vision("vit_b16", 4, **TINY["vit_b16"]).net.config._attn_implementation == "sdpa"
    assert model(torch.rand(2, 3, 16, 16))[0].shape == (2, 4)
    names = [b.name for b in param_blocks(model)]
    assert {n.rsplit(".", 2)[-2] for n in names if ".attention." in n} >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    default = ModelConfig(kind="vit_b16", image_size=224)
    assert default.patch_size == 16


def test_vision_errors_are_one_line():
    with pytest.raises(ConfigError, match="needs the data's number of classes"):
        build(ModelConfig(kind="resnet18"), 256)
    with pytest.raises(ConfigError, match=r"model\.kind: 'resnet99' is not allowed; allowed: .*'resnet18'.*'vit_b16'"):
        validate({"model": {"kind": "resnet99"}})
    with pytest.raises(ConfigError, match=r"model\.stem: 'tiny' is not allowed; allowed: 'imagenet' or 'cifar'"):
        validate({"model": {"kind": "resnet18", "stem": "tiny"}})
    with pytest.raises(ConfigError, match="image_size .30. must be divisible by model.patch_size .8."):
        vision("vit_b16", image_size=30, patch_size=8, n_layer=1, n_head=2, n_embd=8)


def test_pretrained_state_dict_and_folder_load_and_a_mismatch_is_one_line(tmp_path):
    torch.manual_seed(0)
    src = vision("resnet18", 3, stem="cifar", width=2).eval()
    torch.save(src.net.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(1)
    dst = vision("resnet18", 3, stem="cifar", width=2, pretrained=str(tmp_path / "w.pth")).eval()
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(src(x)[0], dst(x)[0])
    with pytest.raises(ConfigError, match="does not fit model.kind .*other shapes"):
        vision("resnet18", 4, stem="cifar", width=2, pretrained=str(tmp_path / "w.pth"))
    with pytest.raises(ConfigError, match="could not be loaded"):
        vision("resnet18", pretrained=str(tmp_path / "none"))
    torch.manual_seed(2)
    saved = vision("resnet18", 3, width=2).eval()
    saved.net.save_pretrained(tmp_path / "folder")  # a transformers model folder: its body, a new 5-class head
    five = vision("resnet18", 5, width=2, pretrained=str(tmp_path / "folder")).eval()
    body = {k: v for k, v in saved.net.state_dict().items() if not k.startswith("classifier")}
    assert all(torch.equal(five.net.state_dict()[k], v) for k, v in body.items())
    assert five(x)[0].shape == (2, 5)
    with pytest.raises(ConfigError, match="is a resnet model, not model.kind=vit_b16"):
        vision("vit_b16", pretrained=str(tmp_path / "folder"))
    with pytest.raises(ConfigError, match="model.stem=cifar applies to random init"):
        vision("resnet18", stem="cifar", pretrained=str(tmp_path / "folder"))


def test_missing_torchvision_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if the vision extra were absent
    with pytest.raises(ConfigError, match=r"vgg16 and densenet121 need torchvision: pip install 'rayexp\[vision\]'"):
        build(ModelConfig(kind="vgg16"), 0, 3)
    assert vision("resnet18", **TINY["resnet18"])  # the transformers kinds do not need it
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"model.kind=resnet18 needs transformers: pip install 'rayexp\[hf\]'"):
        build(ModelConfig(kind="resnet18"), 0, 3)


# -- data --------------------------------------------------------------------------------------------
def test_task_images_is_deterministic_balanced_uint8():
    a = load_images("task:images", seed=3, val_fraction=0.25, image_size=16, examples=80, n_classes=4)
    b = load_images("task:images", seed=3, val_fraction=0.25, image_size=16, examples=80, n_classes=4)
    assert isinstance(a, ImageArrays) and a.n_classes == 4 and len(a.classes) == 4
    assert a.train_x.dtype == np.uint8 and a.train_x.shape == (60, 3, 16, 16) and a.val_x.shape == (20, 3, 16, 16)
    assert a.train_y.dtype == np.int64 and np.bincount(np.r_[a.train_y, a.val_y]).tolist() == [20] * 4
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.val_y, b.val_y)
    c = load_images("task:images", seed=4, val_fraction=0.25, image_size=16, examples=80, n_classes=4)
    assert not np.array_equal(a.train_x, c.train_x)


def _write_cifar(root, n_per_batch=6, batches=2):
    """CIFAR-10 python batches as the dataset ships them: pickled dicts of bytes keys."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    written = []
    for name in [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels, b"filenames": []}, f)
        written.append((data, labels))
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": n_per_batch}, f)
    return written


def test_cifar_python_batches_are_read_exactly(tmp_path):
    written = _write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_images(f"images:{tmp_path}", seed=0, val_fraction=0.1)  # the parent folder works too
    train = np.concatenate([w[0] for w in written[:2]]).reshape(-1, 3, 32, 32)
    assert np.array_equal(d.train_x, train) and d.train_y.tolist() == written[0][1] + written[1][1]
    assert np.array_equal(d.val_x, written[2][0].reshape(-1, 3, 32, 32)) and d.val_y.tolist() == written[2][1]
    assert d.n_classes == 10 and d.classes[:2] == ["c0", "c1"]
    # row layout: the first 1024 bytes are the red plane, row-major
    assert d.train_x[0, 0, 0, 1] == written[0][0][0, 1] and d.train_x[0, 1, 0, 0] == written[0][0][0, 1024]
    small = load_images(f"images:{tmp_path}/cifar-10-batches-py", seed=0, val_fraction=0.1, image_size=16)
    assert small.train_x.shape == (12, 3, 16, 16) and small.train_x.dtype == np.uint8


def _write_folder(root, classes, per_class, size=12):
    from PIL import Image
    colours = {}
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            rgb = (40 * c + i, 255 - 30 * c, 7 * i)
            Image.new("RGB", (size, size), rgb).save(root / name / f"{i:03d}.png")
            colours[(name, i)] = rgb
    return colours


def test_image_folder_is_read_with_sorted_classes_and_a_seeded_split(tmp_path):
    colours = _write_folder(tmp_path / "flat", ["dog", "cat", "bird"], per_class=4)
    (tmp_path / "flat" / "cat" / "notes.txt").write_text("not an image")
    d = load_images(f"images:{tmp_path / 'flat'}", seed=0, val_fraction=0.25, image_size=12)
    assert d.classes == ["bird", "cat", "dog"] and d.n_classes == 3
    assert len(d.train_y) == 9 and len(d.val_y) == 3 and d.train_x.shape[1:] == (3, 12, 12)
    x, y = np.concatenate([d.train_x, d.val_x]), np.concatenate([d.train_y, d.val_y])
    pixels = {tuple(int(v) for v in img[:, 0, 0]) for img in x}
    assert pixels == set(colours.values())  # PNG is lossless and the size unchanged: exact pixels
    for img, label in zip(x, y):  # every image sits under its own class's label
        assert any(tuple(int(v) for v in img[:, 0, 0]) == colours[(d.classes[label], i)] for i in range(4))
    again = load_images(f"images:{tmp_path / 'flat'}", seed=0, val_fraction=0.25, image_size=8)
    assert np.array_equal(again.val_y, d.val_y) and again.train_x.shape[2:] == (8, 8)


def test_image_folder_train_val_layout_and_errors(tmp_path):
    _write_folder(tmp_path / "tv" / "train", ["a", "b"], per_class=3)
    _write_folder(tmp_path / "tv" / "val", ["a", "b"], per_class=1)
    d = load_images(f"images:{tmp_path / 'tv'}", seed=0, val_fraction=0.5, image_size=12)
    assert (len(d.train_y), len(d.val_y)) == (6, 2) and d.val_y.tolist() == [0, 1]
    with pytest.raises(ConfigError, match="no such directory"):
        load_images(f"images:{tmp_path / 'missing'}", seed=0, val_fraction=0.1)
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(ConfigError, match="≥ 2 class folders"):
        load_images(f"images:{tmp_path / 'one'}", seed=0, val_fraction=0.1)
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "y").mkdir()
    (tmp_path / "bad" / "x" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="broken.png: not a readable image"):
        load_images(f"images:{tmp_path / 'bad'}", seed=0, val_fraction=0.1)
    with pytest.raises(ConfigError, match="not an image corpus"):
        load_images("text:foo.txt", seed=0, val_fraction=0.1)


def test_hf_cifar10_offline_is_one_line():
    with pytest.raises(ConfigError, match=r"hf:cifar10: could not load the dataset .*offline.*images:PATH"):
        load_images("hf:cifar10", seed=0, val_fraction=0.1)


def test_image_corpora_pass_config_validation_with_a_vision_model_only():
    vision = {"kind": "resnet18"}
    assert validate({"model": vision, "data": {"corpus": "images:/data/cifar"}}).data.corpus == "images:/data/cifar"
    assert validate({"model": vision, "data": {"corpus": "task:images"}}).data.corpus == "task:images"
    assert validate({"model": vision, "data": {"corpus": "hf:cifar10"}}).data.corpus == "images:hf:cifar10"
    for bad in ({"data": {"corpus": "task:images"}}, {"model": vision, "data": {"corpus": "builtin"}}):
        with pytest.raises(ConfigError, match="needs"):
            validate(bad)


def _train(tmp_path, *args):
    out = subprocess.run([sys.executable, "-m", "rayexp.train", "--no-mlflow", "data.corpus=task:images",
                          "train.warmup=0", "optimizer.name=adam", f"output_dir={tmp_path}", *args],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_resnet18_trains_on_synthetic_images_through_the_train_cli(tmp_path):
    """``python -m rayexp.train`` with a ResNet18 (CIFAR stem, width 8) on ``task:images`` at 32×32: validation
    accuracy rises from chance (4 classes) above 0.6 in 30 steps."""
    stdout = _train(tmp_path, "model.kind=resnet18", "model.stem=cifar", "model.width=8", "data.task_examples=240",
                    "data.task_classes=4", "train.steps=30", "train.batch_size=8", "train.eval_every=30",
                    "train.eval_batches=4", "optimizer.lr=3e-3")
    accs = [float(line.split("acc ")[1].split()[0]) for line in stdout.splitlines() if "acc " in line]
    assert len(accs) == 2 and accs[0] < 0.45 and accs[-1] > 0.6, stdout


# -- curvature -----------------------------------------------------------------------------------------
def _perturbed(model):
    """fp64, eval mode, every parameter and BatchNorm statistic moved off its initial value."""
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(0.2 * torch.randn_like(b))
            elif n.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return model


STEM = "net.resnet.embedder.embedder."
CASES = {  # model, image side, batches, selected blocks (ResNet18 at width 1: 2,928 parameters; the ViT: 1,315)
    "resnet18": (dict(kind="resnet18", stem="cifar", width=1), 4, 1,
                 [STEM + "convolution.weight", "net.resnet.encoder.stages.1.layers.0.layer.0.normalization.weight",
                  "net.resnet.encoder.stages.2.layers.0.shortcut.normalization.bias",
                  "net.resnet.encoder.stages.3.layers.1.layer.1.convolution.weight", "net.classifier.1.weight"]),
    "vit_b16": (dict(kind="vit_b16", image_size=8, patch_size=4, n_layer=1, n_head=2, n_embd=8), 8, 2,
                ["net.vit.embeddings.patch_embeddings.projection.weight", "*q_proj.weight", "*v_proj.weight",
                 "net.vit.layernorm.weight", "net.classifier.weight"]),
}


def _check_against_dense(H, top, bottom, names, nodes_of, model):
    """top/bottom Ritz values at the dense extreme eigenvalues, each block's largest SLQ node at λ_max(H_bb)."""
    from rayexp.hessian.hvp import param_blocks
    ev = torch.linalg.eigvalsh(H).numpy()
    scale = np.abs(ev).max()
    assert np.abs(np.asarray(top) - ev[::-1][:len(top)]).max() < 1e-6 * scale
    if bottom is not None:
        assert np.abs(np.asarray(bottom) - ev[:len(bottom)]).max() < 1e-6 * scale
    by_name = {b.name: b for b in param_blocks(model)}
    for k, name in enumerate(names):
        b = by_name[name]
        exact = torch.linalg.eigvalsh(H[b.slice, b.slice]).numpy()
        assert abs(nodes_of(k).max() - exact.max()) < 1e-6 * np.abs(exact).max(), name


@pytest.mark.parametrize("case", [pytest.param("resnet18", marks=pytest.mark.slow), "vit_b16"])
def test_top_eigs_and_block_lambda_max_match_dense_hessian_fp64(case):
    """top_eigs (k = 3, both ends) and each selected block's λ_max(H_bb) from slq_blocks (full reorthogonalization:
    the largest Ritz value) equal eigvalsh of the dense Hessian and of its diagonal blocks to 1e-6 of the scale."""
    from rayexp.hessian import analyze
    kw, side, n, blocks = CASES[case]
    torch.manual_seed(0)
    model = _perturbed(build(ModelConfig(**kw), 0, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(4, 3, side, side, generator=g, dtype=torch.float64), torch.randint(3, (4,), generator=g))
               for _ in range(n)]
    H = dense_reference(model, batches)
    assert H.shape[0] <= 3000 and torch.allclose(H, H.T, atol=1e-10)
    cfg = HessianConfig(tasks=["top_eigs", "slq_blocks"], dtype="fp64", which="both", top_k=3, top_eigs_steps=40,
                        slq_steps=40, probes=1, reorth="full", blocks=blocks, grid_points=200)
    a = analyze(model, batches, cfg, progress=False)["arrays"]
    assert len(a["block_names"]) == len(blocks)
    _check_against_dense(H, a["top_eigs"], a["bottom_eigs"], list(a["block_names"]),
                         lambda k: a["block_nodes"][k][a["block_weights"][k] > 0], model)


def test_hessian_cli_on_a_trained_resnet18_checkpoint_matches_a_dense_hessian(tmp_path):
    """``rayexp.train`` a ResNet18 at width 1 on 4×4 ``task:images`` (BatchNorm statistics trained), then
    ``python -m rayexp.hessian --tasks top_eigs,slq_blocks`` in fp64 on its checkpoint: λ_max and each block's
    largest node against the dense Hessian of the checkpoint's fixed batches."""
    from rayexp.hessian.analyze import fixed_batches
    from rayexp.train.checkpoint import load_model
    _train(tmp_path, "model.kind=resnet18", "model.stem=cifar", "model.width=1", "model.image_size=4",
           "data.task_examples=64", "data.task_classes=3", "train.steps=10", "train.batch_size=8",
           "train.eval_every=10", "train.eval_batches=1", "optimizer.lr=1e-2", "hessian.batches=1",
           "hessian.batch_size=6", "hessian.dtype=fp64")
    ckpt = next(p.parent for p in sorted(tmp_path.rglob("*.pt")))
    blocks = CASES["resnet18"][3][::2]
    out = subprocess.run([sys.executable, "-m", "rayexp.hessian", "--checkpoint", str(ckpt), "--tasks",
                          "top_eigs,slq_blocks", "--out", str(tmp_path / "res"), "--no-progress", "top_eigs_steps=60",
                          "slq_steps=60", "reorth=full", f"blocks=[{','.join(blocks)}]"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    z = np.load(tmp_path / "res" / "hessian.npz")
    model, exp, _ = load_model(str(ckpt))
    H = dense_reference(model, fixed_batches(exp, exp.hessian))
    _check_against_dense(H, z["top_eigs"][:1], None, list(z["block_names"]),
                         lambda k: z["block_nodes"][k, 0][z["block_weights"][k, 0] > 1e-10], model)


def test_hessian_of_a_train_mode_model_is_the_eval_mode_one():
    """The engine analyzes the model in eval mode (BatchNorm on running statistics): a model handed over in
    train mode gives the same products as the eval-mode model, and its own mode and statistics are untouched."""
    from rayexp.hessian import HVP
    torch.manual_seed(0)
    model = _perturbed(vision("resnet18", stem="cifar", width=1)).train()
    bn = model.net.resnet.embedder.embedder.normalization
    stats = bn.running_mean.clone()
    batches = [(torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))]
    v = torch.randn(1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    hv_train = HVP(model, batches, mode="double_backward").hvp_sum(v)
    assert model.training and torch.equal(bn.running_mean, stats)
    hv_eval = HVP(model.eval(), batches, mode="fwd_rev").hvp_sum(v)
    assert torch.allclose(hv_train, hv_eval, rtol=1e-10, atol=1e-12)

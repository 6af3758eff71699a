"""Vision models (torchvision, weights=None) and image data: every kind builds and follows the (logits, loss)
contract, ResNet stem/width and ViT sizes, local pretrained weights, a ResNet18 learning ``task:images``, the
CIFAR python-batch and ImageFolder readers on files written here, and the curvature engine on a ResNet18 and a
ViT against dense Hessians in fp64 (eval-mode BatchNorm). Model tests are skipped without the ``vision`` extra."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from rayexp.config import VISION_KINDS, ConfigError, HessianConfig, ModelConfig, validate
from rayexp.data.images import ImageArrays, load_images
from rayexp.models import build

pytest.importorskip("PIL")
try:  # importable after rayexp.models, even the CUDA wheel beside a CPU torch
    import torchvision as tv
except ImportError:
    tv = None
needs_tv = pytest.mark.skipif(tv is None, reason="needs the vision extra (torchvision)")


def vision(kind: str, n_classes: int = 3, **kw):
    return build(ModelConfig(kind=kind, **kw), 0, n_classes)


TINY = {"resnet18": dict(stem="cifar", width=4), "resnet34": dict(width=2), "resnet50": dict(width=2),
        "vgg16": {}, "densenet121": {}, "vit_b16": dict(patch_size=8, n_layer=1, n_head=2, n_embd=8)}


@needs_tv
@pytest.mark.parametrize("kind", VISION_KINDS)
def test_every_kind_builds_and_returns_logits_and_mean_cross_entropy(kind):
    torch.manual_seed(0)
    model = vision(kind, **TINY[kind]).eval()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 2])
    logits, loss = model(x, y)
    assert logits.shape == (2, 3) and model(x)[1] is None
    assert torch.allclose(loss, F.cross_entropy(logits, y))
    assert torch.equal(logits, model.net((x - model.mean) / model.std))  # normalized inside, torchvision's net
    assert all(n.startswith("net.") for n, _ in model.named_parameters())


@needs_tv
def test_resnet_stems_and_width_follow_torchvision():
    ref = tv.models.resnet18(weights=None, num_classes=5)
    model = vision("resnet18", 5)  # imagenet stem, width 64: exactly torchvision's resnet18
    assert [(k, v.shape) for k, v in model.net.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    cifar = vision("resnet18", 5, stem="cifar", width=8)
    assert cifar.net.conv1.kernel_size == (3, 3) and cifar.net.conv1.stride == (1, 1)
    assert isinstance(cifar.net.maxpool, torch.nn.Identity)
    assert [cifar.net.get_submodule(f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3, 4)] == [8, 16, 32, 64]
    assert cifar.net.fc.in_features == 64
    assert vision("resnet50", 5, width=2).net.fc.in_features == 4 * 16  # Bottleneck expansion 4


@needs_tv
def test_vit_sizes_and_fused_qkv_blocks():
    from rayexp.hessian.hvp import param_blocks
    model = vision("vit_b16", 4, image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=12)
    vit = model.net
    assert (vit.image_size, vit.patch_size, vit.hidden_dim, vit.mlp_dim, len(vit.encoder.layers)) == (16, 4, 12, 48, 2)
    assert model(torch.rand(2, 3, 16, 16))[0].shape == (2, 4)
    names = [b.name for b in param_blocks(model)]
    attn = "net.encoder.layers.encoder_layer_0.self_attention."
    assert [n for n in names if n.startswith(attn + "in_proj")] == [
        attn + f"in_proj_{t}.{p}" for t in ("weight", "bias") for p in "qkv"]
    big = tv.models.vit_b_16(weights=None, num_classes=4)  # defaults: ViT-B/16
    default = ModelConfig(kind="vit_b16", image_size=224)
    assert (default.patch_size, big.hidden_dim, big.mlp_dim) == (16, 768, 3072)


@needs_tv
def test_vision_errors_are_one_line():
    with pytest.raises(ConfigError, match="needs the data's number of classes"):
        build(ModelConfig(kind="resnet18"), 256)
    with pytest.raises(ConfigError, match=r"model\.kind: 'resnet99' is not allowed; allowed: .*'resnet18'.*'vit_b16'"):
        validate({"model": {"kind": "resnet99"}})
    with pytest.raises(ConfigError, match=r"model\.stem: 'tiny' is not allowed; allowed: 'imagenet' or 'cifar'"):
        validate({"model": {"kind": "resnet18", "stem": "tiny"}})
    with pytest.raises(ConfigError, match="image_size .30. must be divisible by model.patch_size .8."):
        vision("vit_b16", image_size=30, patch_size=8, n_layer=1, n_head=2, n_embd=8)


@needs_tv
def test_pretrained_state_dict_loads_and_a_mismatch_is_one_line(tmp_path):
    torch.manual_seed(0)
    src = vision("resnet18", 3, stem="cifar", width=2).eval()
    torch.save(src.net.state_dict(), tmp_path / "w.pth")
    torch.manual_seed(1)
    dst = vision("resnet18", 3, stem="cifar", width=2, pretrained=str(tmp_path / "w.pth")).eval()
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(src(x)[0], dst(x)[0])
    with pytest.raises(ConfigError, match="does not fit model.kind .*other shapes"):
        vision("resnet18", 4, stem="cifar", width=2, pretrained=str(tmp_path / "w.pth"))
    with pytest.raises(ConfigError, match="no such file"):
        vision("resnet18", pretrained=str(tmp_path / "none.pth"))


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


@needs_tv
def test_resnet18_at_32px_learns_task_images():
    """A ResNet18 (CIFAR stem, width 16) with Adam, 40 steps of batch 8: loss falls, validation accuracy well
    above chance (0.25) in eval mode (BatchNorm's running statistics)."""
    d = load_images("task:images", seed=0, val_fraction=0.2, image_size=32, examples=400, n_classes=4)
    torch.manual_seed(0)
    model = vision("resnet18", d.n_classes, stem="cifar", width=16)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        i = g.integers(len(d.train_x), size=8)
        _, loss = model(torch.from_numpy(d.train_x[i]).float() / 255, torch.from_numpy(d.train_y[i]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logits, val_loss = model(torch.from_numpy(d.val_x).float() / 255, torch.from_numpy(d.val_y))
    accuracy = (logits.argmax(1).numpy() == d.val_y).mean()
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])
    assert accuracy > 0.6 and val_loss.item() < np.log(4)


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


def test_resnet18_trains_on_synthetic_images_through_the_train_cli(tmp_path):
    """``python -m rayexp.train`` with a ResNet18 (CIFAR stem, width 8) on ``task:images``: validation accuracy
    rises from chance (4 classes) above 0.6 in 30 steps."""
    pytest.importorskip("torchvision")
    import subprocess
    import sys
    args = ["model.kind=resnet18", "model.stem=cifar", "model.width=8", "data.corpus=task:images",
            "data.task_examples=240", "data.task_classes=4", "train.steps=30", "train.batch_size=8",
            "train.eval_every=30", "train.eval_batches=4", "train.warmup=0", "optimizer.name=adam",
            "optimizer.lr=3e-3", f"output_dir={tmp_path}"]
    out = subprocess.run([sys.executable, "-m", "rayexp.train", "--no-mlflow", *args], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    accs = [float(line.split("acc ")[1].split()[0]) for line in out.stdout.splitlines() if "acc " in line]
    assert len(accs) == 2 and accs[0] < 0.45 and accs[-1] > 0.6, out.stdout


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


def _dense_hessian(model, batches) -> np.ndarray:
    """∇² of the mean cross-entropy over batches in flat-θ coordinates (named_parameters order), by
    torch.autograd.functional.hessian through functional_call (math attention kernel: twice differentiable).
    (``torch.func.hessian`` and ``jacrev(jacrev)`` of this ViT loss are not even symmetric in torch 2.13: off by
    0.15 in the encoder.ln × out_proj block, so they are no reference.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]

    def loss(flat):
        params = {n: t.view(p.shape) for (n, p), t in zip(named, torch.split(flat, sizes))}
        return sum(F.cross_entropy(functional_call(model, params, (x,))[0], y) for x, y in batches) / len(batches)

    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(loss, theta, vectorize=True).numpy()


CASES = {  # model, image side, batches, selected blocks (ResNet18 at width 1: 2,928 parameters; the ViT: 1,355)
    "resnet18": (dict(kind="resnet18", stem="cifar", width=1), 4, 1,
                 ["net.conv1.weight", "net.layer2.0.bn1.weight", "net.layer3.0.downsample.1.bias",
                  "net.layer4.1.conv2.weight", "net.fc.weight"]),
    "vit_b16": (dict(kind="vit_b16", image_size=8, patch_size=4, n_layer=1, n_head=2, n_embd=8), 8, 2,
                ["net.conv_proj.weight", "*in_proj_weight.q", "*in_proj_weight.v", "net.encoder.ln.weight",
                 "net.heads.head.weight"]),
}


@needs_tv
@pytest.mark.parametrize("case", [pytest.param("resnet18", marks=pytest.mark.slow), "vit_b16"])
def test_top_eigs_and_block_lambda_max_match_dense_hessian_fp64(case):
    """top_eigs (k = 3, both ends) and each selected block's λ_max(H_bb) from slq_blocks (full reorthogonalization:
    the largest Ritz value) equal eigvalsh of the dense Hessian and of its diagonal blocks to 1e-6 of the scale."""
    from rayexp.hessian import analyze
    from rayexp.hessian.hvp import param_blocks
    kw, side, n, blocks = CASES[case]
    torch.manual_seed(0)
    model = _perturbed(build(ModelConfig(**kw), 0, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(4, 3, side, side, generator=g, dtype=torch.float64), torch.randint(3, (4,), generator=g))
               for _ in range(n)]
    H = _dense_hessian(model, batches)
    assert H.shape[0] <= 3000 and np.allclose(H, H.T, atol=1e-10)
    cfg = HessianConfig(tasks=["top_eigs", "slq_blocks"], dtype="fp64", which="both", top_k=3, top_eigs_steps=40,
                        slq_steps=40, probes=1, reorth="full", blocks=blocks, grid_points=200)
    r = analyze(model, batches, cfg, progress=False)
    ev = np.linalg.eigvalsh(H)
    scale = np.abs(ev).max()
    assert np.abs(r["arrays"]["top_eigs"] - ev[::-1][:3]).max() < 1e-6 * scale
    assert np.abs(r["arrays"]["bottom_eigs"] - ev[:3]).max() < 1e-6 * scale
    by_name = {b.name: b for b in param_blocks(model)}
    names = list(r["arrays"]["block_names"])
    assert len(names) == len(blocks)
    for k, name in enumerate(names):
        b = by_name[name]
        exact = np.linalg.eigvalsh(H[b.slice, b.slice])
        nodes = r["arrays"]["block_nodes"][k][r["arrays"]["block_weights"][k] > 0]
        assert abs(nodes.max() - exact.max()) < 1e-6 * np.abs(exact).max(), name


@needs_tv
def test_hessian_of_a_train_mode_model_is_the_eval_mode_one():
    """The engine analyzes the model in eval mode (BatchNorm on running statistics): a model handed over in
    train mode gives the same products as the eval-mode model, and its own mode and statistics are untouched."""
    from rayexp.hessian import HVP
    torch.manual_seed(0)
    model = _perturbed(vision("resnet18", stem="cifar", width=1)).train()
    stats = model.net.bn1.running_mean.clone()
    batches = [(torch.rand(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))]
    v = torch.randn(1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    hv_train = HVP(model, batches, mode="double_backward").hvp_sum(v)
    assert model.training and torch.equal(model.net.bn1.running_mean, stats)
    hv_eval = HVP(model.eval(), batches, mode="fwd_rev").hvp_sum(v)
    assert torch.allclose(hv_train, hv_eval, rtol=1e-10, atol=1e-12)


def test_missing_torchvision_is_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torchvision", None)  # as if the vision extra were absent
    with pytest.raises(ConfigError, match=r"vision models need torchvision: pip install 'rayexp\[vision\]'"):
        build(ModelConfig(kind="resnet18"), 0, 3)

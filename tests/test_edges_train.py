"""Edges of the HVP engine, checkpoints and the train loop that no earlier test reached (mutants surviving a
mutmut run): TF32 switched on only for ``tf32`` products and restored afterwards (the CUDA branch, with
``torch.cuda.is_available`` patched), a ``model.config.dropout`` refused without any ``nn.Dropout``, a loss
linear in θ under ``cached``, the finite-difference step at ‖θ‖ = 1 against a dense Hessian, products over no
batches; checkpoint error messages naming the path and the missing file, ``unwrap`` of a ``.module``
wrapper, loop states holding objects outside torch's weights-only allowlist, the class count a vision
checkpoint is trained and reloaded with; and the token count / eval schedule of the train loop, by hand."""
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_edges import cache, tiny  # noqa: F401 (cache: the module-scoped fixture)

from rayexp.config import ConfigError, validate
from rayexp.hessian.hvp import HVP, _exact_kernels, check_model
from rayexp.train.checkpoint import load_model, load_state, save_checkpoint, unwrap, verify
from rayexp.train.loop import run_training


class Param(nn.Module):
    """One parameter vector ``w``; forward(x) = f(w, x), a scalar loss (the loss_fn below returns it)."""

    def __init__(self, w, f):
        super().__init__()
        self.w, self.f = nn.Parameter(torch.as_tensor(w, dtype=torch.float64)), f

    def forward(self, x):
        return self.f(self.w, x)


def own_loss(model, batch):
    return model(batch)


# -- HVP -----------------------------------------------------------------------------------------------
@pytest.fixture
def fake_cuda(monkeypatch):
    """The CUDA branch of _exact_kernels on a CPU machine (the TF32 flags are settable without a GPU); the
    flags are put back to what they were, whatever the test did."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", ["tf32", "fp32", "fp64"])
def test_tf32_is_on_only_inside_tf32_products_and_both_flags_are_restored(fake_cuda, dtype):
    """Inside a product both TF32 flags are True for ``tf32`` and False otherwise; afterwards both are back at
    their previous values, from either starting state."""
    for start in ((False, True), (True, False)):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = start
        with _exact_kernels(dtype):
            inside = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        assert inside == ((dtype == "tf32"),) * 2
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == start


def test_an_hvp_in_tf32_runs_its_loss_with_tf32_on_and_restores_it(fake_cuda):
    """The loss of a ``tf32`` product sees TF32 on, the model's H v is still right (H = 2I for Σw²), and the
    flags are as before once the product returns."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    seen = []

    def loss(model, batch):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return model(batch)

    h = HVP(Param([1.0, 2.0, 3.0], lambda w, x: (w ** 2).sum()), [None], loss_fn=loss, mode="double_backward",
            dtype="tf32")
    v = torch.tensor([[1.0, -1.0, 0.5]])
    assert torch.allclose(h.hvp_sum(v), 2 * v)
    assert seen and all(s == (True, True) for s in seen)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)


def test_a_config_dropout_alone_is_refused():
    """``model.config.dropout > 0`` (a model applying F.dropout itself, no nn.Dropout module) makes the loss
    random: refused; ``dropout`` 0 or None is allowed."""
    model = nn.Linear(2, 2)
    model.config = SimpleNamespace(dropout=0.1)
    with pytest.raises(ConfigError, match=r"model.dropout=0.1 makes the loss random"):
        check_model(model)
    for ok in (0.0, None):
        model.config = SimpleNamespace(dropout=ok)
        check_model(model)


def test_cached_products_of_a_loss_linear_in_theta_are_zero():
    """ℓ(w) = x·w: H = 0, so ``cached`` (whose first-order graph then has no second-order part) returns zero
    rows, as every other mode does."""
    batches = [torch.tensor(x, dtype=torch.float64) for x in ([1.0, -2.0, 3.0], [0.5, 0.5, 0.5])]
    V = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for mode in ("cached", "double_backward", "fwd_rev"):
        h = HVP(Param([0.3, 0.1, -0.2], lambda w, x: (x * w).sum()), batches, loss_fn=own_loss, mode=mode)
        out = h.hvp_sum(V)
        assert out.shape == V.shape and torch.equal(out, torch.zeros_like(V)), mode


def _quartic(w, x):
    return (w ** 4).sum() + (x @ w) ** 2 + w[0] * w[1] ** 3


def test_fd_products_at_unit_parameter_norm_match_the_dense_hessian():
    """‖θ‖ = 1 exactly: the central difference with ε = ∛eps·(1 + ‖θ‖)/‖v‖ equals H v of the dense Hessian
    (torch.autograd.functional.hessian) of a non-quadratic loss to ~1e-9 (truncation O(ε²) ≈ 1e-10)."""
    w0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert float(w0.norm()) == 1.0
    batches = [torch.tensor(x, dtype=torch.float64) for x in ([0.5, -1.0, 2.0], [1.5, 0.25, -0.75])]
    H = sum(torch.autograd.functional.hessian(lambda w: _quartic(w, x), w0) for x in batches)
    V = torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.0, 3.0]], dtype=torch.float64)
    h = HVP(Param(w0.tolist(), _quartic), batches, loss_fn=own_loss, mode="fd", dtype="fp64")
    out = h.hvp_sum(V)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, V @ H, rtol=1e-7, atol=1e-7), (out, V @ H)


@pytest.mark.parametrize("mode", ["cached", "double_backward", "fwd_rev", "fd"])
def test_products_over_no_batches_are_zero_rows_of_the_vectors_shape(mode):
    """A data shard holding no batches: Σ over an empty set, zeros of V's shape in the working dtype."""
    h = HVP(Param([1.0, 2.0], _quartic), [], loss_fn=own_loss, mode=mode, dtype="fp64")
    out = h.hvp_sum(torch.ones(3, 2, dtype=torch.float32))
    assert out.shape == (3, 2) and out.dtype == torch.float64 and not out.any()


# -- checkpoints -----------------------------------------------------------------------------------------
def _ckpt(tmp_path, model=None, extra=None):
    model = model if model is not None else nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    return Path(save_checkpoint(tmp_path / "ckpt", model, opt, 3, validate({}), {"history": [], **(extra or {})}))


def test_a_missing_checkpoint_is_named_in_the_error(tmp_path):
    """The error for a directory without model.pt / config.yaml names that directory."""
    missing = tmp_path / "nowhere" / "checkpoint_000007"
    with pytest.raises(ConfigError, match=re.escape(f"checkpoint {str(missing)!r} not found")):
        load_state(missing)


def test_a_partial_checkpoint_names_its_missing_file(tmp_path):
    """A file listed in checksums.json but gone (here state.pt, optim.pt) is named as missing."""
    for name in ("optim.pt", "state.pt"):
        path = _ckpt(tmp_path / name)
        assert verify(path) == path
        (path / name).unlink()
        with pytest.raises(ConfigError, match=re.escape(f"checkpoint file {path / name} is missing: a partial")):
            verify(path)


def test_unwrap_removes_module_wrappers_and_checkpoints_hold_bare_keys(tmp_path):
    """``unwrap`` of a DataParallel (the ``.module`` wrapper of DDP, on CPU) — also under a compile-style
    ``_orig_mod`` — is the bare model, and a checkpoint of the wrapped model has the bare state_dict keys."""
    bare = nn.Linear(2, 3)
    wrapped = nn.DataParallel(bare)
    assert unwrap(wrapped) is bare and unwrap(bare) is bare
    outer = SimpleNamespace(_orig_mod=wrapped)
    assert unwrap(outer) is bare
    path = Path(save_checkpoint(tmp_path / "c", wrapped, None, 1, validate({}), {}))
    saved = torch.load(path / "model.pt", weights_only=True)
    assert sorted(saved) == ["bias", "weight"] and torch.equal(saved["weight"], bare.weight.detach())


def test_the_loop_state_round_trips_objects_outside_the_weights_only_allowlist(tmp_path):
    """``extra`` (the loop state: history with a monitor's metrics, ...) may hold any picklable value, e.g. a
    numpy scalar from a user's monitor: load_state returns it as saved."""
    hist = [{"step": 1, "curv/lambda_max": np.float64(2.5)}]
    path = _ckpt(tmp_path, extra={"history": hist, "where": Path("/x/y")})
    state = load_state(path)
    assert state["step"] == 3 and state["history"] == hist and state["where"] == Path("/x/y")
    assert type(state["history"][0]["curv/lambda_max"]) is np.float64


def test_a_vision_run_trains_checkpoints_and_reloads_with_the_datas_class_count(tmp_path, cache):
    """A ResNet18 (width 1, 4×4 images, 3 classes) through run_training in-process: the model gets the data's
    3 classes (logits (B, 3)), an image counts as one example in ``tokens`` (4 per step at batch 4), and
    load_model rebuilds it from the checkpoint with 3 classes and the same weights."""
    exp = tiny(tmp_path, cache, "data.corpus=task:images", "model.kind=resnet18", "model.stem=cifar",
               "model.width=1", "model.image_size=4", "data.task_examples=24", "data.task_classes=3",
               "train.steps=2", "train.eval_every=2", "optimizer.name=adam", "optimizer.lr=1e-3")
    res = run_training(exp, workdir=str(tmp_path / "w"))
    assert res.status == "finished" and [h["tokens"] for h in res.history] == [0.0, 4.0, 8.0]
    model, _, _ = load_model(res.checkpoint_dir)
    assert model.n_classes == 3
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        logits = model(x)[0]
    assert logits.shape == (5, 3)
    saved = torch.load(Path(res.checkpoint_dir) / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


# -- the train loop ----------------------------------------------------------------------------------------
def test_tokens_count_batch_times_accumulation_times_block_from_zero(tmp_path, cache):
    """``tokens`` after step s is s · batch_size · grad_accum · block_size (4 · 2 · 8 = 64 a step) and 0 at the
    step-0 evaluation."""
    res = run_training(tiny(tmp_path, cache, "train.steps=3", "train.eval_every=3", "train.grad_accum=2"),
                       workdir=str(tmp_path / "w"))
    assert res.status == "finished"
    assert [(h["step"], h["tokens"]) for h in res.history] == [(0, 0.0), (1, 64.0), (2, 128.0), (3, 192.0)]


def test_evals_happen_every_eval_every_steps_not_only_at_the_end(tmp_path, cache):
    """steps=6, eval_every=2: val_loss at steps 0, 2, 4, 6 (and finite), none at the odd steps."""
    res = run_training(tiny(tmp_path, cache, "train.steps=6", "train.eval_every=2"), workdir=str(tmp_path / "w"))
    evals = [h for h in res.history if "val_loss" in h]
    assert [h["step"] for h in evals] == [0, 2, 4, 6] and all(math.isfinite(h["val_loss"]) for h in evals)

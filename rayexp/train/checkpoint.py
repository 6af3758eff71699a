"""Checkpoints: one directory holding model weights, optimizer state, loop state and the config.

Layout of a checkpoint directory::

    model.pt      state_dict of the (unwrapped) model
    optim.pt      optimizer state_dict
    state.pt      loop state: step, history, initial loss, RNG states, vocab size, extra
    config.yaml   the resolved Experiment
    checksums.json  sha256 of each file above

Writes go to a temporary sibling directory renamed into place, so a killed process never leaves a
half-written checkpoint behind; the checksums catch one damaged afterwards (``verify``), and ``good_checkpoint``
falls back to the previous one of the same run. A run resumes from a checkpoint only when its config.yaml is the run's own
(``resume_point``); ``restore`` loads weights, optimizer state and RNG state back.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from rayexp.config import SWEEP_FIELDS, ConfigError, Experiment, validate


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, step: int, exp: Experiment,
                    extra: dict | None = None) -> str:
    """Write a checkpoint of ``model``/``optimizer`` at ``step`` to ``path`` (atomically); returns it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(unwrap(model).state_dict(), tmp / "model.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optim.pt")
    torch.save({"step": step, **(extra or {})}, tmp / "state.pt")
    (tmp / "config.yaml").write_text(exp.to_yaml())
    sums = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return str(path)


CHECKSUMS = "checksums.json"
KEEP = 2  # checkpoints kept per run: the latest and the previous good one to fall back to


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prune(workdir: Path, keep: int = KEEP) -> None:
    """Drop all but the ``keep`` latest ``checkpoint_<step>`` directories under ``workdir``."""
    done = sorted(p for p in Path(workdir).glob("checkpoint_*") if not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path) -> Path:
    """``path`` when every file matches its checksum; else ConfigError naming the file. A checkpoint
    without checksums (older format) is checked by loading its files."""
    path = _check_dir(path)
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        for name in ("model.pt", "optim.pt", "state.pt"):
            if (path / name).is_file():
                try:
                    torch.load(path / name, map_location="cpu", weights_only=False)
                except Exception as e:
                    raise ConfigError(f"checkpoint file {path / name}: {name} does not load "
                                      f"({type(e).__name__}): corrupt or truncated") from None
        return path
    for name, digest in json.loads(sums_file.read_text()).items():
        f = path / name
        if not f.is_file():
            raise ConfigError(f"checkpoint file {f} is missing: a partial checkpoint")
        if _sha256(f) != digest:
            raise ConfigError(f"checkpoint file {f}: {name} does not load: it does not match its checksum "
                              f"(corrupt or truncated)")
    return path


def good_checkpoint(path) -> tuple[Path, str | None]:
    """``path`` when it verifies, else the latest older ``checkpoint_*`` beside it that does, with a note
    saying so; ConfigError (naming the bad file) when there is none."""
    try:
        return verify(path), None
    except ConfigError as e:
        path, error = Path(path), e
    older = sorted((p for p in path.parent.glob("checkpoint_*") if p.name < path.name and p.is_dir()), reverse=True)
    for p in older:
        try:
            return verify(p), f"{error}; resuming from the previous good checkpoint {str(p)!r}"
        except ConfigError:
            continue
    raise error


def _check_dir(path) -> Path:
    path = Path(path)
    if not (path / "model.pt").is_file() or not (path / "config.yaml").is_file():
        raise ConfigError(f"checkpoint {str(path)!r} not found (expected a directory with model.pt and config.yaml)")
    return path


def load_state(path) -> dict:
    """The loop state saved with a checkpoint (step, history, RNG states, ...)."""
    return torch.load(_check_dir(path) / "state.pt", map_location="cpu", weights_only=False)


def resume_point(path, exp: Experiment) -> tuple[int, float | None] | None:
    """(step, latest val loss) of the checkpoint at ``path`` when ``exp`` wrote it, else None."""
    path = _check_dir(path)
    if (path / "config.yaml").read_text() != exp.to_yaml():
        return None
    state = load_state(path)
    val = next((h["val_loss"] for h in reversed(state["history"]) if "val_loss" in h), None)
    return int(state["step"]), val


def restore(path, model: nn.Module, optimizer, device) -> dict:
    """Load a checkpoint's weights into ``model``, its optimizer state (when saved) into ``optimizer`` and
    its RNG state; returns the loop state (step, history, init_loss, tokens, ...)."""
    path = Path(path)
    state = load_state(path)
    unwrap(model).load_state_dict(torch.load(path / "model.pt", map_location=device))
    if (path / "optim.pt").is_file():
        optimizer.load_state_dict(torch.load(path / "optim.pt", map_location=device, weights_only=False))
    torch.set_rng_state(state["rng"])
    return state


def load_experiment(path) -> Experiment:
    """The resolved Experiment stored with a checkpoint."""
    raw = yaml.safe_load((_check_dir(path) / "config.yaml").read_text())
    for key in SWEEP_FIELDS:  # written before runs and sweeps had their own schemas
        raw.pop(key, None)
    return validate(raw, str(path))


def load_model(path, **model_overrides) -> tuple[nn.Module, Experiment, int]:
    """Rebuild the model of a checkpoint, with weights, on CPU.

    ``model_overrides`` replace fields of the ``model`` section that do not change the weights,
    e.g. ``load_model(p, attention="naive", dropout=0.0)`` for Hessian work.
    Returns ``(model, experiment, vocab_size)``.
    """
    from rayexp.models import build

    exp = load_experiment(verify(path))
    if model_overrides:
        model_cfg = type(exp.model).model_validate({**exp.model.model_dump(), **model_overrides})
        exp = exp.model_copy(update={"model": model_cfg})
    state = load_state(path)
    vocab_size = int(state["vocab_size"])
    model = build(exp.model, vocab_size, state.get("n_classes"), state.get("pad_id"))
    model.load_state_dict(torch.load(Path(path) / "model.pt", map_location="cpu", weights_only=True))
    return model, exp, vocab_size

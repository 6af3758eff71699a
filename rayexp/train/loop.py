"""One worker's training loop: a plain function of an Experiment and a reporter (no Ray, no MLflow).

Determinism: the batch of step ``s`` is drawn from a generator seeded by ``(seed, s)``, so a run
resumed from a checkpoint sees exactly the batches of an uninterrupted one. Each optimizer step
draws one *global* batch of ``world × grad_accum × batch_size`` sequences and rank ``r`` takes its
slice, so ``W`` DDP workers at batch ``B`` follow the same trajectory as one worker at ``W·B``
(``train.batch_size`` is per worker, as in nanoGPT). A draw is a window of a token stream or an example of
an example dataset (rayexp.data: one ``count``/``batch`` interface). Validation uses ``eval_batches`` fixed
batches and logs ``val_loss`` plus ``val_<metric>`` for each metric the data names (``accuracy``: the fraction
of examples whose every scored target is the argmax; docs/methods.md, "Example data").

Divergence: a non-finite training loss, or one above ``diverge_factor ×`` the first step's loss,
stops the run with status ``diverged``; that step is the run's last logged one. No step waits for the GPU: the
loss of a step that is not logged is read once the next step is queued (one step late, as nanoGPT reads it
only at log steps), so the CPU queues step s+1 while the GPU runs step s.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from rayexp.config import IGNORE_INDEX, ConfigError, Experiment
from rayexp.data.examples import ExampleData
from rayexp.models import block_size, build
from rayexp.train.checkpoint import prune, restore, save_checkpoint, unwrap

EVAL_SEED = 1_234_567


class Reporter(Protocol):
    def report(self, step: int, metrics: dict, checkpoint_dir: Optional[str]) -> Optional[bool]:
        """Receive metrics of ``step`` (and a checkpoint directory); return True to stop the run."""


@dataclass
class TrainResult:
    status: str  # finished | diverged | stopped
    step: int
    train_loss: float
    val_loss: float
    tokens_per_s: float
    history: list = field(default_factory=list)
    checkpoint_dir: Optional[str] = None


def lr_at(step: int, exp: Experiment) -> float:
    """Learning rate of ``step`` (1-based): linear warmup, then cosine/linear decay to
    ``min_lr_ratio · lr`` at ``train.steps`` (or constant)."""
    t, base = exp.train, exp.optimizer.lr
    if step <= t.warmup:
        return base * step / max(t.warmup, 1)
    if t.schedule == "constant":
        return base
    frac = (step - t.warmup) / max(t.steps - t.warmup, 1)
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if t.schedule == "cosine" else 1 - frac
    return base * (t.min_lr_ratio + (1 - t.min_lr_ratio) * decay)


def _device(exp: Experiment) -> torch.device:
    want = exp.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible; allowed here: auto, cpu")
        idx = int(os.environ.get("LOCAL_RANK", 0)) if dist.is_initialized() else 0
        return torch.device("cuda", idx % torch.cuda.device_count())
    return torch.device("cpu")


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _step_indices(n: int, count: int, seed: int, step: int) -> torch.Tensor:
    """``count`` random draws from 0..n-1 (window starts or example indices) for ``step``, identical on every
    rank and every resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(n, (count,), generator=g)


def _batch(data, split: str, idx: torch.Tensor, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.batch(split, idx, block)
    if torch.device(device).type == "cuda":  # a copy from pageable memory waits for the stream; from pinned memory it does not
        x, y = x.pin_memory(), y.pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class _Reading:
    """A step's (train loss, grad norm) on its way to the host: on CUDA a non-blocking copy into pinned memory
    and an event, so ``get`` waits for this step only, never for the steps queued after it."""

    def __init__(self, values: torch.Tensor):
        self.event = None
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values = host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        self.values = values

    def get(self) -> tuple[float, float]:
        if self.event is not None:
            self.event.synchronize()
        loss, gnorm = self.values.tolist()
        return loss, gnorm


def _eval_indices(data, count: int, block: int) -> torch.Tensor:
    """The fixed validation draws: random windows (one seed for every run) of a token stream; the first
    ``count`` validation examples (cycled) of an example dataset."""
    if isinstance(data, ExampleData):
        return torch.arange(count) % data.count("val", block)
    return _step_indices(data.count("val", block), count, EVAL_SEED, 0)


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: 1 when the argmax is right at every target ≠ IGNORE_INDEX (top-1 for labels, exact match
    for sequences), else 0."""
    ok = (logits.argmax(-1) == y) | (y == IGNORE_INDEX)
    return ok.reshape(len(y), -1).all(1)


@torch.no_grad()
def evaluate(model: nn.Module, data, exp: Experiment, device, autocast) -> dict:
    """``val_loss``, the mean loss over ``eval_batches`` fixed global validation batches (``world × batch_size``
    draws each, split across ranks like training batches; the same draws for any world size), and
    ``val_<metric>`` for each of ``data.metrics`` (``accuracy``) over the same examples."""
    block, bs, n = block_size(exp.model), exp.train.batch_size, exp.train.eval_batches
    rank, world = _world()
    idx = _eval_indices(data, n * world * bs, block)
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # Σ batch losses, Σ correct examples
    for chunk in idx.view(n, world, bs)[:, rank]:
        x, y = _batch(data, "val", chunk, block, device)
        with autocast:
            logits, loss = model(x, y)
        sums[0] += loss.double()
        if "accuracy" in data.metrics:
            sums[1] += correct(logits, y).sum()
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    out = {"val_loss": sums[0].item() / (n * world)}
    if "accuracy" in data.metrics:
        out["val_accuracy"] = sums[1].item() / (n * world * bs)
    return out


def _block_grad_norms(model: nn.Module) -> dict:
    return {f"grad_norm/{n}": p.grad.norm().item() for n, p in unwrap(model).named_parameters()
            if p.grad is not None}


def _check_data_fits(data, exp: Experiment) -> None:
    block, bs = block_size(exp.model), exp.train.batch_size
    if isinstance(data, ExampleData):  # any number of examples ≥ 1 works (draws repeat)
        return
    if len(data.train) <= block + 1 or len(data.val) <= block + 1:
        raise ConfigError(f"data.corpus {data.corpus!r} has {len(data.train)} train / {len(data.val)} val tokens, "
                          f"too few for model.block_size={block}")
    if bs * (block + 1) > len(data.train):
        raise ConfigError(f"train.batch_size={bs} × block_size {block} = {bs * block} tokens exceeds the "
                          f"train split of data.corpus {data.corpus!r} ({len(data.train)} tokens)")


def run_training(exp: Experiment, reporter: Optional[Reporter] = None, resume_from: Optional[str] = None,
                 workdir: Optional[str] = None, engine_factory: Optional[Callable] = None,
                 monitors: Sequence[Callable] = ()) -> TrainResult:
    """Train ``exp`` for ``train.steps`` optimizer steps and return the outcome.

    ``reporter.report(step, metrics, checkpoint_dir)`` is called every ``log_every`` steps, at every
    eval and at the end; ``checkpoint_dir`` is set when a checkpoint was just written. ``resume_from``
    continues from a checkpoint directory. Under ``torch.distributed`` the model is wrapped in DDP
    (or handed to ``engine_factory(model, optimizer) -> engine`` for DeepSpeed). Each of ``monitors``
    (e.g. ``rayexp.hessian.monitor.CurvatureMonitor``) is called as ``m(step, model, optimizer, data)`` after
    the steps where ``m.due(step)``; its metrics join that step's report (those steps are always logged).
    """
    from rayexp.data import load_data
    from rayexp.optim import build_optimizer

    rank, world = _world()
    device = _device(exp)
    torch.manual_seed(exp.seed)
    data = load_data(exp.data, block_size(exp.model))
    _check_data_fits(data, exp)
    model = build(exp.model, data.vocab_size, data.n_classes, data.pad_id).to(device)
    optimizer = build_optimizer(model, exp.optimizer, exp.rotation)
    state = {"step": 0, "history": [], "init_loss": None, "tokens": 0}
    if resume_from:
        state = restore(resume_from, model, optimizer, device)
    engine = None
    if engine_factory is not None:
        engine = engine_factory(model, optimizer)
        model, optimizer = engine, engine.optimizer
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if exp.train.compile:
        model = torch.compile(model)
    bf16 = exp.train.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    workdir = Path(workdir or Path(exp.output_dir) / "train")
    loop = _Loop(exp, model, optimizer, engine, data, device, autocast, rank, world, workdir, reporter, state)
    loop.monitors = list(monitors)
    return loop.run()


class _Loop:
    """The state of one training run; ``run`` drives it step by step."""

    def __init__(self, exp, model, optimizer, engine, data, device, autocast, rank, world, workdir, reporter, state):
        self.exp, self.t = exp, exp.train
        self.model, self.optimizer, self.engine = model, optimizer, engine
        self.data, self.device, self.autocast = data, device, autocast
        self.rank, self.world, self.workdir, self.reporter = rank, world, workdir, reporter
        self.step, self.history = state["step"], state["history"]
        self.init_loss, self.tokens = state["init_loss"], state["tokens"]
        self.block = block_size(exp.model)
        per_example = 1 if exp.data.images else self.block  # an image is one example, not image_size tokens
        self.tokens_per_step = self.t.batch_size * self.t.grad_accum * world * per_example
        self.last_ckpt: Optional[str] = None
        self.val_loss = next((h["val_loss"] for h in reversed(self.history) if "val_loss" in h), float("nan"))
        self.n_train = data.count("train", self.block)
        self.train_loss = next((h["train_loss"] for h in reversed(self.history) if "train_loss" in h), float("nan"))
        self.tok_s = 0.0
        self.monitors: list = []

    # --- one optimizer step -------------------------------------------------------------------
    def train_step(self, step: int) -> _Reading:
        """Queue one optimizer step; its loss and grad norm arrive through the returned reading."""
        t, B = self.t, self.t.batch_size
        lr = lr_at(step, self.exp)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        starts = _step_indices(self.n_train, t.grad_accum * self.world * B, self.exp.seed, step)
        starts = starts.view(t.grad_accum, self.world, B)[:, self.rank]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on device: one host sync a step
        # the zoo may accumulate fewer (MADA's seed quirk two_micro_batch_start); each loss is still / grad_accum
        n_micro = self.optimizer.micro_batches(step, t.grad_accum) if self.engine is None else t.grad_accum
        for micro in range(n_micro):
            x, y = _batch(self.data, "train", starts[micro], self.block, self.device)
            sync = micro == n_micro - 1 or self.world == 1 or self.engine is not None
            with (nullcontext() if sync else self.model.no_sync()), self.autocast:
                loss = self.model(x, y)[1]
            if self.engine is not None:  # DeepSpeed scales by its gradient_accumulation_steps and
                self.engine.backward(loss)  # steps the optimizer only at the accumulation boundary
                self.engine.step()
            else:
                (loss / t.grad_accum).backward()
                self.optimizer.after_backward(micro, n_micro)  # before clipping: MADA's hypergradient
            loss_sum += loss.detach().double() / n_micro
        if self.world > 1:  # the logged loss is the global mean, identical on every rank
            dist.all_reduce(loss_sum)
            loss_sum /= self.world
        if self.engine is not None:
            gnorm = float(self.engine.get_global_grad_norm() or float("nan"))
            return _Reading(torch.tensor([loss_sum.item(), gnorm], dtype=torch.float64))
        # clip and norm stay on the device (foreach kernels, no .item()): no host sync in a step
        params = [p for p in self.model.parameters() if p.grad is not None]
        if t.clip:
            gnorm = torch.nn.utils.clip_grad_norm_(params, t.clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
        self.optimizer.step()
        return _Reading(torch.stack([loss_sum, gnorm.to(loss_sum)]))

    def zero_grad(self):
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)

    # --- bookkeeping --------------------------------------------------------------------------
    def eval(self) -> dict:
        out = evaluate(self.model, self.data, self.exp, self.device, self.autocast)
        self.val_loss = out["val_loss"]
        return out

    def checkpoint(self) -> Optional[str]:
        """Rank 0 writes ``workdir/checkpoint_<step>`` and drops older ones."""
        path = None
        if self.rank == 0:
            path = str(self.workdir / f"checkpoint_{self.step:06d}")
            extra = {"history": self.history, "init_loss": self.init_loss, "tokens": self.tokens,
                     "rng": torch.get_rng_state(), "vocab_size": self.data.vocab_size,
                     "n_classes": self.data.n_classes, "pad_id": self.data.pad_id}
            # under DeepSpeed ZeRO the optimizer state is partitioned across ranks: weights only
            optimizer = None if self.engine is not None else self.optimizer
            save_checkpoint(path, self.model, optimizer, self.step, self.exp, extra)
            prune(self.workdir)
        if self.world > 1:
            dist.barrier()
        self.last_ckpt = path
        return path

    def emit(self, metrics: dict, checkpoint: bool = False) -> bool:
        """Record ``metrics`` of the current step, checkpoint if asked, report; True means stop."""
        self.history.append({"step": self.step, **metrics})
        ckpt = self.checkpoint() if checkpoint else None
        if self.reporter is None:
            return False
        return bool(self.reporter.report(self.step, metrics, ckpt))

    def stop_if_diverged(self, step: int, loss: float) -> bool:
        """Record ``loss`` as step ``step``'s; if it diverged, log that step as the last one and return True."""
        self.train_loss = loss
        if not self.diverged(loss):
            return False
        self.step = step
        self.emit({"train_loss": loss if math.isfinite(loss) else float("nan"), "diverged": 1.0})
        return True

    def diverged(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if self.init_loss is None:
            self.init_loss = loss
        return loss > self.t.diverge_factor * self.init_loss

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t = self.t
        self.model.train()
        if self.step == 0:
            if self.emit({**self.eval(), "lr": 0.0, "tokens": 0.0}):
                return self.result("stopped")
        status, window_t, window_tok = "finished", time.perf_counter(), 0
        late = None  # (step, reading) of a step not logged: checked once the next step is queued
        while self.step < t.steps:
            self.step += 1
            self.zero_grad()
            reading = self.train_step(self.step)
            if late is not None and self.stop_if_diverged(late[0], late[1].get()[0]):
                status = "diverged"
                break
            self.tokens += self.tokens_per_step
            window_tok += self.tokens_per_step
            do_eval = self.step % t.eval_every == 0 or self.step == t.steps
            do_ckpt = self.step % (t.checkpoint_every or t.eval_every) == 0 or self.step == t.steps
            due = [m for m in self.monitors if m.due(self.step)]
            late = None if do_eval or do_ckpt or due or self.step % t.log_every == 0 else (self.step, reading)
            if late is not None:
                continue
            loss, gnorm = reading.get()
            if self.stop_if_diverged(self.step, loss):
                status = "diverged"
                break
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.tok_s = window_tok / max(time.perf_counter() - window_t, 1e-9)
            metrics = {"train_loss": loss, "lr": lr_at(self.step, self.exp), "grad_norm": gnorm,
                       "tokens": float(self.tokens), "tokens_per_s": self.tok_s}
            if hasattr(self.optimizer, "metrics"):
                metrics.update(self.optimizer.metrics())
            if t.log_block_grad_norms and self.engine is None:
                metrics.update(_block_grad_norms(self.model))
            for m in due:
                metrics.update(m(self.step, unwrap(self.model), self.optimizer, self.data))
            if do_eval:
                metrics.update(self.eval())
            if self.emit(metrics, checkpoint=do_ckpt):
                status = "stopped"
                break
            window_t, window_tok = time.perf_counter(), 0
        return self.result(status)

    def result(self, status: str) -> TrainResult:
        return TrainResult(status=status, step=self.step, train_loss=self.train_loss, val_loss=self.val_loss,
                           tokens_per_s=self.tok_s, history=self.history, checkpoint_dir=self.last_ckpt)

"""Ray glue for one run of a sweep: in the Tune trial itself, or on a Ray Train worker group.

A 1-worker CPU trial runs ``run_training`` directly inside the Tune trial (a TorchTrainer costs about
30 s of start-up on CPU). Anything else (several workers, GPUs, DeepSpeed) goes through Ray Train V2's
``TorchTrainer``: DDP over gloo (CPU) or nccl (GPU), or DeepSpeed ZeRO 1/2/3; rank 0's metrics reach
Tune through ``TuneReportCallback`` (Ray's "Tune + Train V2" pattern: a function trainable that fits a
TorchTrainer). Either way a retried or resumed trial continues from its last checkpoint.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional, Sequence

import ray
import ray.train
import ray.tune

from rayexp.config import ConfigError, Experiment
from rayexp.train.checkpoint import resume_point
from rayexp.train.loop import run_training


def needs_trainer(exp: Experiment) -> bool:
    """True when a trial must run on a Ray Train worker group rather than in the Tune trial.

    A 1-worker trial (CPU or a GPU fraction) runs in the Tune trial itself, which holds its resources;
    only then can several small trials share one GPU without each also starting a TorchTrainer that
    asks for the same GPU share a second time."""
    r = exp.resources
    return r.workers > 1 or r.strategy == "deepspeed"


def check_strategy(exp: Experiment) -> None:
    """DeepSpeed ZeRO partitions optimizer state per coordinate: refuse optimizers that need whole tensors."""
    if exp.resources.strategy != "deepspeed" or exp.deepspeed.zero_stage == 0:
        return
    from rayexp.optim import is_elementwise
    if not is_elementwise(exp.optimizer, exp.rotation):
        raise ConfigError(f"resources.strategy=deepspeed (ZeRO-{exp.deepspeed.zero_stage}) needs an element-wise "
                          f"optimizer; {exp.optimizer.name} with granularity={exp.optimizer.granularity}, "
                          f"rotation={exp.rotation.kind} needs whole tensors; allowed: strategy: ddp")


def deepspeed_config(exp: Experiment) -> dict:
    """The DeepSpeed config of a trial: per-rank micro batch, accumulation, clipping, ZeRO stage, bf16."""
    t = exp.train
    zero = {"stage": exp.deepspeed.zero_stage}
    if exp.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # rayexp's optimizers are plain torch.optim.Optimizers
        "steps_per_print": 10**9,
    }


def deepspeed_engine_factory(exp: Experiment) -> Callable:
    """``engine_factory`` for ``run_training``: wrap model + optimizer in a DeepSpeed ZeRO engine."""
    def make(model, optimizer):
        import torch
        if not torch.cuda.is_available():  # DeepSpeed 0.19 runs ZeRO on CPU over gloo with its cpu accelerator
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(exp))
        return engine
    return make


class TuneReporter:
    """Loop reporter inside a Tune trial or a Train worker: metrics (and checkpoints) to Ray.

    Every row carries ``extra`` (trial key, seed, node id, ...) plus ``step``, ``steps_total``,
    ``progress`` (the scheduler's time axis: ``offset + step``) and the latest ``val_loss`` and other
    ``val_*`` metrics (``val_accuracy``; so ASHA compares like with like between evals); ``evaluated`` marks
    rows where they are fresh.
    """

    def __init__(self, exp: Experiment, report_fn: Callable, checkpoint_cls=None, extra: Optional[dict] = None,
                 offset: int = 0, last_val: Optional[float] = None):
        self.exp, self.report_fn, self.last_val = exp, report_fn, last_val
        self.checkpoint_cls = checkpoint_cls or ray.tune.Checkpoint
        self.extra, self.offset = extra or {}, offset
        self.last_evals: dict = {}  # val_* metrics other than val_loss, as of the latest eval

    def report(self, step: int, metrics: dict, checkpoint_dir: Optional[str] = None) -> bool:
        evaluated = "val_loss" in metrics
        if evaluated:
            self.last_val = metrics["val_loss"]
            self.last_evals = {k: v for k, v in metrics.items() if k.startswith("val_") and k != "val_loss"}
        row = {**metrics, **self.extra, "step": step, "progress": self.offset + step, "evaluated": float(evaluated),
               "steps_total": self.exp.train.steps}
        if self.last_val is not None:
            row.setdefault("val_loss", self.last_val)
        for k, v in self.last_evals.items():
            row.setdefault(k, v)
        ckpt = self.checkpoint_cls.from_directory(checkpoint_dir) if checkpoint_dir else None
        self.report_fn(row, checkpoint=ckpt)
        return False


def resume_dir(get_checkpoint: Callable, scratch: str, exp: Experiment) -> tuple[Optional[str], int, Optional[float]]:
    """The latest Ray checkpoint of this trial copied under ``scratch``, its step and its latest val loss,
    when it was written by ``exp`` (None, 0, None when the run starts fresh)."""
    ckpt = get_checkpoint()
    if ckpt is None:
        return None, 0, None
    local = ckpt.to_directory(os.path.join(scratch, "resume"))
    found = resume_point(local, exp)
    return (local, *found) if found else (None, 0, None)


def _identity(key: str, exp: Experiment, resumed: int) -> dict:
    return {"trial_key": key, "seed": exp.seed, "resumed_from": resumed,
            "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def _reporter(key: str, exp: Experiment, offset: int, report_fn: Callable, checkpoint_cls, get_checkpoint: Callable,
              scratch: str):
    """The run's reporter and the checkpoint directory it resumes from (None: a fresh start)."""
    start, step, val = resume_dir(get_checkpoint, scratch, exp)
    return TuneReporter(exp, report_fn, checkpoint_cls, _identity(key, exp, step), offset, last_val=val), start


def train_worker(config: dict) -> None:
    """Ray Train worker entry: one rank of a DDP / DeepSpeed trial (process group set up by Ray Train)."""
    exp = config["exp"]
    factory = deepspeed_engine_factory(exp) if exp.resources.strategy == "deepspeed" else None
    with tempfile.TemporaryDirectory(prefix="rayexp-train-") as scratch:  # Ray keeps its own checkpoint copies
        reporter, start = _reporter(config["key"], exp, config["offset"], ray.train.report, ray.train.Checkpoint,
                                    ray.train.get_checkpoint, scratch)
        run_training(exp, reporter, resume_from=start, workdir=os.path.join(scratch, "run"), engine_factory=factory,
                     monitors=config.get("monitors", ()))


def run_trial(key: str, exp: Experiment, storage: str, max_failures: int, offset: int = 0,
              after_training: Optional[Callable] = None, monitors: Sequence[Callable] = ()) -> float:
    """One config × one seed (MLflow trial ``key``) inside a Tune trial; returns its final val loss (+inf
    when it diverged). ``offset`` shifts the scheduler's ``progress`` axis (runs in turn in one Tune trial);
    ``storage`` and ``max_failures`` are the sweep's, for a Ray Train worker group. A run in the Tune trial
    itself calls ``after_training(exp, result, identity)`` while its final checkpoint still exists;
    ``monitors`` go to ``run_training`` (every rank's under a Ray Train worker group)."""
    try:
        return _run_trial(key, exp, storage, max_failures, offset, after_training, monitors)
    except ConfigError as e:  # bad input is not retried: one result row says why, the trial ends
        ray.tune.report({"trial_key": key, "config_error": str(e), "step": 0, "steps_total": exp.train.steps,
                         "progress": offset, "evaluated": 0.0, "val_loss": float("inf")})
        return float("inf")


def _run_trial(key: str, exp: Experiment, storage: str, max_failures: int, offset: int,
               after_training: Optional[Callable], monitors: Sequence[Callable] = ()) -> float:
    if needs_trainer(exp):
        return _fit_trainer(key, exp, storage, max_failures, offset, monitors)
    with tempfile.TemporaryDirectory(prefix="rayexp-trial-") as scratch:  # Tune keeps its own checkpoint copies
        reporter, start = _reporter(key, exp, offset, ray.tune.report, ray.tune.Checkpoint, ray.tune.get_checkpoint,
                                    scratch)
        res = run_training(exp, reporter, resume_from=start, workdir=os.path.join(scratch, "run"), monitors=monitors)
        if after_training is not None:
            after_training(exp, res, reporter.extra)
    return res.val_loss if res.status != "diverged" else float("inf")


def _fit_trainer(key: str, exp: Experiment, storage: str, max_failures: int, offset: int,
                 monitors: Sequence[Callable] = ()) -> float:
    """Run the trial on ``resources.workers`` Ray Train workers; Train V2 resumes from its own
    checkpoints in ``storage/train-<key>`` (worker failures: ``max_failures`` retries)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    check_strategy(exp)
    r = exp.resources
    resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"key": key, "exp": exp, "offset": offset, "monitors": list(monitors)},
        torch_config=TorchConfig(backend="nccl" if r.gpus_per_worker > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"train-{key}", storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=[TuneReportCallback()]),
    )
    metrics = trainer.fit().metrics or {}
    return float("inf") if metrics.get("diverged") else float(metrics.get("val_loss", float("nan")))

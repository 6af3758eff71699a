"""Ray glue for one trial: run the loop in the Tune trial itself, or on a Ray Train worker group.

A 1-worker CPU trial runs ``run_training`` directly inside the Tune trial (a TorchTrainer costs about
30 s of start-up on CPU). Anything else (several workers, GPUs, DeepSpeed) goes through Ray Train V2's
``TorchTrainer``: DDP over gloo (CPU) or nccl (GPU), or DeepSpeed ZeRO 1/2/3; its metrics reach Tune
through ``TuneReportCallback``.
"""
from __future__ import annotations

import tempfile
from typing import Optional

import ray.train
import ray.tune

from rayexp.config import ConfigError, Experiment
from rayexp.train.loop import run_training


def needs_trainer(exp: Experiment) -> bool:
    """True when a trial must run on a Ray Train worker group rather than in the Tune trial."""
    r = exp.resources
    return r.workers > 1 or r.gpus_per_worker > 0 or r.strategy == "deepspeed"


def check_strategy(exp: Experiment) -> None:
    """DeepSpeed ZeRO partitions optimizer state per coordinate: refuse optimizers that need whole tensors."""
    if exp.resources.strategy != "deepspeed" or exp.deepspeed.zero_stage == 0:
        return
    from rayexp.optim import is_elementwise
    if not is_elementwise(exp.optimizer, exp.rotation):
        raise ConfigError(f"resources.strategy=deepspeed (ZeRO-{exp.deepspeed.zero_stage}) needs an element-wise "
                          f"optimizer; {exp.optimizer.name} with granularity={exp.optimizer.granularity}, "
                          f"rotation={exp.rotation.kind} needs whole tensors; allowed: strategy: ddp")


def deepspeed_engine_factory(exp: Experiment):
    """``engine_factory`` for ``run_training``: wrap model + optimizer in a DeepSpeed ZeRO engine."""
    def make(model, optimizer):
        import deepspeed

        t = exp.train
        config = {
            "train_micro_batch_size_per_gpu": t.batch_size,
            "gradient_accumulation_steps": t.grad_accum,
            "gradient_clipping": t.clip or 0.0,
            "zero_optimization": {"stage": exp.deepspeed.zero_stage,
                                  **({"offload_optimizer": {"device": "cpu"}} if exp.deepspeed.offload_optimizer else {})},
            "bf16": {"enabled": t.precision == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine
    return make


class TuneReporter:
    """Loop reporter inside a Tune trial or a Train worker: metrics (and checkpoints) to Ray."""

    def __init__(self, exp: Experiment, report_fn, checkpoint_cls=None):
        self.exp, self.report_fn, self.last_val = exp, report_fn, None
        self.checkpoint_cls = checkpoint_cls or ray.tune.Checkpoint

    def report(self, step: int, metrics: dict, checkpoint_dir: Optional[str] = None) -> bool:
        evaluated = "val_loss" in metrics
        if evaluated:
            self.last_val = metrics["val_loss"]
        row = {**metrics, "step": step, "evaluated": float(evaluated), "steps_total": self.exp.train.steps}
        if self.last_val is not None:
            row.setdefault("val_loss", self.last_val)  # schedulers compare the latest val loss
        ckpt = self.checkpoint_cls.from_directory(checkpoint_dir) if checkpoint_dir else None
        self.report_fn(row, checkpoint=ckpt)
        return False


def _resume_dir(get_checkpoint) -> Optional[str]:
    ckpt = get_checkpoint()
    if ckpt is None:
        return None
    local = tempfile.mkdtemp(prefix="rayexp-resume-")
    return ckpt.to_directory(local)


def train_worker(config: dict) -> None:
    """Ray Train worker entry: one rank of a DDP / DeepSpeed trial (process group set up by Ray Train)."""
    exp = Experiment.model_validate(config["exp"])
    factory = deepspeed_engine_factory(exp) if exp.resources.strategy == "deepspeed" else None
    run_training(exp, TuneReporter(exp, ray.train.report, ray.train.Checkpoint), resume_from=_resume_dir(ray.train.get_checkpoint),
                 workdir=tempfile.mkdtemp(prefix="rayexp-train-"), engine_factory=factory)


def run_trial(config: dict) -> None:
    """Tune trainable: one trial (one config × one seed)."""
    exp = Experiment.model_validate(config["exp"])
    if not needs_trainer(exp):
        run_training(exp, TuneReporter(exp, ray.tune.report), resume_from=_resume_dir(ray.tune.get_checkpoint),
                     workdir=tempfile.mkdtemp(prefix="rayexp-trial-"))
        return
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    r = exp.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"exp": config["exp"]},
        torch_config=TorchConfig(backend="nccl" if r.gpus_per_worker > 0 else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
                                     resources_per_worker={"CPU": r.cpus_per_worker,
                                                           **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}),
        run_config=RunConfig(name=f"{config['key']}", storage_path=config["storage"],
                             failure_config=FailureConfig(max_failures=exp.search.max_failures),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()

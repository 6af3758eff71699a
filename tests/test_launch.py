"""Ray Train glue on real Ray: 2-worker DDP (gloo, TorchTrainer inside a Tune trial) reproduces one worker
with the doubled batch; a trial whose Ray worker is killed restarts from its checkpoint and ends exactly
where an uninterrupted run ends; DeepSpeed ZeRO-2 on CPU over gloo."""
import glob
import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from rayexp.spaces import load_sweep
from rayexp.train.launch import deepspeed_config, needs_trainer
from rayexp.train.loop import run_training


def _sweep(tmp_path, name, **sections):
    raw = {"name": name, "model": {"preset": "gpt2-tiny"},
           "train": {"steps": 12, "eval_every": 6, "eval_batches": 2, "log_every": 1, "warmup": 2, "batch_size": 8,
                     "log_block_grad_norms": False},
           "optimizer": {"name": "adamw", "lr": 3e-3}, "seeds": [0],
           "output_dir": str(tmp_path / "out"), "data": {"cache_dir": str(tmp_path / "cache")}}
    for key, val in sections.items():
        raw.setdefault(key, {}).update(val)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_sweep(p)


def _only_run(uri, experiment):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string="tags.`rayexp.kind` = 'trial'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def _curve(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_trial_placement_and_deepspeed_config(tmp_path):
    one = _sweep(tmp_path, "a").resolve({}, 0)
    two = _sweep(tmp_path, "b", resources={"workers": 2}).resolve({}, 0)
    ds = _sweep(tmp_path, "c", resources={"strategy": "deepspeed"}, deepspeed={"zero_stage": 3},
                train={"grad_accum": 2, "precision": "bf16"}).resolve({}, 0)
    assert not needs_trainer(one) and needs_trainer(two) and needs_trainer(ds)
    cfg = deepspeed_config(ds)
    assert cfg["zero_optimization"] == {"stage": 3} and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["bf16"]["enabled"] and cfg["gradient_clipping"] == 1.0


@pytest.mark.slow
def test_two_worker_ddp_trial_equals_one_worker_with_doubled_batch(in_tmp, ray_local):
    """Train V2 TorchTrainer, 2 ranks × 4 sequences over gloo == run_training on 8 sequences (no Ray)."""
    from rayexp.sweep.tune import run_sweep
    spec = _sweep(in_tmp, "ddp", train={"batch_size": 4}, resources={"workers": 2, "cpus_per_worker": 1})
    out = run_sweep(spec, quiet=True)
    client, run = _only_run(out.state.uri, "ddp")
    assert run.data.tags["rayexp.status"] == "finished"
    reference = run_training(_sweep(in_tmp, "ref").resolve({}, 0), workdir=str(in_tmp / "ref"))
    ref_train = {h["step"]: h["train_loss"] for h in reference.history if "train_loss" in h}
    ref_val = {h["step"]: h["val_loss"] for h in reference.history if "val_loss" in h}
    got_train, got_val = _curve(client, run.info.run_id, "train_loss"), _curve(client, run.info.run_id, "val_loss")
    assert sorted(got_train) == list(range(1, 13)) and sorted(got_val) == [0, 6, 12]
    np.testing.assert_allclose([got_train[s] for s in ref_train], list(ref_train.values()), rtol=2e-5)
    np.testing.assert_allclose([got_val[s] for s in ref_val], list(ref_val.values()), rtol=2e-5)


def _kill_trial_once(root, at_step, killed):
    """Watch the trial's result.json; SIGKILL the process running the trial once it passes ``at_step``."""
    deadline = time.time() + 300
    while time.time() < deadline and not killed:
        for path in glob.glob(f"{root}/*/trial_*/result.json"):
            lines = [line for line in open(path).read().splitlines() if line.strip()]
            if lines and json.loads(lines[-1])["step"] >= at_step:
                pid = json.loads(lines[-1])["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_and_ends_like_an_uninterrupted_run(in_tmp, ray_local):
    from rayexp.sweep.tune import run_sweep
    spec = _sweep(in_tmp, "kill", train={"steps": 80, "eval_every": 10, "log_every": 2}, search={"max_failures": 2})
    killed: list = []
    watcher = threading.Thread(target=_kill_trial_once, args=(in_tmp / "out" / "ray_results", 13, killed))
    watcher.start()
    out = run_sweep(spec, quiet=True)
    watcher.join()
    assert killed, "the trial finished before it could be killed"
    client, run = _only_run(out.state.uri, "kill")
    assert run.data.tags["rayexp.status"] == "finished"
    resumed = int(run.data.tags["rayexp.resumed_from_step"])
    assert resumed >= 10 and resumed % 10 == 0  # a checkpoint step at or after the kill's last eval
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 80
    reference = run_training(spec.resolve({}, 0), workdir=str(in_tmp / "ref"))
    assert run.data.metrics["final/val_loss"] == pytest.approx(reference.val_loss, rel=1e-6)


@pytest.mark.slow
def test_deepspeed_zero2_trial_on_cpu_matches_ddp(in_tmp, ray_local):
    """ZeRO-2 (optimizer state and gradients partitioned over 2 gloo ranks) follows the same curve as
    one process on the doubled batch: ZeRO changes where state lives, not the update."""
    pytest.importorskip("deepspeed")
    from rayexp.sweep.tune import run_sweep
    spec = _sweep(in_tmp, "zero2", train={"batch_size": 4, "steps": 8, "eval_every": 4},
                  resources={"workers": 2, "strategy": "deepspeed"}, deepspeed={"zero_stage": 2})
    out = run_sweep(spec, quiet=True)
    client, run = _only_run(out.state.uri, "zero2")
    assert run.data.tags["rayexp.status"] == "finished"
    reference = run_training(_sweep(in_tmp, "ref", train={"steps": 8, "eval_every": 4}).resolve({}, 0),
                             workdir=str(in_tmp / "ref"))
    ref_train = {h["step"]: h["train_loss"] for h in reference.history if "train_loss" in h}
    got = _curve(client, run.info.run_id, "train_loss")
    assert sorted(got) == sorted(ref_train)
    np.testing.assert_allclose([got[s] for s in ref_train], list(ref_train.values()), rtol=1e-4)

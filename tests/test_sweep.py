"""Sweep engine on real Ray and MLflow: planning, malformed files, a sweep end to end, divergence,
resume after the driver is killed, a trial restarted after its worker is killed."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from rayexp.spaces import load_sweep
from rayexp.sweep.__main__ import main
from rayexp.sweep.plan import assignments, plan

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.steps=30", "train.eval_every=15", "train.eval_batches=2", "train.log_every=5", "train.warmup=3",
         "train.batch_size=8"]

BAD = {
    "unknown top key": "nmae: x\n",
    "unknown optimizer key": "optimizer: {lrate: 0.1}\n",
    "unknown optimizer": "optimizer: {name: {grid: [adamw, lamb]}}\n",
    "wrong type steps": "train: {steps: many}\n",
    "wrong type lr": "optimizer: {lr: fast}\n",
    "empty grid": "optimizer: {lr: {grid: []}}\n",
    "empty choice": "optimizer: {lr: {choice: []}}\n",
    "lo > hi": "optimizer: {lr: {uniform: [0.3, 0.1]}}\n",
    "loguniform <= 0": "optimizer: {lr: {loguniform: [0.0, 0.1]}}\n",
    "randint floats": "train: {steps: {randint: [1.5, 9]}}\n",
    "one-number range": "optimizer: {lr: {uniform: [0.1]}}\n",
    "missing metric": "search: {metric: null}\n",
    "unknown metric": "search: {metric: accuracy}\n",
    "bad mode": "search: {mode: lowest}\n",
    "bad scheduler": "search: {scheduler: {hyperband: {}}}\n",
    "bad asha field": "search: {scheduler: {asha: {grace: 5}}}\n",
    "bad algorithm": "search: {algorithm: bayes}\n",
    "continuous space in grid": "search: {algorithm: grid}\noptimizer: {lr: {loguniform: [1.0e-4, 1.0e-2]}}\n",
    "beta out of range in a grid": "optimizer: {betas: {grid: [[0.9, 0.95], [0.9, 1.2]]}}\n",
    "bad strategy": "resources: {strategy: fsdp}\n",
    "negative workers": "resources: {workers: 0}\n",
    "per-optimizer block not a mapping": "optimizer: {adamw: 3}\n",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_sweep_fails_before_ray_with_a_field_named_error(tmp_path, capsys, name):
    import ray
    p = tmp_path / "bad.yaml"
    p.write_text(BAD[name])
    assert main([str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.yaml" in err and "Traceback" not in err
    assert not ray.is_initialized()


def test_grid_plan_crosses_per_optimizer_blocks_with_seeds():
    spec = load_sweep(ROOT / "sweeps" / "adam_vs_sgd.yaml")
    trials = plan(spec, "x")
    assert len(trials) == 8 and len({t.key for t in trials}) == 8
    assert {(t.exp.optimizer.name, t.exp.optimizer.lr) for t in trials} == \
        {("adamw", 1e-3), ("adamw", 3e-3), ("sgd", 0.1), ("sgd", 0.3)}
    assert {t.exp.optimizer.momentum for t in trials if t.exp.optimizer.name == "sgd"} == {0.9}
    assert plan(spec, "x")[3].key == trials[3].key and plan(spec, "y")[3].key != trials[3].key


def test_random_plan_samples_within_bounds_and_is_seeded(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optimizer: {name: {grid: [adamw, sgd]}, lr: {loguniform: [1.0e-4, 1.0e-1]}}\n"
                 "search: {algorithm: random, num_samples: 3, seed: 7}\n")
    a = assignments(load_sweep(p))
    assert len(a) == 6 and all(1e-4 <= x["optimizer.lr"] <= 1e-1 for x in a)
    assert a == assignments(load_sweep(p))


def _write_sweep(tmp_path, extra=""):
    p = tmp_path / "s.yaml"
    p.write_text(f"""name: small
model: {{preset: gpt2-tiny}}
train: {{steps: 30, eval_every: 15, eval_batches: 2, log_every: 5, warmup: 3, batch_size: 8,
        log_block_grad_norms: false}}
optimizer:
  name: {{grid: [adamw, sgd]}}
  adamw: {{lr: 3.0e-3}}
  sgd: {{lr: {{grid: [0.1, 1.0e+4]}}, momentum: 0.0}}
seeds: [0]
search: {{algorithm: grid, max_failures: 2}}
output_dir: {tmp_path}/out
data: {{cache_dir: {tmp_path}/cache}}
{extra}""")
    return p


def _children(uri, experiment="small"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string="tags.`rayexp.kind` = 'trial'")


@pytest.fixture
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_sweep_end_to_end_with_a_diverging_trial(in_tmp, ray_local):
    from rayexp.sweep.tune import run_sweep
    spec = load_sweep(_write_sweep(in_tmp))
    out = run_sweep(spec, quiet=True)
    assert out.errors == 0  # a diverged trial is a result, not an error (the CLI exits 0)
    runs = _children(out.state.uri)
    assert len(runs) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {out.state.parent_run_id}
    status = {(r.data.params["optimizer.name"], r.data.params["optimizer.lr"]): r.data.tags["rayexp.status"]
              for r in runs}
    assert status == {("adamw", "0.003"): "finished", ("sgd", "0.1"): "finished", ("sgd", "10000.0"): "diverged"}
    client = MlflowClient(out.state.uri)
    assert client.get_run(out.state.parent_run_id).info.status == "FINISHED"
    adam = next(r for r in runs if r.data.params["optimizer.name"] == "adamw")
    assert [m.step for m in client.get_metric_history(adam.info.run_id, "val_loss")] == [0, 15, 30]
    best = {r["optimizer"]: r for r in out.summary}
    assert best["sgd"]["config"] == {"optimizer.lr": "0.1"} and best["adamw"]["mean"] < 5.0


def _sweep_proc(path, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "rayexp.sweep", str(path), *extra], cwd=path.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


@pytest.mark.slow
def test_killed_driver_resumes_without_duplicate_runs(in_tmp):
    p = _write_sweep(in_tmp)
    raw = yaml.safe_load(p.read_text())
    raw["train"].update(steps=60, eval_every=20)
    raw["optimizer"]["sgd"]["lr"] = 0.1  # 2 trials: one round of 2 concurrent trials on 2 cores
    p.write_text(yaml.safe_dump(raw))
    proc = _sweep_proc(p)
    lines = []
    for line in proc.stdout:  # kill the whole driver (and its local Ray) once trials are under way
        lines.append(line)
        if "step    20/60" in line:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    name = next(line.split("--resume ")[1].split()[0] for line in lines if "--resume" in line)
    done = subprocess.run([sys.executable, "-m", "rayexp.sweep", str(p), "--resume", name], cwd=in_tmp,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = _children(f"sqlite:///{in_tmp}/mlflow.db")
    keys = [r.data.tags["rayexp.trial_key"] for r in runs]
    assert len(runs) == 2 and len(set(keys)) == 2, keys
    assert all(r.data.tags["rayexp.status"] == "finished" for r in runs)
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "train_loss")]
        assert len(steps) == len(set(steps)) and max(steps) == 60


@pytest.mark.slow
def test_a_trial_that_raises_is_recorded_failed_and_the_cli_exits_1(in_tmp):
    """block_size 512 on a 225-byte corpus raises a ConfigError inside its trial (after Ray started): recorded
    once with its message, never retried; block_size 8 trains."""
    corpus = in_tmp / "tiny.txt"
    corpus.write_text("hello world, a tiny corpus. " * 8)
    p = in_tmp / "s.yaml"
    p.write_text(f"""name: raising
model: {{preset: gpt2-tiny, block_size: {{grid: [8, 512]}}}}
data: {{corpus: "text:{corpus}", tokenizer: bytes, cache_dir: {in_tmp}/cache}}
train: {{steps: 4, eval_every: 2, eval_batches: 1, log_every: 2, warmup: 0, batch_size: 2,
        log_block_grad_norms: false}}
optimizer: {{name: adamw, lr: 1.0e-3}}
seeds: [0]
output_dir: {in_tmp}/out
""")
    proc = _sweep_proc(p)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "1 trial(s) failed" in out and "--resume raising-" in out and "-> failed: data.corpus" in out
    assert "Traceback" not in out and len(out.splitlines()) < 30, out  # a ConfigError is not retried
    uri = f"sqlite:///{in_tmp}/mlflow.db"
    client = MlflowClient(uri)
    status = {r.data.params["model.block_size"]: (r.data.tags["rayexp.status"], r.info.status)
              for r in _children(uri, "raising")}
    assert status == {"8": ("finished", "FINISHED"), "512": ("failed", "FAILED")}
    (failed,) = [r for r in _children(uri, "raising") if r.data.params["model.block_size"] == "512"]
    assert "error.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    parent = client.get_run(failed.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"


def test_every_trial_of_a_config_is_one_seed_and_state_round_trips(tmp_path):
    from rayexp.sweep.callback import SweepState
    from rayexp.sweep.plan import trials_of
    spec = load_sweep(ROOT / "sweeps" / "adam_vs_sgd.yaml")
    trials = trials_of(spec, "x", {"optimizer.name": "sgd", "optimizer.sgd.lr": 0.3})
    assert [t.seed for t in trials] == spec.seeds and len({t.key for t in trials}) == 2
    assert all(t.index is None and t.exp.optimizer.lr == 0.3 for t in trials)
    assert [t.key for t in plan(spec, "x")[6:]] == [t.key for t in trials]  # planned trials are the same runs
    state = SweepState("r", "x", spec.raw, spec.source, str(tmp_path), "sqlite:///m.db", "e", "p")
    state.save()
    assert SweepState.load(state.path) == state

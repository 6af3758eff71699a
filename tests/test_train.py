"""The one-worker training loop: learning, exact resume, grad accumulation, divergence, CLI errors."""
import subprocess
import sys

import pytest

from rayexp.spaces import load_experiment
from rayexp.train.checkpoint import load_model
from rayexp.train.loop import lr_at, run_training

FAST = ["train.steps=40", "train.eval_every=20", "train.eval_batches=2", "train.log_every=5", "train.warmup=5",
        "optimizer.lr=3e-3", "train.batch_size=8"]


def _exp(tmp, *overrides):
    return load_experiment(None, FAST + [f"output_dir={tmp}", f"data.cache_dir={tmp}/cache", *overrides])


class Collect:
    def __init__(self, stop_at=None):
        self.rows, self.stop_at = [], stop_at

    def report(self, step, metrics, checkpoint_dir=None):
        self.rows.append((step, dict(metrics), checkpoint_dir))
        return self.stop_at is not None and step >= self.stop_at


def _losses(history):
    return [(h["step"], h.get("train_loss"), h.get("val_loss")) for h in history]


def test_schedule_warmup_then_cosine_to_min_ratio():
    exp = load_experiment(None, ["train.steps=100", "train.warmup=10", "optimizer.lr=1.0", "train.min_lr_ratio=0.1"])
    assert lr_at(5, exp) == pytest.approx(0.5)
    assert lr_at(10, exp) == pytest.approx(1.0)
    assert lr_at(55, exp) == pytest.approx(0.55)
    assert lr_at(100, exp) == pytest.approx(0.1)


def test_resume_from_checkpoint_reproduces_losses_exactly(tmp_path):
    full = run_training(_exp(tmp_path / "a"), workdir=str(tmp_path / "a"))
    assert full.status == "finished" and full.step == 40
    # an interrupted run: stopped by its reporter right after the step-20 checkpoint
    part = run_training(_exp(tmp_path / "b"), reporter=Collect(stop_at=20), workdir=str(tmp_path / "b"))
    assert part.status == "stopped" and part.checkpoint_dir.endswith("checkpoint_000020")
    rep = Collect()
    resumed = run_training(_exp(tmp_path / "b"), reporter=rep, resume_from=part.checkpoint_dir,
                           workdir=str(tmp_path / "b"))
    assert resumed.status == "finished"
    assert [s for s, _, _ in rep.rows] == [25, 30, 35, 40]  # it went on from step 20; a fresh start reports 0..40
    assert _losses(resumed.history) == _losses(full.history)  # bit-exact, not approximately


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    big = run_training(_exp(tmp_path / "a", "train.steps=10", "train.batch_size=8"), workdir=str(tmp_path / "a"))
    acc = run_training(_exp(tmp_path / "b", "train.steps=10", "train.batch_size=4", "train.grad_accum=2"),
                       workdir=str(tmp_path / "b"))
    for (s1, t1, _), (s2, t2, _) in zip(_losses(big.history), _losses(acc.history)):
        assert s1 == s2 and (t1 is None or abs(t1 - t2) < 1e-5)


def test_training_lowers_val_loss_and_checkpoint_loads(tmp_path):
    res = run_training(_exp(tmp_path, "train.steps=60", "train.eval_every=30"), workdir=str(tmp_path))
    vals = [h["val_loss"] for h in res.history if "val_loss" in h]
    assert vals[-1] < 0.8 * vals[0]
    model, exp, vocab = load_model(res.checkpoint_dir, attention="naive")
    assert exp.model.attention == "naive" and vocab == 256
    # the checkpoint holds the final weights: they give the run's last val loss (naive vs sdpa: fp32 rounding)
    from contextlib import nullcontext

    from rayexp.data import load_data
    from rayexp.train.loop import evaluate
    val = evaluate(model, load_data(exp.data, exp.model.block_size or 64), exp, "cpu", nullcontext())["val_loss"]
    assert val == pytest.approx(res.val_loss, abs=1e-5)


def test_huge_learning_rate_is_reported_as_diverged(tmp_path):
    rep = Collect()
    res = run_training(_exp(tmp_path, "optimizer.name=sgd", "optimizer.lr=1e4", "train.warmup=0", "train.clip=null"),
                       reporter=rep, workdir=str(tmp_path))
    assert res.status == "diverged" and res.step < 40
    assert rep.rows[-1][1]["diverged"] == 1.0


def test_reporter_receives_metrics_and_checkpoints(tmp_path):
    rep = Collect()
    run_training(_exp(tmp_path), reporter=rep, workdir=str(tmp_path))
    steps = [s for s, _, _ in rep.rows]
    assert steps == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert [s for s, _, c in rep.rows if c] == [20, 40]
    assert {"train_loss", "lr", "tokens_per_s", "grad_norm"} <= set(rep.rows[1][1])
    assert any(k.startswith("grad_norm/") for k in rep.rows[1][1])


@pytest.mark.slow
def test_default_adamw_300_steps_lowers_val_loss_by_30_percent(tmp_path):
    """Issue 2 acceptance: gpt2-tiny, adamw, builtin corpus, 300 steps."""
    exp = load_experiment(None, [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache", "optimizer.lr=3e-3"])
    res = run_training(exp, workdir=str(tmp_path))
    vals = [h["val_loss"] for h in res.history if "val_loss" in h]
    assert res.status == "finished" and vals[-1] <= 0.7 * vals[0], vals


def _cli(tmp, *args):
    return subprocess.run([sys.executable, "-m", "rayexp.train", *args], cwd=tmp, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("override, needle", [
    ("model.preset=gpt2-huge", "model.preset"),
    ("data.corpus=text:/nonexistent/file.txt", "data.corpus"),
    ("data.tokenizer=sentencepiece", "data.tokenizer"),
    ("train.batch_size=100000", "train.batch_size"),
    ("optimizer.lr=-1", "optimizer.lr"),
])
def test_bad_input_gives_one_line_error_without_traceback(tmp_path, override, needle):
    out = _cli(tmp_path, override, "train.steps=2", "train.warmup=0", "--no-mlflow")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cli_runs_and_logs_to_local_mlflow(tmp_path):
    out = _cli(tmp_path, *FAST, "train.steps=10", "optimizer.name=sgd", "optimizer.lr=0.05")
    assert out.returncode == 0, out.stderr
    assert "final: status=finished step=10" in out.stdout
    printed = float(out.stdout.split("final: ")[1].split("val_loss=")[1].split()[0])
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED" and run.data.tags["rayexp.status"] == "finished"
    assert run.data.params["optimizer.name"] == "sgd" and float(run.data.params["optimizer.lr"]) == 0.05
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [5, 10]
    assert run.data.metrics["final/val_loss"] == pytest.approx(printed, abs=5e-5)  # printed to 4 decimals
    assert "checkpoint" in [a.path for a in client.list_artifacts(run.info.run_id)]


@pytest.mark.slow
def test_tuned_adam_beats_tuned_sgd_on_gpt2_tiny(tmp_path):
    """Issue 3 acceptance, fixed seed. The lrs are each optimizer's best of a grid measured on this
    setup (adamw {1e-3, 3e-3, 1e-2} -> 3e-3; sgd {0.1, 0.3, 1, 3} -> 0.1; numbers in the issue note)."""
    final = {}
    for name, lr in (("adamw", 3e-3), ("sgd", 0.1)):
        exp = load_experiment(None, [f"optimizer.name={name}", f"optimizer.lr={lr}", f"output_dir={tmp_path}",
                                     f"data.cache_dir={tmp_path}/cache", "train.log_block_grad_norms=false"])
        final[name] = run_training(exp, workdir=str(tmp_path / name)).val_loss
    assert final["adamw"] < final["sgd"], final


def test_a_checkpoint_resumes_only_the_run_that_wrote_it(tmp_path):
    import torch.nn as nn

    from rayexp.config import validate
    from rayexp.train.checkpoint import resume_point, save_checkpoint
    exp = validate({"seed": 0})
    path = save_checkpoint(tmp_path / "ckpt", nn.Linear(2, 2), None, 7, exp,
                           {"history": [{"step": 5, "val_loss": 2.5}, {"step": 7, "train_loss": 2.0}]})
    assert resume_point(path, exp) == (7, 2.5)
    assert resume_point(path, validate({"seed": 1})) is None  # another seed's checkpoint starts it fresh

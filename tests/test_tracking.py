"""MLflow conventions, read back through MlflowClient: local store and a real `mlflow server`."""
import pytest
import yaml
from mlflow.tracking import MlflowClient

from rayexp import tracking
from rayexp.spaces import load_experiment
from rayexp.train.loop import run_training


def _train_with_mlflow(tmp_path, uri, trial_key="trial-a", parent=None, steps=20):
    exp = load_experiment(None, [f"train.steps={steps}", "train.eval_every=10", "train.eval_batches=2",
                                 "train.log_every=5", "train.warmup=2", "train.batch_size=4",
                                 f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache", "name=trk"])
    rep = tracking.MlflowReporter(uri, "trk", exp, trial_key, parent_run_id=parent)
    res = run_training(exp, reporter=rep, workdir=str(tmp_path / trial_key))
    tracking.log_checkpoint(rep.run_id, res.checkpoint_dir, uri)
    rep.finish(res.status, {"val_loss": res.val_loss})
    return rep, res, exp


def _check_run(uri, run_id, exp, res):
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params["optimizer.name"] == exp.optimizer.name
    assert float(run.data.params["optimizer.lr"]) == exp.optimizer.lr
    assert run.data.tags["rayexp.status"] == "finished" and run.data.tags["rayexp.optimizer"] == "adamw"
    vals = client.get_metric_history(run_id, "val_loss")
    assert sorted(m.step for m in vals) == [0, 10, 20]
    assert {m.step: m.value for m in vals}[20] == pytest.approx(res.val_loss)
    cfg = yaml.safe_load(open(client.download_artifacts(run_id, "config.yaml")))
    assert cfg["optimizer"]["lr"] == exp.optimizer.lr and cfg["model"]["preset"] == exp.model.preset
    return client


def test_local_store_holds_params_metrics_config_and_resume_does_not_duplicate(in_tmp):
    uri = tracking.resolve_uri(None)
    assert uri == f"sqlite:///{in_tmp}/mlflow.db"
    parent = tracking.sweep_parent_run(uri, "trk", "sweep-1", {"search": {"algorithm": "grid"}})
    assert tracking.sweep_parent_run(uri, "trk", "sweep-1") == parent  # found, not created again
    rep, res, exp = _train_with_mlflow(in_tmp, uri, parent=parent)
    client = _check_run(uri, rep.run_id, exp, res)
    assert client.get_run(rep.run_id).data.tags["mlflow.parentRunId"] == parent
    # the same trial reported again (a resumed trial): same run, no duplicated metric steps
    again = tracking.MlflowReporter(uri, "trk", exp, "trial-a", parent_run_id=parent)
    assert again.run_id == rep.run_id
    run_training(exp, reporter=again, workdir=str(in_tmp / "again"))
    steps = [m.step for m in client.get_metric_history(rep.run_id, "train_loss")]
    assert len(steps) == len(set(steps))
    assert len(tracking.runs_of(uri, "trk")) == 1
    ckpt, name = tracking.checkpoint_from_run(rep.run_id, uri)
    assert (ckpt and __import__("os").path.exists(f"{ckpt}/model.pt")) and name == client.get_run(rep.run_id).info.run_name


@pytest.mark.slow
def test_real_mlflow_server_roundtrip(tmp_path, mlflow_server):
    rep, res, exp = _train_with_mlflow(tmp_path, mlflow_server, trial_key="trial-srv")
    _check_run(mlflow_server, rep.run_id, exp, res)
    assert tracking.ui_command(mlflow_server).endswith(mlflow_server)

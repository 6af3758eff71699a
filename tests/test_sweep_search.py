"""Search algorithms and schedulers on real Ray Tune: ASHA stops a hopeless trial (MLflow status
'stopped'), optuna samples define-by-run within bounds and runs every seed of each sample."""
import pytest
import yaml
from mlflow.tracking import MlflowClient

from rayexp.spaces import load_sweep
from rayexp.sweep.__main__ import main
from rayexp.sweep.tune import run_sweep


def _spec(tmp_path, optimizer, search, seeds=(0,)):
    raw = {"name": "search", "model": {"preset": "gpt2-tiny"},
           "train": {"steps": 20, "eval_every": 10, "eval_batches": 2, "log_every": 5, "warmup": 2,
                     "batch_size": 8, "log_block_grad_norms": False},
           "optimizer": optimizer, "seeds": list(seeds), "search": search,
           "output_dir": str(tmp_path / "out"), "data": {"cache_dir": str(tmp_path / "cache")}}
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_sweep(p)


def _children(out):
    client = MlflowClient(out.state.uri)
    return client.search_runs([client.get_experiment_by_name("search").experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{out.state.parent_run_id}'")


@pytest.fixture
def ray_local():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_help_explains_the_sweep_file_and_resume(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("--resume", "--dry-run", "key=value", "optuna", "seed", "MLflow"):
        assert word in text, word


@pytest.mark.slow
def test_asha_stops_the_hopeless_trial(in_tmp, ray_local):
    """Trials run one at a time: the good lr sets the rung at step 10, the tiny lr falls below it."""
    spec = _spec(in_tmp, {"name": "adamw", "lr": {"grid": [3e-3, 1e-6]}},
                 {"algorithm": "grid", "max_concurrent": 1,
                  "scheduler": {"asha": {"grace_period": 10, "reduction_factor": 2}}})
    out = run_sweep(spec, quiet=True)
    status = {r.data.params["optimizer.lr"]: r.data.tags["rayexp.status"] for r in _children(out)}
    assert status == {"0.003": "finished", "1e-06": "stopped"}
    best = out.summary[0]
    assert best["config"] == {"optimizer.lr": "0.003"} and best["steps"] == 20


@pytest.mark.slow
def test_optuna_samples_within_bounds_and_runs_every_seed(in_tmp, ray_local):
    spec = _spec(in_tmp, {"name": {"choice": ["adamw", "sgd"]}, "adamw": {"lr": {"loguniform": [1e-4, 1e-2]}},
                          "sgd": {"lr": {"uniform": [0.05, 0.5]}, "momentum": 0.9}},
                 {"algorithm": "optuna", "num_samples": 2, "seed": 3}, seeds=(0, 1))
    out = run_sweep(spec, quiet=True)
    runs = _children(out)
    assert len(runs) == 4 and len({r.data.tags["rayexp.trial_key"] for r in runs}) == 4
    by_config: dict = {}
    for r in runs:
        assert r.data.tags["rayexp.status"] == "finished"
        p = r.data.params
        lo, hi = (1e-4, 1e-2) if p["optimizer.name"] == "adamw" else (0.05, 0.5)
        assert lo <= float(p["optimizer.lr"]) <= hi
        by_config.setdefault((p["optimizer.name"], p["optimizer.lr"]), set()).add(p["seed"])
    assert len(by_config) == 2 and all(seeds == {"0", "1"} for seeds in by_config.values())


def test_optuna_space_is_conditional_and_decodes_list_choices(tmp_path):
    import pickle

    import optuna

    from rayexp.sweep.tune import OptunaSpace
    spec = _spec(tmp_path, {"name": {"choice": ["adamw", "sgd"]},
                            "adamw": {"lr": {"loguniform": [1e-4, 1e-2]}, "betas": {"choice": [[0.9, 0.95], [0.8, 0.99]]}},
                            "sgd": {"lr": {"uniform": [0.05, 0.5]}, "momentum": {"grid": [0.0, 0.9]}}},
                 {"algorithm": "optuna", "num_samples": 8}, seeds=(0, 1))
    space = pickle.loads(pickle.dumps(OptunaSpace(spec, "sweep-id")))  # Tune checkpoints the searcher
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        trials = space(trial)["trials"]  # the suggestion, resolved once: one Trial per seed
        assert [t.seed for t in trials] == [0, 1] and len({t.key for t in trials}) == 2
        exp = trials[0].exp
        name = trial.params["optimizer.name"]
        seen.add(name)
        own = {"adamw": {"optimizer.adamw.lr", "optimizer.adamw.betas"},
               "sgd": {"optimizer.sgd.lr", "optimizer.sgd.momentum"}}[name]
        assert set(trial.params) == own | {"optimizer.name"}  # the other optimizer's block is not sampled
        if name == "adamw":
            assert exp.optimizer.betas in ((0.9, 0.95), (0.8, 0.99)) and 1e-4 <= exp.optimizer.lr <= 1e-2
        else:
            assert exp.optimizer.momentum in (0.0, 0.9) and 0.05 <= exp.optimizer.lr <= 0.5
        study.tell(trial, exp.optimizer.lr)
    assert seen == {"adamw", "sgd"}

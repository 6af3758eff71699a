"""analysis/ scripts: the verdict helpers on hand-made runs, and one whole claim script (rotation_l11: sweep,
checkpoint download, Hessian logged back, report, verdict) against a real ``mlflow server``, its verdict
numbers recomputed here from MLflow."""
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analysis"))

import _common as C  # noqa: E402


def fake_run(status: str, val: float, **params):
    return SimpleNamespace(data=SimpleNamespace(tags={"rayexp.status": status}, metrics={"final/val_loss": val},
                                                params={k.replace("__", "."): str(v) for k, v in params.items()}))


def test_final_val_leaves_out_diverged_runs_and_best_config_picks_the_lowest_mean(capsys):
    runs = [fake_run("finished", 2.0, optimizer__lr=0.1), fake_run("finished", 2.2, optimizer__lr=0.1),
            fake_run("diverged", 0.5, optimizer__lr=1.0), fake_run("finished", 1.9, optimizer__lr=0.01),
            fake_run("finished", 2.5, optimizer__lr=0.01)]
    mean, std, n = C.final_val(runs[:3])
    assert (mean, n) == (pytest.approx(2.1), 2) and std == pytest.approx(np.std([2.0, 2.2], ddof=1))
    assert C.final_val(runs[2:3]) == (math.inf, pytest.approx(math.nan, nan_ok=True), 0)
    lr, chosen = C.best_config(runs)
    assert lr == "0.1" and chosen == runs[:2]  # 2.1 beats 2.2; the diverged lr=1.0 counts as inf
    assert C.pick(runs, optimizer__lr=0.01) == runs[3:]
    assert "edge" not in capsys.readouterr().out
    lr, _ = C.best_config(runs[:2] + runs[3:] + [fake_run("finished", 3.0, optimizer__lr=0.001)], what="sgd")
    assert lr == "0.1" and "best optimizer.lr=0.1 for sgd is at the edge" in capsys.readouterr().out


@pytest.mark.slow
def test_rotation_claim_script_end_to_end_against_an_mlflow_server(mlflow_server, tmp_path, capsys):
    import rotation_l11

    assert rotation_l11.main(["--out", str(tmp_path), "--uri", mlflow_server, "--steps", "8", "--seeds", "0"]) == 0
    printed = capsys.readouterr().out
    assert "Claim 2" in printed and "verdict" in printed
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert len(verdict["rows"]) == 4 and all(isinstance(r["holds"], bool) for r in verdict["rows"])

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("claim2_rotation_l11")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 6  # {adamw, sgd} × {none, per_tensor, randperm} × one seed
    for key, (mean, std, n) in verdict["stats"].items():
        opt, kind = key.split("/")
        (run,) = [r for r in children if r.data.params["optimizer.name"] == opt
                  and r.data.params["rotation.kind"] == kind]
        assert (mean, std, n) == (pytest.approx(run.data.metrics["final/val_loss"]), 0.0, 1)
    (target,) = [r for r in children if r.data.params["optimizer.name"] == "adamw"
                 and r.data.params["rotation.kind"] == "none"]
    m = target.data.metrics
    assert verdict["l11"]["l11"] == pytest.approx(m["hessian/l11"])
    assert verdict["l11"]["l11_rotated"] == pytest.approx(m["hessian/l11_rotated"])
    assert verdict["rows"][1]["holds"] == (m["hessian/l11_rotated"] > m["hessian/l11"])
    parent = client.get_run(target.data.tags["mlflow.parentRunId"])
    assert "report/report.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert (tmp_path / "report" / "l11.png").stat().st_size > 0

"""The CLIs where users meet them: every shipped sweep through ``--dry-run``, the ``rayexp`` umbrella command,
``--resume NAME`` lookup, DeepSpeed's refusal before Ray, and one random-search sweep end to end with
``hessian.after_training`` through ``rayexp sweep`` (then resumed by its sweep name: nothing runs twice)."""
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_userpath import ENV, _cli

from rayexp.config import ConfigError
from rayexp.spaces import load_sweep
from rayexp.sweep.__main__ import _find_state, main
from rayexp.sweep.plan import plan
from rayexp.sweep.state import SweepState

ROOT = Path(__file__).resolve().parents[1]
RAYEXP = Path(sys.executable).parent / "rayexp"  # the console script pip installs
# trials per shipped sweep, counted by hand from each file: Σ over optimizers of its grid sizes, × seeds
SHIPPED = {
    "adam_vs_sgd.yaml": (2 + 2) * 2,  # adamw 2 lrs, sgd 2 lrs; 2 seeds
    "gpt2_124m_adam_vs_sgd.yaml": (3 + 3) * 2,
    "mada.yaml": (2 + 2 * 2) * 2,  # adam 2 lrs; mada 2 lrs × 2 hyper_lr
    "rotation.yaml": (2 * 3 + 1 * 3) * 2,  # adamw 2 lrs × 3 rotations, sgd 1 lr × 3 rotations
    "second_moment.yaml": 3 * (5 + 1) * 2,  # 3 samples × (adam: 5 granularities, sgd: 1); 2 seeds
    "signum_heterogeneity.yaml": (2 + 2 + 2 * 2) * 2,  # adamw 2, sgd 2, signum 2 lrs × 2 momenta
}


def test_the_list_of_shipped_sweeps_is_complete():
    assert sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_sweep_passes_dry_run(name, capsys):
    assert main([str(ROOT / "sweeps" / name), "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.strip().splitlines() if not line.startswith("note: ")]
    n = SHIPPED[name]
    assert lines[-1] == f"{n} trials"
    assert [int(line.split()[0]) for line in lines[:-1]] == list(range(1, n + 1))
    assert len({line.split(None, 1)[1] for line in lines[:-1]}) == n  # no trial listed twice


def readme_sweep_commands() -> list[list[str]]:
    """The arguments of every ``python -m rayexp.sweep`` example in README.md (inline or in a code block), but
    ``--resume`` ones and those with ``<placeholders>`` (cluster addresses)."""
    text = (ROOT / "README.md").read_text()
    spans = re.findall(r"`([^`]*python -m rayexp\.sweep[^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
    blocks = [line for b in re.findall(r"```bash\n(.*?)```", text, re.S) for line in b.splitlines()]
    out = []
    for cmd in spans + [line for line in blocks if "python -m rayexp.sweep" in line]:
        args = shlex.split(cmd.split("python -m rayexp.sweep", 1)[1], comments=True)
        if "<" not in cmd and "--resume" not in args:
            out.append(args)
    return out


def test_every_sweep_command_in_the_readme_passes_dry_run(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = readme_sweep_commands()
    assert len(commands) >= 4, commands
    for args in commands:
        assert main([*args, "--dry-run"]) == 0, (args, capsys.readouterr())
        assert capsys.readouterr().out.strip().splitlines()[-1].endswith(" trials"), args


def test_random_search_samples_in_bounds_and_crosses_the_grid_with_every_sample():
    trials = plan(load_sweep(ROOT / "sweeps" / "second_moment.yaml"), "x")
    adam = [t.exp.optimizer for t in trials if t.exp.optimizer.name == "adam"]
    sgd = [t.exp.optimizer for t in trials if t.exp.optimizer.name == "sgd"]
    assert all(3e-4 <= o.lr <= 1e-2 for o in adam) and all(3e-2 <= o.lr <= 1.0 for o in sgd)
    assert Counter(o.granularity for o in adam) == {g: 3 * 2 for g in ("coordinate", "row", "column", "tensor",
                                                                        "global")}
    # a fresh lr for every (sample, grid point), run on every seed
    assert len({o.lr for o in adam}) == 3 * 5 and len({o.lr for o in sgd}) == 3
    assert set(Counter(o.lr for o in adam + sgd).values()) == {2}
    assert [t.exp.optimizer.lr for t in plan(load_sweep(ROOT / "sweeps" / "second_moment.yaml"), "y")] == \
        [t.exp.optimizer.lr for t in trials]  # search.seed fixes the samples


def test_the_rayexp_command_dispatches_and_lists_its_commands(tmp_path):
    from rayexp.cli import COMMANDS
    out = subprocess.run([str(RAYEXP)], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and all(f"rayexp {c}" in out.stdout for c in COMMANDS), out.stdout
    bad = subprocess.run([str(RAYEXP), "swep"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "rayexp sweep" in bad.stderr
    via = subprocess.run([str(RAYEXP), "sweep", "--dry-run", "train.steps=5"], capture_output=True, text=True,
                         env=ENV, cwd=tmp_path, timeout=120)
    direct, _ = _cli("rayexp.sweep", tmp_path, "--dry-run", "train.steps=5")
    assert via.returncode == direct.returncode == 0 and via.stdout == direct.stdout
    assert via.stdout.strip().endswith("8 trials") and "adamw lr=0.001 seed=0" in via.stdout


def _state(root: Path, run_name: str) -> None:
    SweepState(run_name, "id", {}, "s.yaml", str(root), "sqlite://", "s", "p").save()


def test_resume_finds_a_sweep_by_run_name_or_by_sweep_name_for_the_latest(tmp_path):
    root = tmp_path / "ray_results"
    for name in ("small-2026-01-02_10-00-00", "small-2026-01-03_09-00-00", "other-2026-01-01_00-00-00"):
        _state(root, name)
    assert _find_state(tmp_path, "small").parent.name == "small-2026-01-03_09-00-00"
    assert _find_state(tmp_path, "small-2026-01-02_10-00-00").parent.name == "small-2026-01-02_10-00-00"
    with pytest.raises(ConfigError, match="no sweep of that name .* sweeps there: other-2026-01-01_00-00-00, small-"):
        _find_state(tmp_path, "smal")


def test_resume_of_an_unknown_sweep_is_one_line_naming_the_sweeps_there(tmp_path):
    _state(tmp_path / "out" / "ray_results", "small-2026-01-02_10-00-00")
    out, _ = _cli("rayexp.sweep", tmp_path, "--resume", "nosuch", f"output_dir={tmp_path}/out")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: --resume nosuch: no sweep of that name") and "small-2026-01-02_10-00-00" in line


def test_deepspeed_with_a_whole_tensor_optimizer_exits_2_before_ray(tmp_path):
    out, _ = _cli("rayexp.sweep", tmp_path, "resources.strategy=deepspeed", "optimizer.adamw.granularity=row",
                  f"output_dir={tmp_path}/out",
                  f"data.cache_dir={tmp_path}/cache")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "resources.strategy=deepspeed (ZeRO-2) needs an element-wise optimizer" in line, line
    assert not (tmp_path / "out" / "ray_results").exists()  # nothing started


RANDOM_SWEEP = """name: rnd
model: {preset: null, n_layer: 1, n_head: 1, n_embd: 8, block_size: 8}
train: {steps: 4, batch_size: 4, eval_every: 4, eval_batches: 1, log_every: 2, warmup: 0, log_block_grad_norms: false}
optimizer: {name: adamw, lr: {loguniform: [1.0e-4, 1.0e-2]}}
seeds: [0]
search: {algorithm: random, num_samples: 2, seed: 3}
hessian: {after_training: true, tasks: [top_eigs, trace], top_k: 2, top_eigs_steps: 6, hutchinson_probes: 4,
          batches: 1, batch_size: 2, dtype: fp64}
"""


@pytest.fixture(scope="module")
def random_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rnd")
    (tmp / "s.yaml").write_text(RANDOM_SWEEP + f"output_dir: {tmp}/out\ndata: {{cache_dir: {tmp}/cache}}\n")
    out = subprocess.run([str(RAYEXP), "sweep", "s.yaml"], cwd=tmp, capture_output=True, text=True, env=ENV,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp, f"sqlite:///{tmp}/mlflow.db"


def _trials(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("rnd")
    return client, client.search_runs([exp.experiment_id], filter_string="tags.`rayexp.kind` = 'trial'")


@pytest.mark.slow
def test_random_search_end_to_end_runs_the_planned_samples(random_sweep):
    tmp, uri = random_sweep
    _, runs = _trials(uri)
    planned = sorted(t.exp.optimizer.lr for t in plan(load_sweep(tmp / "s.yaml"), "x"))
    assert sorted(float(r.data.params["optimizer.lr"]) for r in runs) == pytest.approx(planned, rel=1e-12)
    assert all(1e-4 <= lr <= 1e-2 for lr in planned) and planned[0] != planned[1]
    assert {(r.info.status, r.data.tags["rayexp.status"]) for r in runs} == {("FINISHED", "finished")}


@pytest.mark.slow
def test_hessian_after_training_logs_the_final_checkpoints_curvature(random_sweep):
    from rayexp.hessian import analyze_checkpoint
    from rayexp.tracking import checkpoint_from_run
    tmp, uri = random_sweep
    client, runs = _trials(uri)
    for r in runs:
        hist = {k: client.get_metric_history(r.info.run_id, f"hessian/{k}") for k in ("lambda_max", "hutchinson_trace")}
        assert all([m.step for m in h] == [4] for h in hist.values()), hist
        ckpt, _ = checkpoint_from_run(r.info.run_id, uri)
        assert yaml.safe_load((Path(ckpt) / "config.yaml").read_text())["optimizer"]["lr"] == \
            float(r.data.params["optimizer.lr"])
        ref, _ = analyze_checkpoint(ckpt, out_dir=str(tmp / "ref" / r.info.run_id), progress=False)
        for k, h in hist.items():
            assert np.isfinite(h[0].value) and h[0].value == pytest.approx(ref["metrics"][k], rel=1e-9), k


@pytest.mark.slow
def test_resume_by_sweep_name_of_a_finished_sweep_runs_nothing_twice(random_sweep):
    tmp, uri = random_sweep
    _, before = _trials(uri)
    out = subprocess.run([str(RAYEXP), "sweep", "--resume", "rnd", f"output_dir={tmp}/out"], cwd=tmp,
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    _, after = _trials(uri)
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in before)
    assert {r.data.tags["rayexp.status"] for r in after} == {"finished"}

"""The user's path through the CLIs as subprocesses (issue 19): bad input stops before Ray in one line,
interrupts leave MLflow KILLED and resumable, ``train --resume`` continues the checkpoint's own run,
overrides follow one rule, the summary says who won."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
QUICK = ["train.steps=20", "train.eval_every=10", "train.eval_batches=2", "train.log_every=5", "train.warmup=2",
         "train.batch_size=4"]


def _cli(module, tmp, *args, timeout=300):
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp, capture_output=True, text=True,
                         timeout=timeout, env=ENV)
    return out, time.time() - t0


def _local(tmp):
    return [f"output_dir={tmp}/out", f"data.cache_dir={tmp}/cache"]


@pytest.mark.parametrize("override, needle", [
    ("data.corpus=text:/nonexistent", "data.corpus: file not found: '/nonexistent'"),
    ("tracking.uri=http://127.0.0.1:9", "tracking.uri=http://127.0.0.1:9: no MLflow server answers"),
    ("output_dir=/proc/rayexp-out", "output_dir=/proc/rayexp-out: not writable"),
    ("data.corpus=hf:nobody/no-such-dataset", "data.corpus='hf:nobody/no-such-dataset': not in the Hugging Face cache"),
])
def test_bad_input_exits_2_before_ray_in_one_line(tmp_path, override, needle):
    out, secs = _cli("rayexp.sweep", tmp_path, f"data.cache_dir={tmp_path}/cache", override)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2 and secs < 30 and len(lines) <= 3, (secs, out.stdout, out.stderr)
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: {needle}"), line
    assert not (tmp_path / "out").exists() or override.startswith("output_dir")


def test_a_web_server_that_is_not_mlflow_and_a_dry_run_with_a_missing_corpus_exit_2_in_one_line(tmp_path):
    """A plain HTTP server (404 on /health) is named as not MLflow before Ray starts; --dry-run reads local
    corpora too (and starts nothing)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        out, secs = _cli("rayexp.sweep", tmp_path, f"data.cache_dir={tmp_path}/cache", f"tracking.uri={uri}")
    finally:
        server.shutdown()
    assert out.returncode == 2 and secs < 30, (out.stdout, out.stderr)
    assert out.stderr.strip() == (f"error: tracking.uri={uri}: the server there answers /health with HTTP 404, "
                                  f"so it is not an MLflow tracking server; check the host and port")
    dry, _ = _cli("rayexp.sweep", tmp_path, "--dry-run", "data.corpus=text:/nonexistent")
    assert dry.returncode == 2 and dry.stdout == "" and dry.stderr.startswith("error: data.corpus: file not found")


def _runs(uri, experiment="adam_vs_sgd"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000)


def _interrupt_sweep(tmp, sig, *args):
    """Start the default sweep in its own session, send ``sig`` to its process group once a trial has evaluated
    (as Ctrl-C, a service manager's stop or a CI timeout does), and return (exit status, output, seconds from
    the signal to the exit, the group's and session's id)."""
    proc = subprocess.Popen([sys.executable, "-m", "rayexp.sweep", *args], cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step    10/" in line:
            break
    os.killpg(proc.pid, sig)
    t0 = time.time()
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + rest, time.time() - t0, proc.pid


def _resume_finishes_every_trial_once(tmp, name):
    """``--resume NAME`` exits 0 with 8 FINISHED child runs, one per trial key, and the parent FINISHED."""
    done, _ = _cli("rayexp.sweep", tmp, "--resume", name, *_local(tmp), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Failed to fetch" not in done.stdout + done.stderr, done.stdout[:3000]
    runs = _runs(f"sqlite:///{tmp}/mlflow.db")
    children = [r for r in runs if r.data.tags.get("rayexp.kind") == "trial"]
    keys = [r.data.tags["rayexp.trial_key"] for r in children]
    assert len(children) == 8 and len(set(keys)) == 8, keys
    assert {(r.info.status, r.data.tags["rayexp.status"]) for r in children} == {("FINISHED", "finished")}
    assert {r.info.status for r in runs if r.data.tags.get("rayexp.kind") == "sweep"} == {"FINISHED"}
    names = sorted(r.info.run_name for r in children)  # the varied values and the seed, once each
    assert len(set(names)) == 8 and all(re.fullmatch(r"(adamw|sgd) lr=0\.\d+ seed=[01]", n) for n in names), names
    return done, runs


@pytest.mark.slow
def test_sigint_marks_runs_killed_and_resume_finishes_every_trial_once(tmp_path):
    rc, out, secs, _ = _interrupt_sweep(tmp_path, signal.SIGINT, *QUICK, *_local(tmp_path))
    assert rc == 130 and secs < 30, (secs, out)
    assert "Tuner.restore" not in out, out
    name = out.strip().splitlines()[-1].split("--resume ")[1].split()[0]
    runs = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    (parent,) = [r for r in runs if r.data.tags.get("rayexp.kind") == "sweep"]
    assert parent.info.status == "KILLED" and parent.info.run_name == name
    assert not [r for r in runs if r.info.status == "RUNNING"], [(r.info.run_name, r.info.status) for r in runs]
    done, _ = _resume_finishes_every_trial_once(tmp_path, name)
    summary = done.stdout.split("best config per optimizer")[1]  # every trial counted, a winner, edge notes
    assert summary.count("finished:4") == 2 and "8 trials: 8 finished" in summary, summary
    assert "winner: " in summary and "Welch t-test over seeds p=" in summary, summary
    assert summary.count("is at the edge of the values tried") == 2, summary
    assert not re.search(r"\d\.\d{5,}", summary), summary  # 3 significant digits
    exp_id = parent.info.experiment_id  # the last line: rayexp ui, then the sweep's Training runs view
    assert done.stdout.strip().splitlines()[-1].endswith(f"ui   then  http://127.0.0.1:5000/#/experiments/{exp_id}/runs")


@pytest.mark.slow
def test_sigterm_to_the_process_group_exits_130_at_once_and_resume_finishes(tmp_path):
    """SIGTERM to the group used to end Ray's GCS and raylet too (they shared the driver's group): the driver
    waited 60 s for the GCS and died with exit 1 ("Failed to connect to GCS within 60 seconds"), or its core
    worker exited at once on the dead raylet, leaving the MLflow runs RUNNING."""
    rc, out, secs, pgid = _interrupt_sweep(tmp_path, signal.SIGTERM, *QUICK, *_local(tmp_path))
    assert rc == 130 and "Failed to connect to GCS" not in out, (secs, out)
    assert "Tuner.restore" not in out and "Failed to fetch" not in out, out
    last = out.strip().splitlines()[-1]
    from rayexp.cli import shell_command  # the printed command runs from any shell, venv active or not
    assert f"{shell_command('sweep')} --resume adam_vs_sgd-" in last and shell_command("sweep").startswith("/"), out
    runs = _runs(f"sqlite:///{tmp_path}/mlflow.db")
    assert {r.info.status for r in runs if r.data.tags.get("rayexp.kind") == "sweep"} == {"KILLED"}
    assert not [r for r in runs if r.info.status == "RUNNING"], [(r.info.run_name, r.info.status) for r in runs]
    for _ in range(100):  # Ray's processes (in groups of their own, in the sweep's session) end with the driver
        ps = subprocess.run(["ps", "-eo", "sid=,pid=,stat=,cmd="], capture_output=True, text=True).stdout
        left = [p for p in ps.splitlines() if p.split()[0] == str(pgid) and not p.split()[2].startswith("Z")]
        if not left:
            break
        time.sleep(0.1)
    else:
        pytest.fail("left in the sweep's session:\n" + "\n".join(left))
    _resume_finishes_every_trial_once(tmp_path, last.split("--resume ")[1].split()[0])


TRAIN = ["train.steps=20", "train.eval_every=10", "train.eval_batches=2", "train.log_every=10", "train.batch_size=4",
         "--no-mlflow"]


@pytest.fixture(scope="module")
def sgd_checkpoints(tmp_path_factory):
    """An sgd lr 0.05 run of 20 steps with checkpoints at steps 10 and 20 (warm-up 30 clamped, with a note)."""
    tmp = tmp_path_factory.mktemp("sgd")
    out, _ = _cli("rayexp.train", tmp, "optimizer.name=sgd", "optimizer.lr=0.05", *TRAIN, *_local(tmp))
    assert out.returncode == 0 and "note: train.warmup=30 exceeds train.steps=20" in out.stdout, out.stderr
    return tmp / "out" / "train"


def _copy(src, tmp):
    import shutil
    shutil.copytree(src, tmp / "train")
    return tmp / "train"


def test_train_resume_continues_the_checkpoints_own_optimizer_and_lr(sgd_checkpoints, tmp_path):
    ckpts = _copy(sgd_checkpoints, tmp_path)
    out, _ = _cli("rayexp.train", tmp_path, "--resume", str(ckpts / "checkpoint_000020"), "train.steps=30",
                  "--no-mlflow")
    assert out.returncode == 0, out.stderr
    assert "at step 20: sgd lr=0.05" in out.stdout and "| sgd lr=0.05 |" in out.stdout, out.stdout
    assert "final: status=finished step=30" in out.stdout


@pytest.mark.parametrize("override", ["optimizer.name=adamw", "optimizer.lr=0.1", "model.n_layer=4"])
def test_train_resume_refuses_to_change_the_optimizer_or_model_in_one_line(sgd_checkpoints, tmp_path, override):
    out, _ = _cli("rayexp.train", tmp_path, "--resume", str(sgd_checkpoints / "checkpoint_000020"), override,
                  "--no-mlflow")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert f"--resume: {override}" in out.stderr and "Traceback" not in out.stderr


def test_corrupt_checkpoint_is_named_and_resume_falls_back_to_the_previous_good_one(sgd_checkpoints, tmp_path):
    ckpts = _copy(sgd_checkpoints, tmp_path)
    model = ckpts / "checkpoint_000020" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    out, _ = _cli("rayexp.train", tmp_path, "--resume", str(ckpts / "checkpoint_000020"), "--no-mlflow")
    assert out.returncode == 0, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert str(model) in line and "checkpoint_000010" in line, line
    assert "at step 10: sgd lr=0.05" in out.stdout and "final: status=finished step=20" in out.stdout
    import shutil
    shutil.rmtree(ckpts / "checkpoint_000010")  # nothing to fall back to: one line naming the file, exit 2
    model.write_bytes(model.read_bytes()[:1000])  # the resumed run had rewritten it
    out, _ = _cli("rayexp.train", tmp_path, "--resume", str(ckpts / "checkpoint_000020"), "--no-mlflow")
    assert out.returncode == 2 and out.stderr.strip() == f"error: checkpoint file {model}: model.pt does not load: " \
        "it does not match its checksum (corrupt or truncated)", out.stderr
    out, _ = _cli("rayexp.hessian", tmp_path, "--checkpoint", str(ckpts / "checkpoint_000020"), "--tasks", "top_eigs")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and str(model) in out.stderr, out.stderr


@pytest.mark.parametrize("override", ["optimizer.lr=1e-3", "optimizer.lr={grid: [1e-3, 3e-3]}"])
def test_a_generic_override_every_optimizer_block_shadows_is_an_error_naming_them(tmp_path, override):
    out, _ = _cli("rayexp.sweep", tmp_path, "--dry-run", override)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "optimizer.adamw.lr, optimizer.sgd.lr" in out.stderr and "more specific key wins" in out.stderr


def test_overrides_after_a_flag_loguniform_floats_clamped_warmup_and_no_duplicate_trials(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("optimizer:\n  name: {grid: [adamw, sgd]}\n  adamw: {lr: {grid: [1.0e-3, 3.0e-3]}}\n"
                 "seeds: [0, 1]\nsearch: {algorithm: random, num_samples: 3}\n")
    out, _ = _cli("rayexp.sweep", tmp_path, str(p), "--dry-run", "optimizer.lr={grid: [0.1, 0.3]}",
                  "train.steps=2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "note: train.warmup=30 exceeds train.steps=2: clamped to the run's length"
    trials = [line.split(None, 1)[1] for line in lines[1:-1]]
    assert len(trials) == len(set(trials)) == 8 and lines[-1] == "8 trials", lines  # 3 samples of a grid: once
    assert "adamw lr=0.001 seed=0" in trials and "sgd lr=0.3 seed=1" in trials  # the block wins for adamw only
    out, _ = _cli("rayexp.sweep", tmp_path, "--dry-run", "optimizer.adamw.lr={loguniform: [1e-4, 1e-2]}",
                  "search.algorithm=random")
    assert out.returncode == 0 and out.stdout.strip().endswith("6 trials"), out.stderr  # 1 adamw sample, 2 sgd lrs


def test_winner_line_gap_welch_p_and_grid_edges():
    from rayexp import tracking
    from rayexp.sweep.summary import grid_edges, winner_line
    rows = [{"optimizer": "adamw", "config": {"optimizer.lr": "0.0010532935936821241"}, "mean": 2.0, "std": 0.01,
             "finals": [1.99, 2.01]},
            {"optimizer": "sgd", "config": {"optimizer.lr": "0.3"}, "mean": 2.5, "std": 0.02, "finals": [2.48, 2.52]}]
    line = winner_line(rows)
    assert line.startswith("winner: adamw lr=0.00105 val 2 ± 0.01, ahead of sgd lr=0.3 2.5 ± 0.02 by 0.5 (20 %)")
    assert "Welch t-test over seeds p=0.0" in line and "overlap" not in line, line
    rows[1]["finals"] = [1.9, 3.1]
    assert "(the seed bands overlap)" in winner_line(rows)
    series = [tracking.RunGroup("sgd", {"optimizer.lr": v}) for v in ("0.1", "0.3", "1.0")]
    assert grid_edges(series[1], series) == []
    assert grid_edges(series[2], series) == ["sgd's best optimizer.lr=1 is at the edge of the values tried "
                                             "[0.1, 0.3, 1]: the optimum may lie outside"]


@pytest.mark.slow
def test_rayexp_ui_serves_the_last_sweeps_store_links_its_runs_and_stops_its_workers(tmp_path):
    import urllib.request

    from conftest import _free_port
    from rayexp import tracking
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**ENV, "RAYEXP_HOME": str(tmp_path / "home")}
    os.environ["RAYEXP_HOME"] = env["RAYEXP_HOME"]
    try:
        tracking.remember_sweep(uri, tracking.sweep_parent_run(uri, "uitest", "k1", run_name="uitest-1"))
    finally:
        del os.environ["RAYEXP_HOME"]
    port = _free_port()
    # started with SIGINT ignored, as a script's background job is (and as this suite's process may be after
    # in-process sweeps): Ctrl-C must still stop it
    proc = subprocess.Popen([sys.executable, "-m", "rayexp.cli", "ui", "--no-browser", "--port", str(port)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    line = proc.stdout.readline()
    exp_id = MlflowClient(uri).get_experiment_by_name("uitest").experiment_id
    assert line.rstrip().endswith(f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs   (Ctrl-C stops it)"), line
    server = int(line.split("server pid ")[1].split(")")[0])
    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).close()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 0  # a hang guard, not a timing check: 2 busy cores are slow
    deadline = time.monotonic() + 30  # killed workers leave the group once reaped (slow on 2 busy cores)
    with pytest.raises(ProcessLookupError):  # no worker of the server's process group is left
        while time.monotonic() < deadline:
            os.killpg(server, 0)
            time.sleep(0.5)


@pytest.mark.slow  # a new sqlite store's migrations take ~20 s on 2 busy cores
def test_trial_run_names_carry_the_varied_values_and_are_unique_within_the_sweep(tmp_path):
    """Two lrs equal to 3 significant digits get ``#2``; a resumed callback (new object) keeps counting."""
    from rayexp import tracking
    from rayexp.spaces import load_sweep
    from rayexp.sweep.callback import SweepCallback
    from rayexp.sweep.plan import plan
    from rayexp.sweep.state import SweepState
    p = tmp_path / "s.yaml"
    p.write_text("optimizer:\n  name: {grid: [adamw, sgd]}\n  adamw: {lr: {grid: [1.0e-3, 1.0001e-3]}, "
                 "betas: {grid: [[0.9, 0.95], [0.9, 0.99]]}}\n  sgd: {lr: 0.1}\nseeds: [0, 1]\n"
                 "search: {algorithm: grid}\n")
    spec = load_sweep(p, [f"output_dir={tmp_path}/out"])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = tracking.sweep_parent_run(uri, "names", "k", run_name="names-1")
    state = SweepState("names-1", "k", spec.raw, str(p), str(tmp_path / "rr"), uri, "names", parent)
    trials = plan(spec, "k")
    for t in trials[:5]:
        SweepCallback(state, len(trials))._reporter(t)
    cb = SweepCallback(state, len(trials))  # as after a resume: names read back from MLflow
    for t in trials:
        cb._reporter(t)
    names = [r.info.run_name for r in tracking.sweep_children(uri, parent)]
    assert len(names) == len(trials) == 10 and len(set(names)) == 10, names
    assert "adamw lr=0.001 betas=[0.9, 0.95] seed=0" in names and "adamw lr=0.001 betas=[0.9, 0.95] seed=0 #2" in names
    assert "sgd seed=1" in names, names  # sgd varies nothing but its seed


def test_run_sh_installs_from_the_lock_while_it_matches_pyproject_and_names_a_stale_one(tmp_path):
    """The committed lock is current; a dependency edit makes run.sh stop in one line (exit 2) before any
    set-up; an edit outside the dependency tables does not."""
    import hashlib
    import shutil
    for name in ("run.sh", "pyproject.toml", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    venv = tmp_path / "venv"  # an installed venv as run.sh stamps it, its python this one
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    stamp = hashlib.sha1((tmp_path / "requirements.lock").read_bytes() + (tmp_path / "run.sh").read_bytes())
    (venv / f".rayexp-installed-{stamp.hexdigest()[:12]}").touch()
    env = {**os.environ, "RAYEXP_VENV": str(venv), "PYTHON": sys.executable}

    def run_sh():
        return subprocess.run(["bash", "run.sh", "python", "-c", "print('ok')"], cwd=tmp_path, capture_output=True,
                              text=True, env=env, timeout=60)
    out = run_sh()
    assert out.returncode == 0 and out.stdout == "ok\n" and not out.stderr, out.stderr
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    pyproject.write_text(text.replace('addopts = "-ra"', 'addopts = "-ra -q"'))
    assert run_sh().returncode == 0
    pyproject.write_text(text.replace('"rich>=13",', '"rich>=13",\n  "tqdm>=4",'))
    out = run_sh()
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1, out.stderr
    assert "requirements.lock is stale" in out.stderr and out.stderr.strip().endswith("run bash run.sh lock")

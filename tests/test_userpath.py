"""The user's path through the CLIs as subprocesses (issue 19): bad input stops before Ray in one line,
interrupts leave MLflow KILLED and resumable, ``train --resume`` continues the checkpoint's own run,
overrides follow one rule, the summary says who won."""
import os
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
])
def test_bad_input_exits_2_before_ray_in_one_line(tmp_path, override, needle):
    out, secs = _cli("rayexp.sweep", tmp_path, f"data.cache_dir={tmp_path}/cache", override)
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 2 and secs < 30 and len(lines) <= 3, (secs, out.stdout, out.stderr)
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: {needle}"), line
    assert not (tmp_path / "out").exists() or override.startswith("output_dir")

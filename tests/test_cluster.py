"""cluster.yaml passes Ray's own autoscaler validation; a sweep runs on a 2-node Ray cluster on 127.0.0.1."""
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_ray_autoscaler_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))  # fills AWS defaults as `ray up` does
    validate_config(config)
    assert config["head_node_type"] == "head"
    gpu = [n for n in config["available_node_types"] if n.startswith("gpu")]
    assert gpu and all(config["available_node_types"][n]["max_workers"] >= 1 for n in gpu)
    assert any("mlflow server" in c for c in config["head_setup_commands"])
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["head"]["nod_config"] = broken["available_node_types"]["head"].pop("node_config")
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def _ray_start(*args, env=None, groups=None):
    """``ray start ...`` in its own process group (its daemons stay in it), recorded in ``groups``."""
    ray_bin = Path(sys.executable).parent / "ray"
    proc = subprocess.Popen([str(ray_bin), "start", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    groups.append(proc.pid)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stop(groups):
    """Stop only this test's Ray daemons (``ray stop`` would stop every Ray on a shared machine)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 1)):
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        time.sleep(wait)


@pytest.mark.slow
def test_sweep_trials_land_on_both_nodes_of_a_loopback_cluster(tmp_path):
    import tempfile

    from tests.conftest import _free_port
    ray_tmp = tempfile.mkdtemp(prefix="rx", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    port = _free_port()
    # loopback only: token authentication off, so the second node joins without sharing the head's token
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    groups: list[int] = []
    head = _ray_start("--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                      "--include-dashboard=false", f"--temp-dir={ray_tmp}", env=env, groups=groups)
    assert head.returncode == 0, head.stderr
    try:
        worker = _ray_start(f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", env=env,
                            groups=groups)
        assert worker.returncode == 0, worker.stderr
        sweep = tmp_path / "two.yaml"
        sweep.write_text(f"""name: twonode
train: {{steps: 20, eval_every: 10, eval_batches: 2, log_every: 5, warmup: 2, batch_size: 8,
        log_block_grad_norms: false}}
optimizer: {{name: adamw, lr: {{grid: [1.0e-3, 3.0e-3]}}}}
output_dir: {tmp_path}/out
data: {{cache_dir: {tmp_path}/cache}}
""")
        out = subprocess.run([sys.executable, "-m", "rayexp.sweep", str(sweep)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        import json
        results = list((tmp_path / "out" / "ray_results").glob("twonode-*/trial_*/result.json"))
        nodes = set()
        for r in results:
            rows = [json.loads(line) for line in r.read_text().splitlines() if line.strip()]
            nodes.add(rows[-1]["node_id"])
        assert len(results) == 2 and len(nodes) == 2, nodes
    finally:
        _stop(groups)

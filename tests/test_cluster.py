"""cluster.yaml passes Ray's own autoscaler validation; a sweep runs on a 2-node Ray cluster on 127.0.0.1."""
import copy
import os
import signal
import subprocess
import sys
import time
import uuid
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
    import jsonschema
    with pytest.raises(jsonschema.ValidationError, match="'node_config' is a required property") as e:
        validate_config(prepare_config(broken))
    assert list(e.value.path) == ["available_node_types", "head"]  # the schema names the broken node type


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
    # token authentication on, as cluster.yaml starts every node: one shared token file (its file_mounts)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    token = tmp_path / "auth_token"
    token.write_text(uuid.uuid4().hex + "\n")
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
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
        wrong = {**env, "RAY_AUTH_TOKEN": "0" * 32, "RAY_ADDRESS": f"127.0.0.1:{port}"}  # another token: refused
        wrong.pop("RAY_AUTH_TOKEN_PATH")
        intruder = subprocess.run([sys.executable, "-c", "import ray; ray.init(); print(ray.cluster_resources())"],
                                  capture_output=True, text=True, timeout=120, env=wrong)
        assert intruder.returncode != 0 and "CPU" not in intruder.stdout, intruder.stdout
    finally:
        _stop(groups)


def _stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def test_head_commands_bind_to_the_private_address_with_mlflow_basic_auth(tmp_path):
    """The head's commands, rendered by bash with stubs for hostname, pgrep, mlflow and ray: nothing on
    0.0.0.0, MLflow behind its basic-auth app with the user's credentials file, allowed hosts and CORS set."""
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    commands = " ".join(c for k, v in raw.items() if k.endswith("_commands") for c in v)
    assert "0.0.0.0" not in commands and "RAY_AUTH_MODE=disabled" not in commands
    (secret,) = [src for dst, src in raw["file_mounts"].items() if dst.endswith("mlflow_auth.ini")]
    assert secret.startswith("~/") and not list(ROOT.rglob("mlflow_auth.ini"))  # the user's, never committed
    (token,) = [src for dst, src in raw["file_mounts"].items() if dst == "/home/ubuntu/.ray/auth_token"]
    assert token.startswith("~/") and not list(ROOT.rglob("ray_auth_token"))  # Ray's default path on every node
    for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:  # every node: token auth on
        assert "ray stop" in cmd or "RAY_AUTH_MODE=token " in cmd.split("ray start")[0], cmd
    home, stubs = tmp_path / "home", tmp_path / "bin"
    (home / ".rayexp").mkdir(parents=True)
    (home / ".rayexp" / "mlflow_auth.ini").write_text("[mlflow]\nadmin_username = alice\nadmin_password = s3cret\n")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("0123abcd\n")  # what file_mounts copies there
    _stub(stubs / "hostname", "echo '10.1.2.3 172.17.0.1'")
    _stub(stubs / "pgrep", "exit 1")
    for tool in ("mlflow", "ray"):
        _stub(home / "rayexp-venv" / "bin" / tool,
          f'echo "$MLFLOW_AUTH_CONFIG_PATH $RAY_AUTH_MODE $*" >> {tmp_path}/{tool}.argv')
    env = {"HOME": str(home), "PATH": f"{stubs}:/usr/bin:/bin"}
    for cmd in raw["head_setup_commands"] + [c for c in raw["head_start_ray_commands"] if c != "ray stop"]:
        subprocess.run(["bash", "-c", cmd + "\nwait"], env=env, check=True, timeout=30)
    mlflow = (tmp_path / "mlflow.argv").read_text().split()
    assert mlflow[0] == f"{home}/.rayexp/mlflow_auth.ini" and mlflow[1] == "server"
    opts = dict(zip(mlflow[2::2], mlflow[3::2]))
    ray = (tmp_path / "ray.argv").read_text().split()
    assert ray[:2] == ["token", "start"] and "--head" in ray  # the head's Ray saw RAY_AUTH_MODE=token
    assert opts["--host"] == "10.1.2.3" and opts["--app-name"] == "basic-auth"
    assert "10.1.2.3:5000" in opts["--allowed-hosts"].split(",") and "*" not in opts["--cors-allowed-origins"]
    assert "--dashboard-host=10.1.2.3" in (tmp_path / "ray.argv").read_text().split()
    bashrc = (home / ".bashrc").read_text()
    assert "MLFLOW_TRACKING_URI=http://10.1.2.3:5000" in bashrc and "MLFLOW_TRACKING_USERNAME=alice" in bashrc
    assert "export RAY_AUTH_MODE=token" in bashrc
    assert (home / ".ray" / "auth_token").stat().st_mode & 0o777 == 0o600

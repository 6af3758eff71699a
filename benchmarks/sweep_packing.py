"""Packing small trials onto one GPU: wall time of 8 gpt2-tiny trials at 0.25 vs 1.0 GPU per trial.

    python benchmarks/sweep_packing.py [--tiny] [--paths sweep,tune] [--steps 300] [--out r.json]

Two paths, each with ``resources.gpus_per_worker`` 0.25 then 1.0 (cpus_per_worker 1):

- ``sweep``: ``rayexp.sweep.tune.run_sweep`` on an 8-trial grid (adamw, 4 learning rates × 2 seeds), MLflow
  to a throwaway sqlite store; run in a subprocess with a time limit, so a hang is recorded as such.
- ``tune``: the same 8 Experiments as Ray Tune trials whose trainable calls ``run_training`` in the trial
  process with resources ``{"CPU": 1, "GPU": g}`` (what a one-worker trial needs; no TorchTrainer).

Wall time is from the call to the end of the last trial (Ray start-up excluded for ``tune``, included
for ``sweep``). Speedup = wall(1.0) / wall(0.25). ``--tiny`` runs on CPU with 1 GPU declared to Ray
(trials then train on the CPU; only the scheduling is exercised).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LRS = [3e-4, 1e-3, 3e-3, 1e-2]


def raw_sweep(gpus: float, steps: int, out: str) -> dict:
    return {"name": "packing", "model": {"preset": "gpt2-tiny", "attention": "sdpa"},
            "data": {"corpus": "builtin", "tokenizer": "bytes", "cache_dir": f"{out}/cache"},
            "train": {"steps": steps, "batch_size": 16, "eval_every": steps, "eval_batches": 4, "log_every": 50,
                      "warmup": 10, "clip": 1.0, "log_block_grad_norms": False, "checkpoint_every": steps},
            "optimizer": {"name": "adamw", "lr": {"grid": LRS}, "betas": [0.9, 0.95]},
            "seeds": [0, 1], "search": {"algorithm": "grid", "metric": "val_loss", "mode": "min"},
            "resources": {"workers": 1, "gpus_per_worker": gpus, "cpus_per_worker": 1},
            "tracking": {"uri": f"sqlite:///{out}/mlflow.db", "experiment": "packing"}, "output_dir": out}


SWEEP_CHILD = """
import json, sys, time
from rayexp.spaces import SweepSpec
from rayexp.sweep.tune import run_sweep
raw = json.loads(sys.argv[1])
t0 = time.perf_counter()
res = run_sweep(SweepSpec(raw, "benchmark"), quiet=True)
rows = res.summary
print("RESULT " + json.dumps({"wall_s": time.perf_counter() - t0, "summary_rows": len(rows)}))
"""


def sweep_path(gpus: float, args) -> dict:
    out = tempfile.mkdtemp(prefix="packing-")
    raw = raw_sweep(gpus, args.steps, out)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    child = subprocess.Popen([sys.executable, "-c", SWEEP_CHILD, json.dumps(raw)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=out, env=env, start_new_session=True)
    try:
        stdout, _ = child.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child's session: its driver and the Ray it started
        stdout, _ = child.communicate()
        done = [ln for ln in stdout.splitlines() if "finished" in ln.lower() or "terminated" in ln.lower()]
        tail = [ln for ln in stdout.splitlines() if ln.strip()][-3:]
        return {"wall_s": float("nan"), "note": f"no result within {args.timeout} s; {len(done)} lines saying "
                f"finished/terminated; last: " + " | ".join(tail)[-400:]}
    p = subprocess.CompletedProcess(child.args, child.returncode, stdout, "")
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (p.stdout + p.stderr).strip().splitlines()[-6:]
        return {"wall_s": float("nan"), "note": "failed: " + " | ".join(tail)[-300:]}
    r = json.loads(line[7:])
    r["total_s"] = time.perf_counter() - t0
    return r


def tune_path(gpus: float, args) -> dict:
    import ray
    from ray import tune

    from rayexp.config import Experiment

    out = tempfile.mkdtemp(prefix="packing-tune-")
    raw = raw_sweep(gpus, args.steps, out)
    exps = []
    for lr in LRS:
        for seed in (0, 1):
            e = {k: v for k, v in raw.items() if k not in ("search", "seeds", "tracking")}
            e = json.loads(json.dumps(e))
            e["optimizer"]["lr"], e["seed"], e["name"] = lr, seed, f"packing-{lr}-{seed}"
            exps.append(Experiment.model_validate(e).model_dump(mode="json"))

    def trainable(config):
        from rayexp.train.loop import run_training
        exp = Experiment.model_validate(config["exp"])
        res = run_training(exp, workdir=tempfile.mkdtemp(prefix="trial-"))
        tune.report({"val_loss": res.val_loss, "tokens_per_s": res.tokens_per_s})

    t0 = time.perf_counter()
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1, "gpu": gpus}),
                       param_space={"exp": tune.grid_search(exps)},
                       run_config=tune.RunConfig(storage_path=f"{out}/ray_results", verbose=0))
    results = tuner.fit()
    wall = time.perf_counter() - t0
    errors = [str(r.error)[:100] for r in results if r.error]
    return {"wall_s": wall, "trials": len(results), "note": "; ".join(errors)[:200]}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--paths", default="tune,sweep")
    ap.add_argument("--gpus", default="0.25,1.0")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per sweep-path run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch
    from _common import device_name, table, write_json
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    n_gpu = torch.cuda.device_count()
    rows = []
    for path in args.paths.split(","):
        if path == "tune":
            import ray
            ray.init(num_cpus=max(8, os.cpu_count() or 1), num_gpus=n_gpu or (1 if args.tiny else 0),
                     include_dashboard=False, log_to_driver=False)
        try:
            for g in (float(x) for x in args.gpus.split(",")):
                if path == "sweep" and args.tiny:
                    g = 0.0  # the sweep starts its own Ray, which sees no GPU on a CPU machine
                r = sweep_path(g, args) if path == "sweep" else tune_path(g, args)
                rows.append({"path": path, "gpus_per_trial": g, **r})
                print(f"  {path} gpus={g}: {r.get('wall_s', float('nan')):.1f} s {r.get('note', '')}", flush=True)
        finally:
            if path == "tune":
                import ray
                ray.shutdown()
    for path in {r["path"] for r in rows}:
        by = {r["gpus_per_trial"]: r["wall_s"] for r in rows if r["path"] == path}
        for r in rows:
            if r["path"] == path and 1.0 in by:
                r["speedup_vs_1gpu"] = by[1.0] / r["wall_s"] if r["wall_s"] == r["wall_s"] else float("nan")
    print(f"\n8 gpt2-tiny trials x {args.steps} steps (batch 16x64), {device_name()}, {n_gpu} GPU(s)")
    print(table(rows, ["path", "gpus_per_trial", "wall_s", "total_s", "speedup_vs_1gpu", "trials", "summary_rows", "note"],
                {"wall_s": ".1f", "total_s": ".1f", "speedup_vs_1gpu": ".2f"}))
    write_json(args.out, {"rows": rows, "argv": sys.argv})
    return rows


if __name__ == "__main__":
    main()

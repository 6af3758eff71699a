"""Data-parallel scaling of ``rayexp.train.loop.run_training``: tokens/s on 1, 2, 4 GPUs, DDP vs DeepSpeed ZeRO-2.

    python benchmarks/ddp_scaling.py [--tiny] [--gpus 1,2,4] [--strategies ddp,deepspeed] [--out r.json]

For each (strategy, N) the launcher starts ``torchrun --standalone --nproc_per_node=N`` on this file in
worker mode; each worker initializes NCCL (gloo on CPU), builds the Experiment (GPT-2 124M, sdpa, bf16
autocast, batch 12×1024 *per GPU*, AdamW from ``rayexp.optim``, clip 1.0, no compile) and calls
``run_training`` (DDP wrapping by the loop; ZeRO-2 through ``rayexp.train.launch.deepspeed_engine_factory``).
tokens/s is the loop's own ``tokens_per_s`` (global tokens over wall time) of the last ``--windows`` log
windows (median), after ``--warmup`` steps. Efficiency(N) = tokens/s(N) / (N · tokens/s(1, same strategy)).
Data: the builtin corpus with a synthetic 50257-token BPE (GPT-2's vocab size; no download).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(args) -> None:
    """One torchrun rank: run_training under torch.distributed; rank 0 writes the result JSON."""
    sys.path.insert(0, str(HERE))
    import torch
    import torch.distributed as dist
    from _common import install_synthetic_gpt2, peak_memory_gib

    from rayexp.config import Experiment
    from rayexp.train.loop import run_training

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = True
    install_synthetic_gpt2(50257 if not args.tiny else 457)
    model = ({"preset": None, "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64} if args.tiny
             else {"preset": "gpt2-124m"})
    exp = Experiment(name="ddp_bench", model={**model, "attention": "sdpa"},
                     data={"corpus": "builtin", "tokenizer": "gpt2", "cache_dir": args.cache},
                     train={"steps": args.warmup + args.steps * args.windows, "batch_size": 2 if args.tiny else 12,
                            "eval_every": 10 ** 6, "eval_batches": 1, "log_every": args.steps, "warmup": 0,
                            "precision": "bf16" if cuda else "fp32", "clip": 1.0, "checkpoint_every": 10 ** 6,
                            "log_block_grad_norms": False, "device": "auto"},
                     optimizer={"name": "adamw", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 1e-2},
                     resources={"workers": dist.get_world_size(), "strategy": args.strategy},
                     deepspeed={"zero_stage": 2}, output_dir=args.cache)
    factory = None
    if args.strategy == "deepspeed":
        from rayexp.train.launch import check_strategy, deepspeed_engine_factory
        check_strategy(exp)
        factory = deepspeed_engine_factory(exp)
    res = run_training(exp, workdir=f"{args.cache}/w{dist.get_world_size()}_{args.strategy}", engine_factory=factory)
    rates = [h["tokens_per_s"] for h in res.history if "tokens_per_s" in h][-args.windows:]
    mem = torch.tensor([peak_memory_gib() if cuda else 0.0], device="cuda" if cuda else "cpu")
    dist.all_reduce(mem, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps({"tok_s": statistics.median(rates), "rates": rates,
                                                 "loss": res.train_loss, "mem_gib": mem.item()}))
    dist.barrier()
    dist.destroy_process_group()


def launch(n: int, strategy: str, args) -> dict:
    """Run one torchrun job of ``n`` ranks; returns rank 0's result (or the error tail)."""
    result = Path(tempfile.mkdtemp()) / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
           "--worker", "--strategy", strategy, "--result", str(result), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--windows", str(args.windows), "--cache", args.cache] + (["--tiny"] if args.tiny else [])
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0 or not result.is_file():
        tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
        print(f"  {strategy} x{n}: FAILED (rc {p.returncode})\n    " + "\n    ".join(tail), flush=True)
        return {"error": " | ".join(tail[-3:])}
    return json.loads(result.read_text())


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--gpus", default="1,2,4", help="world sizes (on CPU: gloo processes)")
    ap.add_argument("--strategies", default="ddp,deepspeed")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--cache", default="/tmp/rayexp_ddp_bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(HERE))
    import torch
    from _common import device_name, table, write_json
    avail = torch.cuda.device_count()
    sizes = [int(g) for g in args.gpus.split(",") if avail == 0 or int(g) <= avail]
    skipped = [g for g in args.gpus.split(",") if int(g) not in sizes]
    rows = []
    for strategy in args.strategies.split(","):
        mine = []
        for n in sizes:
            r = launch(n, strategy, args)
            row = {"strategy": strategy if strategy == "ddp" else "deepspeed ZeRO-2", "gpus": n, **r}
            if "tok_s" in r:
                row["tok_s_per_gpu"] = r["tok_s"] / n
                print(f"  {row['strategy']} x{n}: {r['tok_s']:.0f} tok/s", flush=True)
            mine.append(row)
        base = next((r["tok_s"] for r in mine if r["gpus"] == 1 and "tok_s" in r), None)
        for r in mine:  # any order of --gpus: efficiency against this strategy's 1-GPU row
            if "tok_s" in r:
                r["efficiency"] = r["tok_s"] / (r["gpus"] * base) if base else float("nan")
        rows += mine
    print(f"\nrun_training scaling, GPT-2 {'tiny' if args.tiny else '124M'} bf16 sdpa, batch "
          f"{2 if args.tiny else 12}x{64 if args.tiny else 1024} per GPU, {device_name()} x{avail or 'CPU'}"
          + (f"; not run (too few GPUs visible): {', '.join(skipped)}" if skipped else ""))
    print(table(rows, ["strategy", "gpus", "tok_s", "tok_s_per_gpu", "efficiency", "mem_gib", "loss", "error"],
                {"tok_s": ".0f", "tok_s_per_gpu": ".0f", "efficiency": ".3f", "mem_gib": ".1f", "loss": ".4f"}))
    write_json(args.out, {"rows": rows, "argv": sys.argv, "gpus_visible": avail})
    return rows


if __name__ == "__main__":
    main()

"""Cost of curvature on GPT-2 124M on one GPU, with PyHessian in the same process.

    python benchmarks/hessian_cost.py --parts products,eig,tasks,params,slq [--tiny] [--out results.json]

Model: GPT-2 124M (dropout 0, fp32, TF32 off unless a row says tf32), briefly trained (``--train-steps``
AdamW steps, bf16+sdpa, on the builtin corpus's bytes) so the Hessian is not that of the initialization;
fixed batches of ``--batch``×1024 tokens from the same corpus.

- products: seconds and peak memory of one Hessian-vector product per mode (``cached``: one backward
  through a kept first-order graph; ``double_backward``; ``fwd_rev``; ``fd``: central difference) and
  precision (fp32, tf32), naive attention and the SDPA math kernel, over the seconds of a strict-fp32
  gradient (``loss.backward()``); relative error of Hv against an fp64 product.
- eig: time to the top eigenvalue within 1e-3 of its converged value: rayexp's Lanczos (cached fp32 and
  tf32 products, every step timed) vs PyHessian 0.1's power iteration (its wheel unpacked in .anchors/ph).
- tasks: ``rayexp.hessian.analyze`` per task with the defaults (budget ``--budget-gib``): HVPs, seconds, peak GiB.
- params: ``shard=params`` over 2 processes sharing the GPU (the Operator/Comm code the Ray actors run,
  over gloo; Ray itself is not on this machine): top eigenvalues vs one process, θ and vector share per process.
- slq: SLQ with ``--probes`` × ``--slq-steps`` on 124M through ``analyze``: wall time and peak memory.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import ANCHORS, device, device_name, peak_memory_gib, peak_memory_reset, sync, table, time_fn, write_json

from rayexp.models.gpt2 import GPT, GPTConfig, PRESETS


def sizes(tiny: bool) -> dict:
    if tiny:
        return dict(model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32), vocab=300, batch=2,
                    slq_model=dict(n_layer=1, n_head=2, n_embd=16, block_size=16), slq_batch=2)
    return dict(model=PRESETS["gpt2-124m"], vocab=50304, batch=4, slq_model=PRESETS["gpt2-mini"], slq_batch=4)


def corpus_tokens() -> np.ndarray:
    """The builtin corpus (the standard library's pydoc topics) as UTF-8 bytes."""
    import pydoc_data.topics as t
    return np.frombuffer("\n\n".join(t.topics.values()).encode("utf-8"), dtype=np.uint8).astype(np.int64)


def batch(tokens: np.ndarray, B: int, T: int, seed: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    starts = g.integers(0, len(tokens) - T - 1, B)
    rows = torch.from_numpy(np.stack([tokens[s:s + T + 1] for s in starts]))
    return rows[:, :-1].to(dev), rows[:, 1:].to(dev)


def trained_model(model_sizes: dict, vocab: int, steps: int, B: int, tokens, dev) -> GPT:
    """GPT trained for ``steps`` AdamW steps (bf16 autocast, sdpa), returned with naive attention in fp32."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab, dropout=0.0, attention="sdpa", **model_sizes)
    model = GPT(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.0)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    for s in range(steps):
        x, y = batch(tokens, B, cfg.block_size, 10_000 + s, dev)
        with amp:
            loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    naive = GPT(GPTConfig(**{**cfg.to_dict(), "attention": "naive"})).to(dev)
    naive.load_state_dict(model.state_dict())
    naive.eval()
    if steps:
        print(f"trained {steps} steps: loss {loss.item():.3f}", flush=True)
    return naive


def timed(fn, warmup: int, reps: int) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``fn``."""
    peak_memory_reset()
    times = time_fn(fn, warmup=warmup, reps=reps)
    return statistics.median(times), peak_memory_gib()


def with_attention(model: GPT, attention: str) -> GPT:
    other = GPT(GPTConfig(**{**model.config.to_dict(), "attention": attention})).to(next(model.parameters()).device)
    other.load_state_dict(model.state_dict())
    return other.eval()


def products_part(model, batches, args) -> list[dict]:
    from rayexp.hessian import HVP, Operator
    x, y = batches[0]
    params = list(model.parameters())

    def backward():
        for p in params:
            p.grad = None
        with torch.enable_grad():
            model(x, y)[1].backward()
    g_s, g_mem = timed(backward, 1, args.reps)
    for p in params:
        p.grad = None
    rows = [{"product": "gradient, loss.backward() (strict fp32)", "s": g_s, "ratio": 1.0, "mem_gib": g_mem}]
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64, device=x.device)
    ref = Operator(HVP(model, [(x, y)], mode="double_backward", dtype="fp64")).matvec(v)
    gc.collect()
    cases = [("cached", "fp32", "naive"), ("cached", "fp32", "sdpa"), ("cached", "tf32", "naive"),
             ("double_backward", "fp32", "naive"), ("fwd_rev", "fp32", "naive"), ("fd", "fp32", "naive")]
    for mode, dtype, att in cases:
        m = model if att == "naive" else with_attention(model, att)
        try:
            op = Operator(HVP(m, [(x, y)], mode=mode, dtype=dtype))
            out = op.matvec(v)  # builds a cached graph outside the clock
            err = float((out - ref).norm() / ref.norm())
            s, mem = timed(lambda: op.matvec(v), 1, args.reps)
            rows.append({"product": f"HVP {mode} {dtype} {att}", "s": s, "ratio": s / g_s, "mem_gib": mem, "rel_err": err})
        except torch.OutOfMemoryError as e:
            rows.append({"product": f"HVP {mode} {dtype} {att}", "note": f"OOM {str(e)[:60]}"})
        op = out = None
        gc.collect()
        peak_memory_reset()
    return rows


class FlatLogits(nn.Module):
    """model(x) → flat logits (B·T, V): the form PyHessian's ``criterion(outputs, targets)`` expects."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, x):
        logits = self.gpt(x)[0]
        return logits.reshape(-1, logits.size(-1))


def lanczos_rows(model, batches, dtype: str, steps: int, ref=None) -> tuple[list[dict], list[float]]:
    """rayexp Lanczos from the mean gradient with cached products, every step timed."""
    from rayexp.hessian import HVP, Operator
    from rayexp.hessian.lanczos import lanczos
    op = Operator(HVP(model, batches, mode="cached", dtype=dtype))
    op.products.build_graphs()
    g = op.grad()
    stamps = []
    peak_memory_reset()
    sync()
    t0 = time.perf_counter()

    def cb(_):
        sync()
        stamps.append(time.perf_counter() - t0)
    T = lanczos(op, g, steps, "full", callback=cb).matrix()
    mem = peak_memory_gib()
    tops = [float(np.linalg.eigvalsh(T[:j, :j])[-1]) for j in range(1, len(T) + 1)]
    ref = tops[-1] if ref is None else ref
    hit = next((j for j in range(1, len(tops) + 1) if abs(tops[j - 1] - ref) <= 1e-3 * abs(ref)), len(tops))
    return [{"method": f"rayexp Lanczos, cached {dtype}, first step within 1e-3", "lambda": tops[hit - 1], "hvps": hit,
             "s": stamps[hit - 1] + g_time(op), "mem_gib": mem},
            {"method": f"rayexp Lanczos, cached {dtype}, {len(tops)} steps", "lambda": tops[-1], "hvps": len(tops),
             "s": stamps[-1], "mem_gib": mem}], tops


def g_time(op) -> float:
    sync()
    t0 = time.perf_counter()
    op.grad()
    sync()
    return time.perf_counter() - t0


def pyhessian_rows(model, batches, tols) -> list[dict]:
    sys.path.insert(0, str(ANCHORS / "ph"))
    try:
        from pyhessian import hessian
    except ImportError:
        return [{"method": "PyHessian missing (unzip its wheel into .anchors/ph)"}]
    x, y = batches[0]
    rows = []
    ph_mod = sys.modules["pyhessian.hessian"]
    inner = ph_mod.hessian_vector_product
    for tol in tols:
        wrapped = FlatLogits(copy.deepcopy(model))
        count = {"n": 0}

        def counting(*a, **k):
            count["n"] += 1
            return inner(*a, **k)
        ph_mod.hessian_vector_product = counting
        peak_memory_reset()
        torch.manual_seed(0)
        sync()
        t0 = time.perf_counter()
        h = hessian(wrapped, lambda out, tgt: F.cross_entropy(out, tgt.reshape(-1)), data=(x, y), cuda=x.is_cuda)
        eigs, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=1)
        sync()
        rows.append({"method": f"PyHessian 0.1 power iteration, tol {tol:g}", "lambda": float(eigs[0]),
                     "hvps": count["n"], "s": time.perf_counter() - t0, "mem_gib": peak_memory_gib()})
        ph_mod.hessian_vector_product = inner
        del wrapped, h
        gc.collect()
    return rows


def eig_part(model, batches, args) -> list[dict]:
    rows, tops = lanczos_rows(model, batches, "fp32", args.lanczos_steps)
    ref = tops[-1]
    gc.collect()
    rows += lanczos_rows(model, batches, "tf32", args.lanczos_steps, ref)[0]
    gc.collect()
    rows += pyhessian_rows(model, batches, args.pyhessian_tol)
    for r in rows:
        if "lambda" in r:
            r["rel_err"] = abs(r["lambda"] - ref) / abs(ref)
            r["s_per_hvp"] = r["s"] / r["hvps"]
    return rows


def tasks_part(model, batches, args) -> list[dict]:
    from rayexp.config import HessianConfig
    from rayexp.hessian import analyze
    blocks = ["transformer.h.0.attn.c_attn.weight.*", "transformer.h.11.mlp.c_fc.weight"]
    rows = []
    for task, extra in [("top_eigs", {}), ("trace", {}), ("l11", {}), ("grad_heterogeneity", {}),
                        ("slq_blocks", {"blocks": blocks, "probes": 2, "slq_steps": 20}),
                        ("block_curvature", {"blocks": blocks, "curvature_steps": 10})]:
        cfg = HessianConfig(tasks=[task], memory_gib=args.budget_gib, **extra)
        peak_memory_reset()
        try:
            t0 = time.perf_counter()
            res = analyze(model, batches, cfg, progress=False)
            rows.append({"task": task, "settings": ", ".join(f"{k}={v}" for k, v in extra.items() if k != "blocks") or "defaults",
                         "hvps": res["hvps"], "s": time.perf_counter() - t0, "peak_gib": peak_memory_gib(),
                         "plan": res["plan"].splitlines()[0][:160]})
        except Exception as e:  # noqa: BLE001 - a row says what failed
            rows.append({"task": task, "note": f"{type(e).__name__}: {str(e)[:120]}"})
        gc.collect()
    return rows


def slq_part(model, batches, args) -> list[dict]:
    from rayexp.config import HessianConfig
    from rayexp.hessian import analyze
    cfg = HessianConfig(tasks=["slq"], probes=args.probes, slq_steps=args.slq_steps, memory_gib=args.budget_gib)
    peak_memory_reset()
    t0 = time.perf_counter()
    res = analyze(model, batches, cfg, progress=True)
    return [{"task": f"slq {args.probes} probes x {args.slq_steps} steps", "hvps": res["hvps"],
             "s": time.perf_counter() - t0, "peak_gib": peak_memory_gib(), "moment1": res["metrics"]["slq_moment1"],
             "plan": res["plan"].splitlines()[0][:160]}]


def _params_worker(rank, world, port, model, batches, steps, q):
    import torch.distributed as dist
    from rayexp.config import HessianConfig
    from rayexp.hessian.lanczos import top_eigs
    from rayexp.hessian.operator import Comm
    from rayexp.hessian.plan import build_operator
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    comm = Comm("params", dist.group.WORLD)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(dev)
    d = flat.numel()
    theta = flat[comm.span(d)].clone()
    del flat
    cuts = [round(i * len(batches) / world) for i in range(world + 1)]
    ids = list(range(cuts[rank], cuts[rank + 1]))
    cfg = HessianConfig(mode="double_backward", dtype="fp32")
    op = build_operator(model.to(dev), [batches[i] for i in ids], cfg, comm=comm, n_batches=len(batches),
                        batch_ids=ids, theta_fn=lambda: comm.gather(theta, d), device=dev)
    for p in op.products.model.parameters():
        p.data = torch.empty(0, device=dev)
    peak_memory_reset()
    t0 = time.perf_counter()
    top = top_eigs(op, k=3, steps=steps, v0=op.grad())
    q.put({"rank": rank, "top": top.tolist(), "params": theta.numel(), "vector": op.span.stop - op.span.start, "d": d,
           "s": time.perf_counter() - t0, "peak_gib": peak_memory_gib()})
    dist.destroy_process_group()


def params_part(model, batches, args) -> list[dict]:
    import torch.multiprocessing as mp
    from rayexp.hessian import HVP, Operator
    from rayexp.hessian.lanczos import top_eigs
    op = Operator(HVP(model, batches, mode="double_backward", dtype="fp32"))
    peak_memory_reset()
    t0 = time.perf_counter()
    ref = top_eigs(op, k=3, steps=args.params_steps, v0=op.grad())
    rows = [{"run": "1 process", "top1": ref[0], "top3": ref[2], "s": time.perf_counter() - t0,
             "peak_gib": peak_memory_gib(), "params": op.d, "vector": op.d}]
    del op
    gc.collect()
    peak_memory_reset()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    cpu_model = copy.deepcopy(model).cpu()
    cpu_batches = [(x.cpu(), y.cpu()) for x, y in batches]
    procs = [ctx.Process(target=_params_worker, args=(r, 2, 29517, cpu_model, cpu_batches, args.params_steps, q))
             for r in range(2)]
    for p in procs:
        p.start()
    outs = sorted([q.get(timeout=600) for _ in procs], key=lambda o: o["rank"])
    for p in procs:
        p.join()
    for o in outs:
        rows.append({"run": f"shard=params rank {o['rank']}/2", "top1": o["top"][0], "top3": o["top"][2], "s": o["s"],
                     "peak_gib": o["peak_gib"], "params": o["params"], "vector": o["vector"],
                     "rel_top1": abs(o["top"][0] - ref[0]) / abs(ref[0])})
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="products,eig,tasks,params")
    ap.add_argument("--tiny", action="store_true", help="a tiny GPT (CPU smoke test)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per fixed batch (default 4; tiny 2)")
    ap.add_argument("--train-steps", type=int, default=None, help="AdamW steps before measuring (default 50; tiny 5)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--lanczos-steps", type=int, default=30)
    ap.add_argument("--pyhessian-tol", type=lambda s: [float(t) for t in s.split(",")], default=[1e-3, 1e-4])
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--slq-steps", type=int, default=100)
    ap.add_argument("--params-steps", type=int, default=10)
    ap.add_argument("--budget-gib", type=float, default=40.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = device()
    sz = sizes(args.tiny)
    B = args.batch or sz["batch"]
    tokens = corpus_tokens()
    print(f"device: {device_name()}", flush=True)
    steps = args.train_steps if args.train_steps is not None else (5 if args.tiny else 50)
    model = trained_model(sz["model"], sz["vocab"], steps, 8 if not args.tiny else 2, tokens, dev)
    T = sz["model"]["block_size"]
    one = [batch(tokens, B, T, 0, dev)]
    two = [batch(tokens, B // 2 or 1, T, s, dev) for s in (1, 2)]
    label = f"GPT-2 {'tiny' if args.tiny else '124M'} fp32, batch {B}x{T}"
    out = {"argv": sys.argv, "label": label}
    parts = {"products": (products_part, one, ["product", "s", "ratio", "mem_gib", "rel_err", "note"]),
             "eig": (eig_part, one, ["method", "lambda", "rel_err", "hvps", "s", "s_per_hvp", "mem_gib"]),
             "tasks": (tasks_part, one, ["task", "settings", "hvps", "s", "peak_gib", "note", "plan"]),
             "params": (params_part, two, ["run", "top1", "top3", "rel_top1", "s", "peak_gib", "params", "vector"]),
             "slq": (slq_part, one, ["task", "hvps", "s", "peak_gib", "moment1", "plan"])}
    for name in args.parts.split(","):
        fn, batches, cols = parts[name]
        t0 = time.perf_counter()
        rows = fn(model, batches, args)
        out[name] = rows
        print(f"\n{name} ({time.perf_counter() - t0:.0f} s), {label}, {device_name()}")
        print(table(rows, cols, {"s": ".3f", "ratio": ".3g", "mem_gib": ".2f", "peak_gib": ".2f", "rel_err": ".2e",
                                 "lambda": ".6g", "s_per_hvp": ".3f", "top1": ".6g", "top3": ".6g", "rel_top1": ".2e"}),
              flush=True)
        write_json(args.out, out)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    main()

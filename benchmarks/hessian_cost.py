"""Cost of curvature on GPT-2: HVP vs gradient time and memory, top eigenvalue vs PyHessian, SLQ over actors.

    python benchmarks/hessian_cost.py [--tiny] [--parts hvp,eig,slq] [--out results.json]

Model: GPT-2 124M (naive attention, dropout 0, fp32, TF32 off), briefly trained (``--train-steps``
AdamW steps, bf16+sdpa, on the builtin corpus's bytes) so the Hessian is not that of the
initialization; one fixed batch of ``--batch``×1024 tokens from the same corpus.

- hvp: seconds per Hessian-vector product ``rayexp.hessian.HVP`` (``fwd_rev``: jvp of grad;
  ``double_backward``: ∇(∇ℓ·v)) over the seconds per gradient (the same functional loss, ``op.grad()``,
  and plain ``loss.backward()``), with peak GPU memory of each.
- eig: top |eigenvalue| by rayexp's Lanczos (full reorthogonalization; the first step j whose top Ritz
  value moved < ``--lanczos-tol`` relative to step j−1; every step timed), by rayexp's power iteration
  (PyHessian's algorithm on rayexp's HVP) and by PyHessian 0.1's ``hessian(model, criterion,
  data=(x, y)).eigenvalues(top_n=1)`` (its wheel from .anchors/; the model wrapped to return flat logits).
- slq: ``ShardedHessian(...).slq(probes, steps)`` with 1, 2, 4 Ray actors on gpt2-mini (4×256 tokens per
  batch, 4 batches): actors share the visible GPUs (fractional GPUs when fewer GPUs than actors), plus a
  local no-Ray ``slq`` on the same operator.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import (ANCHORS, device, device_name, peak_memory_gib, peak_memory_reset, sync, table, time_fn,
                     write_json)

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


def hvp_part(model, x, y, args) -> list[dict]:
    from rayexp.hessian import HVP
    rows = []
    op = HVP(model, [(x, y)], mode="fwd_rev", dtype="fp32")
    v = torch.randn(op.d, device=x.device)
    g_s, g_mem = timed(op.grad, 1, args.reps)
    params = [p for p in model.parameters()]

    def backward():
        for p in params:
            p.grad = None
        with torch.enable_grad():
            model(x, y)[1].backward()
    b_s, b_mem = timed(backward, 1, args.reps)
    for p in params:
        p.grad = None
    rows.append({"what": "gradient, op.grad() (torch.func.grad)", "s": g_s, "ratio": 1.0, "mem_gib": g_mem})
    rows.append({"what": "gradient, loss.backward()", "s": b_s, "ratio": b_s / g_s, "mem_gib": b_mem})
    for mode in ("fwd_rev", "double_backward"):
        op_m = HVP(model, [(x, y)], mode=mode, dtype="fp32")
        try:
            s, mem = timed(lambda: op_m(v), 1, args.reps)
            rows.append({"what": f"HVP {mode}", "s": s, "ratio": s / g_s, "ratio_backward": s / b_s, "mem_gib": mem})
        except torch.OutOfMemoryError as e:
            rows.append({"what": f"HVP {mode}", "s": float("nan"), "ratio": float("nan"), "mem_gib": float("nan"),
                         "note": f"OOM: {str(e)[:80]}"})
        del op_m
        gc.collect()
        peak_memory_reset()
    # a sanity check that the two modes agree (relative difference of Hv)
    a = HVP(model, [(x, y)], mode="fwd_rev", dtype="fp32")(v)
    b = HVP(model, [(x, y)], mode="double_backward", dtype="fp32")(v)
    rows.append({"what": "rel. diff fwd_rev vs double_backward Hv", "s": float("nan"),
                 "ratio": float((a - b).norm() / b.norm()), "mem_gib": float("nan")})
    return rows


class FlatLogits(nn.Module):
    """model(x) → flat logits (B·T, V): the form PyHessian's ``criterion(outputs, targets)`` expects."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, x):
        logits = self.gpt(x)[0]
        return logits.reshape(-1, logits.size(-1))


def eig_part(model, x, y, args) -> list[dict]:
    from rayexp.hessian import HVP
    from rayexp.hessian.lanczos import lanczos, power_iteration
    from rayexp.hessian.probes import probe
    rows = []
    op = HVP(model, [(x, y)], mode=args.eig_mode, dtype="fp32")
    # Lanczos: time every step; the Ritz values of step j are those of T's leading j×j block.
    # start vector drawn (on the CPU, 124M float64 Gaussians) and one HVP run before the clock starts
    v0 = probe(op.d, "gaussian", 0, 0, kind="lanczos").to(x.device)
    op(v0)
    stamps = []
    peak_memory_reset()
    sync()
    t0 = time.perf_counter()

    def cb(j):
        sync()
        stamps.append(time.perf_counter() - t0)
    tri = lanczos(op, v0, args.lanczos_steps, callback=cb)
    mem = peak_memory_gib()
    T = tri.matrix()
    tops = [float(max(np.linalg.eigvalsh(T[:j, :j]), key=abs)) for j in range(1, tri.steps + 1)]
    conv = next((j for j in range(2, len(tops) + 1) if abs(tops[j - 1] - tops[j - 2]) <= args.lanczos_tol * abs(tops[j - 1])),
                len(tops))
    rows.append({"method": f"rayexp Lanczos ({args.eig_mode}), stop at Δλ/λ<{args.lanczos_tol:g}", "lambda": tops[conv - 1],
                 "hvps": conv, "s": stamps[conv - 1], "mem_gib": mem})
    rows.append({"method": f"rayexp Lanczos, all {tri.steps} steps", "lambda": tops[-1], "hvps": tri.steps,
                 "s": stamps[-1], "mem_gib": mem})
    ref = tops[-1]
    hit = next(j for j in range(1, len(tops) + 1) if abs(tops[j - 1] - ref) <= 1e-3 * abs(ref))
    rows.append({"method": "rayexp Lanczos, first step within 1e-3 of its 30-step value", "lambda": tops[hit - 1],
                 "hvps": hit, "s": stamps[hit - 1], "mem_gib": mem})
    # power iteration on rayexp's HVP (PyHessian's algorithm, rayexp's engine)
    peak_memory_reset()
    sync()
    t0 = time.perf_counter()
    lam, used = power_iteration(op, op.d, k=1, iters=100, tol=1e-3, device=x.device)
    sync()
    rows.append({"method": f"rayexp power iteration ({args.eig_mode}), tol 1e-3", "lambda": float(lam[0]), "hvps": used,
                 "s": time.perf_counter() - t0, "mem_gib": peak_memory_gib()})
    del op
    gc.collect()
    # PyHessian 0.1
    try:
        sys.path.insert(0, str(ANCHORS / "ph"))
        from pyhessian import hessian
    except ImportError:
        print("PyHessian missing: unzip .anchors/PyHessian-0.1-py3-none-any.whl into .anchors/ph", flush=True)
        return [dict(r, rel_vs_lanczos=abs(r["lambda"] - ref) / abs(ref)) for r in rows]
    for tol in args.pyhessian_tol:
        wrapped = FlatLogits(copy.deepcopy(model))
        for p in wrapped.parameters():
            p.grad = None
        count = {"n": 0}
        ph_mod = sys.modules["pyhessian.hessian"]  # the module (the package re-exports the class by that name)
        inner = ph_mod.hessian_vector_product

        def counting(*a, **k):
            count["n"] += 1
            return inner(*a, **k)
        ph_mod.hessian_vector_product = counting
        peak_memory_reset()
        torch.manual_seed(0)
        sync()
        t0 = time.perf_counter()
        try:
            h = hessian(wrapped, lambda out, tgt: F.cross_entropy(out, tgt.reshape(-1)), data=(x, y),
                        cuda=x.device.type == "cuda")
            eigs, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=1)
            sync()
            rows.append({"method": f"PyHessian 0.1 power iteration, tol {tol:g}", "lambda": float(eigs[0]),
                         "hvps": count["n"], "s": time.perf_counter() - t0, "mem_gib": peak_memory_gib()})
        except torch.OutOfMemoryError as e:
            rows.append({"method": f"PyHessian 0.1, tol {tol:g}", "lambda": float("nan"), "hvps": 0,
                         "s": float("nan"), "mem_gib": float("nan"), "note": f"OOM {str(e)[:60]}"})
        finally:
            ph_mod.hessian_vector_product = inner
        for p in wrapped.parameters():
            p.grad = None
        del wrapped
        h = None
        gc.collect()
    lanczos_s = rows[0]["s"]
    for r in rows:
        r["rel_vs_lanczos"] = abs(r["lambda"] - ref) / abs(ref)
        r["speedup_of_lanczos"] = r["s"] / lanczos_s
        r["s_per_hvp"] = r["s"] / r["hvps"] if r["hvps"] else float("nan")
    return rows


def slq_part(args, dev, tokens) -> list[dict]:
    import ray
    from rayexp.hessian import HVP, slq
    from rayexp.hessian.distributed import ShardedHessian
    sz = sizes(args.tiny)
    # vocab 256: the corpus is bytes, and SLQ keeps probes × steps float64 Lanczos vectors of length d
    model = trained_model(sz["slq_model"], 256, 0, sz["slq_batch"], tokens, dev)
    T = sz["slq_model"]["block_size"]
    batches = [tuple(t.cpu() for t in batch(tokens, sz["slq_batch"], T, 100 + i, "cpu")) for i in range(args.slq_batches)]
    rows = []
    op = HVP(model, batches, mode="fwd_rev", dtype="fp32", device=dev)
    slq(op, op.d, probes=args.probes, steps=2)  # warm-up: CUDA kernels, vmap tracing
    sync()
    t0 = time.perf_counter()
    q = slq(op, op.d, probes=args.probes, steps=args.slq_steps)
    sync()
    base = time.perf_counter() - t0
    rows.append({"actors": "local (no Ray)", "gpus_per_actor": "-", "s": base, "startup_s": 0.0,
                 "moment1": q.moment(1), "speedup": 1.0})
    del op
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the actors need the memory this process cached
    n_gpu = torch.cuda.device_count()
    ray.init(num_cpus=max(4, args.max_actors), num_gpus=n_gpu, include_dashboard=False, log_to_driver=False)
    try:
        for n in (1, 2, 4):
            if n > args.max_actors:
                break
            gpa = min(1.0, n_gpu / n) if n_gpu else 0.0
            t0 = time.perf_counter()
            sh = ShardedHessian(copy.deepcopy(model).cpu(), batches, actors=n, gpus_per_actor=gpa, mode="fwd_rev",
                                dtype="fp32")
            sh.count  # waits until every actor is constructed
            sh.slq(n, 2)  # warm-up: one short probe per actor (CUDA context, kernels)
            start = time.perf_counter() - t0
            t0 = time.perf_counter()
            q = sh.slq(args.probes, args.slq_steps)
            s = time.perf_counter() - t0
            sh.shutdown()
            rows.append({"actors": n, "gpus_per_actor": gpa, "s": s, "startup_s": start, "moment1": q.moment(1),
                         "speedup": base / s})
            print(f"  SLQ {n} actors: {s:.2f} s (+{start:.1f} s start-up)", flush=True)
    finally:
        ray.shutdown()
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke run)")
    ap.add_argument("--parts", default="hvp,eig,slq")
    ap.add_argument("--batch", type=int, default=None, help="sequences in the fixed batch (default 4; tiny 2)")
    ap.add_argument("--train-steps", type=int, default=None, help="AdamW steps before measuring (default 50; tiny 5)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--eig-mode", default="fwd_rev", choices=["fwd_rev", "double_backward"])
    ap.add_argument("--lanczos-steps", type=int, default=30)
    ap.add_argument("--lanczos-tol", type=float, default=1e-4)
    ap.add_argument("--pyhessian-tol", type=lambda s: [float(t) for t in s.split(",")], default=[1e-3, 1e-4])
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--slq-steps", type=int, default=20)
    ap.add_argument("--slq-batches", type=int, default=4)
    ap.add_argument("--max-actors", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = device()
    sz = sizes(args.tiny)
    B = args.batch or sz["batch"]
    tokens = corpus_tokens()
    parts = args.parts.split(",")
    print(f"device: {device_name()}", flush=True)
    out = {"argv": sys.argv}
    if "hvp" in parts or "eig" in parts:
        steps = args.train_steps if args.train_steps is not None else (5 if args.tiny else 50)
        model = trained_model(sz["model"], sz["vocab"], steps, 8 if not args.tiny else 2, tokens, dev)
        for p in model.parameters():
            p.requires_grad_(True)
        x, y = batch(tokens, B, sz["model"]["block_size"], 0, dev)
        label = f"GPT-2 {'tiny' if args.tiny else '124M'} naive attention fp32, batch {B}x{sz['model']['block_size']}"
        if "hvp" in parts:
            rows = hvp_part(model, x, y, args)
            out["hvp"] = rows
            print(f"\nHVP cost, {label}, {device_name()}")
            print(table(rows, ["what", "s", "ratio", "ratio_backward", "mem_gib"],
                        {"s": ".4f", "ratio": ".3g", "ratio_backward": ".3g", "mem_gib": ".2f"}), flush=True)
        if "eig" in parts:
            rows = eig_part(model, x, y, args)
            out["eig"] = rows
            print(f"\nTop |eigenvalue|, {label}, {device_name()}")
            print(table(rows, ["method", "lambda", "rel_vs_lanczos", "hvps", "s", "s_per_hvp", "speedup_of_lanczos",
                                "mem_gib"],
                        {"lambda": ".6g", "rel_vs_lanczos": ".2e", "s": ".2f", "s_per_hvp": ".3f", "speedup_of_lanczos": ".2f",
                         "mem_gib": ".2f"}), flush=True)
        del model
        gc.collect()
    if "slq" in parts:
        try:
            rows = slq_part(args, dev, tokens)
            out["slq"] = rows
            n_gpu = torch.cuda.device_count()
            print(f"\nSLQ ({args.probes} probes x {args.slq_steps} steps), gpt2-{'tiny' if args.tiny else 'mini'}, "
                  f"{args.slq_batches} batches; {n_gpu} GPU(s) shared by the actors; {device_name()}")
            print(table(rows, ["actors", "gpus_per_actor", "s", "startup_s", "speedup", "moment1"],
                        {"s": ".2f", "startup_s": ".1f", "speedup": ".2f", "moment1": ".6g"}), flush=True)
        except ImportError as e:
            print(f"SLQ over actors skipped: {e}", flush=True)
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()

"""GPT-2 124M training throughput and MFU on one GPU, rayexp against nanoGPT in the same process.

    python benchmarks/train_throughput.py [--tiny] [--modes a,b,c] [--out results.json] [--profile prof.txt]

Batch 12×1024 (nanoGPT's bench.py defaults: bias=False, dropout 0, vocab 50304, AdamW lr 1e-4,
betas (0.9, 0.95), weight decay 1e-2 on ≥2-D tensors, TF32 allowed, one fixed random batch). Modes:

    a   fp32 weights/activations (TF32 matmuls, as nanoGPT's bench sets) + naive attention
    a0  as a with TF32 off (strict fp32; rayexp's train loop leaves torch's default, which is off)
    b   bf16 autocast + sdpa attention (torch's kernel choice; --sdpa adds rows per backend)
    c   b + torch.compile

Rows per mode: nanoGPT's model + its fused AdamW + bench.py's step (the anchor, from .anchors/nanogpt,
karpathy/nanoGPT @ 3adf61e1); rayexp's GPT with torch's fused AdamW and the same step (``model.loss``
full, the default, and chunked in mode b); rayexp's GPT with ``rayexp.optim`` adamw (the zoo optimizer,
fused and per-tensor reference); and ``rayexp.train.loop.run_training`` itself (data sampling, grad
clipping, grad-norm logging, zoo adamw; tokens/s from its own last log windows; GPT-2 vocab 50257 from a
synthetic BPE, padded to 50304 by model.vocab_multiple as nanoGPT does), first with the defaults, then one
row per option: mode a adds the precise fp32 mode (attention sdpa: the memory-efficient fp32 kernel),
mode b optimizer.fused=false, model.loss=chunked and each ``--sdpa`` backend, mode c model.loss=chunked.

tokens/s = 12·1024·steps / wall time of the timed window (median of ``--windows`` windows of
``--steps`` steps after ``--warmup`` steps). MFU = (6N + 12·L·H·Q·T)·tokens/s / peak (nanoGPT's
estimate, N = non-embedding parameters), against the bf16 matmul peak measured in this run and the
datasheet peak (989 TFLOP/s bf16 dense on H100 SXM).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext

import torch

from _common import (ANCHORS, device, device_name, install_synthetic_gpt2, matmul_peak, nominal_peak, peak_memory_gib, peak_memory_reset,
                     sync, table, write_json)

from rayexp.models.gpt2 import GPT, GPTConfig

MODES = {"a": dict(dtype="fp32", attention="naive", compile=False, tf32=True),
         "a0": dict(dtype="fp32", attention="naive", compile=False, tf32=False),
         "b": dict(dtype="bf16", attention="sdpa", compile=False, tf32=True),
         "c": dict(dtype="bf16", attention="sdpa", compile=True, tf32=True)}


def size(tiny: bool) -> dict:
    if tiny:
        return dict(batch=2, block=64, n_layer=2, n_head=2, n_embd=64, vocab=512)
    return dict(batch=12, block=1024, n_layer=12, n_head=12, n_embd=768, vocab=50304)


def load_nanogpt():
    """nanoGPT's model.py from the ignored anchors folder (None if absent)."""
    path = ANCHORS / "nanogpt" / "model.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def nanogpt_model(ng, sz: dict, attention: str, dev):
    """nanoGPT's GPT; ``naive`` switches its attention to the explicit-softmax path (its non-flash code)."""
    cfg = ng.GPTConfig(block_size=sz["block"], vocab_size=sz["vocab"], n_layer=sz["n_layer"], n_head=sz["n_head"],
                       n_embd=sz["n_embd"], dropout=0.0, bias=False)
    model = ng.GPT(cfg)
    if attention == "naive":
        T = sz["block"]
        for block in model.transformer.h:
            block.attn.flash = False
            block.attn.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))
    return model.to(dev)


def rayexp_model(sz: dict, attention: str, dev, vocab: int | None = None, loss: str = "full") -> GPT:
    cfg = GPTConfig(vocab_size=vocab or sz["vocab"], block_size=sz["block"], n_layer=sz["n_layer"], n_head=sz["n_head"],
                    n_embd=sz["n_embd"], dropout=0.0, bias=False, attention=attention, loss=loss)
    return GPT(cfg).to(dev)


def fused_adamw(model, dev):
    """torch AdamW with nanoGPT's groups and settings (fused on CUDA, as nanoGPT's configure_optimizers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 1e-2},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=dev.type == "cuda")


def zoo_adamw(model, fused="auto"):
    """rayexp.optim's adamw with the same hyperparameters (``fused``: optimizer.fused)."""
    from rayexp.config import OptimizerConfig
    from rayexp.optim import build_optimizer
    return build_optimizer(model, OptimizerConfig(name="adamw", lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-2,
                                                  fused=fused))


def bench_step(model, optimizer, X, Y, ctx):
    """nanoGPT bench.py's step: forward under ctx, zero_grad, backward, step, loss.item()."""
    with ctx:
        _, loss = model(X, Y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def upcast_ce_step(model, optimizer, X, Y, ctx):
    """bench_step with the loss rayexp's GPT.forward computed before commit "gpt2: no explicit fp32
    upcast under autocast": cross-entropy of ``logits.float()`` (an fp32 copy of the (B·T, V) logits)."""
    with ctx:
        logits, _ = model(X)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), Y.view(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def loop_sync_step(model, optimizer, X, Y, ctx):
    """bench_step in run_training's order: loss.item() after backward, clip_grad_norm_(1.0).item(),
    then optimizer.step() (two host syncs before the optimizer's launches)."""
    with ctx:
        _, loss = model(X, Y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    lossf = loss.item()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0).item()
    optimizer.step()
    return lossf


def unpadded_step(vocab: int, step_fn):
    """``step_fn`` on the fixed batch taken modulo ``vocab`` (for a model with GPT-2's real vocab 50257)."""
    def step(model, optimizer, X, Y, ctx):
        return step_fn(model, optimizer, X % vocab, Y % vocab, ctx)
    return step


def loop_data_step(vocab: int, n_tokens: int = 10_000_000):
    """loop_sync_step on a fresh batch per step drawn as run_training draws it (``_step_indices`` +
    ``_batch``: 12 numpy slices of a uint16 token array, stacked, int64, copied to the GPU)."""
    import numpy as np
    from rayexp.data import TokenData
    from rayexp.train.loop import _batch, _step_indices
    toks = np.random.default_rng(0).integers(0, vocab, n_tokens).astype(np.uint16)
    data = TokenData(toks, toks, vocab, "random", "random", False)
    count = {"step": 0}

    def step(model, optimizer, X, Y, ctx):
        count["step"] += 1
        starts = _step_indices(data.count("train", X.shape[1]), X.shape[0], 0, count["step"])
        x, y = _batch(data, "train", starts, X.shape[1], X.device)
        return loop_sync_step(model, optimizer, x, y, ctx)
    return step


def measure(step, tokens_per_step: int, warmup: int, steps: int, windows: int) -> dict:
    """Warm up (compilation included), then ``windows`` timed windows of ``steps`` steps."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step()
    sync()
    warm_s = time.perf_counter() - t0
    rates = []
    for _ in range(windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync()
        rates.append(tokens_per_step * steps / (time.perf_counter() - t0))
    med = statistics.median(rates)
    return {"tok_s": med, "spread": (max(rates) - min(rates)) / med, "warmup_s": warm_s, "loss": loss,
            "rates": rates}


def run_row(name, make_model, make_opt, mode, sz, dev, args, flops_per_token, X, Y, step_fn=None):
    peak_memory_reset()
    torch.manual_seed(1337)
    model = make_model()
    opt = make_opt(model)
    if mode["compile"]:
        model = torch.compile(model)
    use_bf16 = mode["dtype"] == "bf16"
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    step_fn = step_fn or bench_step
    r = measure(lambda: step_fn(model, opt, X, Y, ctx), X.numel(), args.warmup, args.steps, args.windows)
    r.update(row=name, mem_gib=peak_memory_gib(), ms_step=1e3 * X.numel() / r["tok_s"],
             tflops=flops_per_token * r["tok_s"] / 1e12)
    del model, opt
    gc.collect()
    return r


@contextmanager
def synced_loop(on: bool):
    """run_training as it was before 2026-12-06 (``on``): each step's loss and grad norm read at once (a host sync
    a step) and batches copied from pageable memory (a stream sync a micro-batch)."""
    import rayexp.train.loop as L
    saved = L._Reading, L._batch

    class Synced(L._Reading):
        def __init__(self, values):
            super().__init__(values)
            self.get()

    def pageable(data, split, idx, block, device):
        x, y = data.batch(split, idx, block)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    if on:
        L._Reading, L._batch = Synced, pageable
    try:
        yield
    finally:
        L._Reading, L._batch = saved


def loop_variants(key: str, mode: dict, args) -> list[tuple[str, dict]]:
    """(row name, overrides of the Experiment's model/optimizer sections) of the run_training rows."""
    rows = [("rayexp run_training (defaults: fused auto, loss full, sdpa auto)", {})]
    if key in ("b", "c"):
        rows.append(("run_training, synced step (before 2026-12-06)", {"synced": True}))
    if key == "a":
        rows.append(("run_training, precise fp32: attention sdpa (efficient)", {"model": {"attention": "sdpa"}}))
    if args.defaults_only:
        return rows
    if key == "b":
        rows += [("run_training, optimizer.fused=false", {"optimizer": {"fused": False}}),
                 ("run_training, model.loss=chunked", {"model": {"loss": "chunked"}})]
        rows += [(f"run_training, sdpa_backend={b}", {"model": {"sdpa_backend": b}}) for b in args.sdpa.split(",") if b]
    if key == "c":
        rows.append(("run_training, model.loss=chunked", {"model": {"loss": "chunked"}}))
    return rows


def loop_row(name: str, overrides: dict, mode_key, mode, sz, dev, args, flops_per_token):
    """``rayexp.train.loop.run_training`` on the builtin corpus with a synthetic 50257-token BPE."""
    from rayexp.config import Experiment
    from rayexp.train.loop import run_training

    install_synthetic_gpt2(50257 if not args.tiny else 457)
    total = args.warmup + args.steps * args.windows
    preset = {} if args.tiny else {"preset": "gpt2-124m"}
    model = dict(preset or {"preset": None, "n_layer": sz["n_layer"], "n_head": sz["n_head"], "n_embd": sz["n_embd"],
                            "block_size": sz["block"]}, attention=mode["attention"], bias=False)
    exp = Experiment(name="bench", model={**model, **overrides.get("model", {})},
                     data={"corpus": "builtin", "tokenizer": "gpt2", "cache_dir": args.cache},
                     train={"steps": total, "batch_size": sz["batch"], "eval_every": 10 ** 6, "eval_batches": 1,
                            "log_every": args.steps, "warmup": 0, "precision": mode["dtype"], "clip": 1.0,
                            "compile": mode["compile"], "checkpoint_every": 10 ** 6, "log_block_grad_norms": False},
                     optimizer={"name": "adamw", "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 1e-2,
                                **overrides.get("optimizer", {})},
                     output_dir=args.cache)
    peak_memory_reset()
    t0 = time.perf_counter()
    with synced_loop(overrides.get("synced", False)):
        res = run_training(exp, workdir=f"{args.cache}/train_{mode_key}")
    rates = [h["tokens_per_s"] for h in res.history if "tokens_per_s" in h][-args.windows:]
    med = statistics.median(rates)
    return {"row": name, "tok_s": med, "rates": rates,
            "spread": (max(rates) - min(rates)) / med, "warmup_s": time.perf_counter() - t0, "loss": res.train_loss,
            "mem_gib": peak_memory_gib(), "ms_step": 1e3 * sz["batch"] * sz["block"] / med,
            "tflops": flops_per_token * med / 1e12}


def profile_rows(ng, sz, dev, X, Y, path: str) -> None:
    """torch.profiler tables (top CUDA kernels) of 3 steps, modes a and b: nanoGPT, rayexp's GPT with torch's
    fused AdamW, and with the fused zoo adamw (run_training's step without its data and clipping)."""
    from torch.profiler import ProfilerActivity, profile
    out = []
    for key in ("a", "b"):
        mode = MODES[key]
        torch.backends.cuda.matmul.allow_tf32 = mode["tf32"]
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if mode["dtype"] == "bf16" else nullcontext()
        makers = [("rayexp + torch fused AdamW", lambda: rayexp_model(sz, mode["attention"], dev),
                   lambda m: fused_adamw(m, dev)),
                  ("rayexp + fused zoo adamw", lambda: rayexp_model(sz, mode["attention"], dev),
                   lambda m: zoo_adamw(m, fused=True))]
        if ng is not None:
            makers.insert(0, ("nanogpt", lambda: nanogpt_model(ng, sz, mode["attention"], dev),
                              lambda m: fused_adamw(m, dev)))
        for name, make, make_opt in makers:
            model = make()
            opt = make_opt(model)
            for _ in range(3):
                bench_step(model, opt, X, Y, ctx)
            sync()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(3):
                    bench_step(model, opt, X, Y, ctx)
                sync()
            sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
            out.append(f"==== mode {key}: {name} (3 steps) ====\n"
                       + prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
            del model, opt
            gc.collect()
    with open(path, "w") as f:
        f.write("\n\n".join(out))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide model at batch 2×64 (CPU smoke run)")
    ap.add_argument("--modes", default="a,a0,b,c")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--no-loop", action="store_true", help="skip the run_training rows")
    ap.add_argument("--diagnose", action="store_true",
                    help="modes b/c: extra rows isolating the old fp32 loss upcast and run_training's host syncs")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each mode's rows this many times, alternating their order (cancels order/clock "
                         "drift); tok/s is the mean over rounds, spread the range over all windows")
    ap.add_argument("--defaults-only", action="store_true", help="run_training rows: only the defaults (and mode a's precise fp32 row)")
    ap.add_argument("--no-zoo", action="store_true", help="skip the rayexp.optim adamw rows")
    ap.add_argument("--sdpa", default="flash,cudnn",
                    help="mode b: one run_training row per model.sdpa_backend listed (auto is the default row)")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    ap.add_argument("--profile", default=None, help="write profiler tables (modes a, b) here")
    ap.add_argument("--cache", default="/tmp/rayexp_bench", help="token cache / workdir of the loop rows")
    args = ap.parse_args(argv)

    dev = device()
    sz = size(args.tiny)
    torch.manual_seed(1337)
    X = torch.randint(sz["vocab"], (sz["batch"], sz["block"]), device=dev)
    Y = torch.randint(sz["vocab"], (sz["batch"], sz["block"]), device=dev)
    ng = load_nanogpt()
    peak = matmul_peak(torch.bfloat16)
    peak_tf32 = matmul_peak(torch.float32, tf32=True)
    nominal = nominal_peak("bf16")
    probe = rayexp_model(sz, "sdpa", "cpu")
    fpt = probe.flops_per_token(sz["block"])
    del probe
    print(f"device: {device_name()}\nmeasured matmul peak: bf16 {peak / 1e12:.0f} TFLOP/s, tf32 {peak_tf32 / 1e12:.0f} "
          f"TFLOP/s; nominal bf16 {nominal / 1e12:.0f}\nFLOPs/token {fpt / 1e6:.1f} M; nanoGPT anchor: "
          f"{'yes' if ng else 'MISSING (.anchors/nanogpt/model.py)'}", flush=True)

    rows = []
    for key in args.modes.split(","):
        mode = MODES[key]
        torch.backends.cuda.matmul.allow_tf32 = mode["tf32"]
        torch.backends.cudnn.allow_tf32 = mode["tf32"]
        label = f"{key}: {mode['dtype']}{'+tf32' if mode['tf32'] and mode['dtype'] == 'fp32' else ''} " \
                f"{mode['attention']}{' compile' if mode['compile'] else ''}"
        specs = []
        if ng is not None:
            specs.append(("nanoGPT (fused AdamW)", lambda: nanogpt_model(ng, sz, mode["attention"], dev),
                          lambda m: m.configure_optimizers(1e-2, 1e-4, (0.9, 0.95), dev.type)))
        specs.append(("rayexp GPT + torch fused AdamW", lambda: rayexp_model(sz, mode["attention"], dev),
                      lambda m: fused_adamw(m, dev)))
        if key == "b":
            specs.append(("rayexp GPT loss=chunked + torch fused AdamW",
                          lambda: rayexp_model(sz, mode["attention"], dev, loss="chunked"), lambda m: fused_adamw(m, dev)))
        if not args.no_zoo and key != "a0":  # a0 only contrasts TF32 on/off
            specs.append(("rayexp GPT + zoo adamw, fused step", lambda: rayexp_model(sz, mode["attention"], dev),
                          lambda m: zoo_adamw(m, fused=True)))
            if key != "c":  # the per-tensor reference is measured eagerly (a, b); c is compile time
                specs.append(("rayexp GPT + zoo adamw, per-tensor step",
                              lambda: rayexp_model(sz, mode["attention"], dev), lambda m: zoo_adamw(m, fused=False)))
        if args.diagnose and key in ("b", "c"):
            mk = lambda: rayexp_model(sz, mode["attention"], dev)  # noqa: E731
            specs += [("rayexp GPT, explicit fp32 logits (old)", mk, lambda m: fused_adamw(m, dev), upcast_ce_step),
                      ("rayexp GPT + fused AdamW + loop syncs", mk, lambda m: fused_adamw(m, dev), loop_sync_step),
                      ("rayexp GPT + zoo adamw + loop syncs", mk, zoo_adamw, loop_sync_step)]
            # rows with GPT-2's unpadded vocab (50257): what run_training ran before model.vocab_multiple
            v = 50257 if not args.tiny else 500
            mk57 = lambda: rayexp_model(sz, mode["attention"], dev, vocab=v)  # noqa: E731
            specs += [(f"rayexp GPT vocab {v} + fused AdamW", mk57, lambda m: fused_adamw(m, dev),
                       unpadded_step(v, bench_step)),
                      (f"vocab {v} + zoo adamw + loop syncs", mk57, zoo_adamw, unpadded_step(v, loop_sync_step)),
                      (f"vocab {v} + zoo adamw + loop syncs + loop data", mk57, zoo_adamw, loop_data_step(v))]
        base = None
        got: dict[str, list[dict]] = {}
        for rnd in range(args.rounds):
            for name, mk_model, mk_opt, *step_fn in (specs if rnd % 2 == 0 else specs[::-1]):
                try:
                    r = run_row(name, mk_model, mk_opt, mode, sz, dev, args, fpt, X, Y, *step_fn)
                except Exception as e:  # report and go on: one failed row must not lose the others
                    print(f"  {name}: FAILED {type(e).__name__}: {e}", flush=True)
                    continue
                got.setdefault(name, []).append(r)
                print(f"  {label:22s} {name:38s} round {rnd} {r['tok_s']:10.0f} tok/s", flush=True)
        for name, rs in got.items():
            r = dict(rs[0])
            r["tok_s"] = statistics.mean(x["tok_s"] for x in rs)
            rates = [v for x in rs for v in x["rates"]]
            r.update(spread=(max(rates) - min(rates)) / r["tok_s"], rates=rates, rounds=len(rs), ms_step=1e3 * X.numel() / r["tok_s"],
                     tflops=fpt * r["tok_s"] / 1e12, mem_gib=max(x["mem_gib"] for x in rs))
            rows.append({"mode": label, **r})
        for name, overrides in ([] if args.no_loop or key == "a0" else loop_variants(key, mode, args)):
            try:
                r = loop_row(name, overrides, key, mode, sz, dev, args, fpt)
                rows.append({"mode": label, **r})
                print(f"  {label:22s} {r['row']:38s} {r['tok_s']:10.0f} tok/s", flush=True)
            except Exception as e:  # one failed row must not lose the others
                print(f"  {name}: FAILED {type(e).__name__}: {e}", flush=True)
        for r in rows:
            if r["mode"] == label and r["row"].startswith("nanoGPT"):
                base = r["tok_s"]
        for r in rows:
            if r["mode"] == label:
                r["vs_nanogpt"] = r["tok_s"] / base if base else float("nan")
                r["mfu_measured"] = 100 * r["tflops"] * 1e12 / peak
                r["mfu_nominal"] = 100 * r["tflops"] * 1e12 / nominal
                r["mfu_tf32_measured"] = 100 * r["tflops"] * 1e12 / peak_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        write_json(args.out, {"rows": rows, "partial": True, "argv": sys.argv})  # kept if a later mode fails

    cols = ["mode", "row", "tok_s", "ms_step", "vs_nanogpt", "mfu_measured", "mfu_nominal", "spread", "mem_gib",
            "warmup_s"]
    print(f"\nGPT-2 {'tiny' if args.tiny else '124M'}, batch {sz['batch']}x{sz['block']}, {device_name()}; "
          f"MFU % vs measured bf16 peak {peak / 1e12:.0f} TFLOP/s (mfu_measured) and nominal "
          f"{nominal / 1e12:.0f} (mfu_nominal); mode a also vs measured TF32 peak {peak_tf32 / 1e12:.0f}: "
          + ", ".join(f"{r['row'][:12]} {r['mfu_tf32_measured']:.1f}%" for r in rows if r["mode"].startswith("a:")))
    print(table(rows, cols, {"tok_s": ".0f", "ms_step": ".1f", "vs_nanogpt": ".3f", "mfu_measured": ".1f",
                             "mfu_nominal": ".1f", "spread": ".3f", "mem_gib": ".1f", "warmup_s": ".1f"}))
    write_json(args.out, {"rows": rows, "peak_bf16": peak, "peak_tf32": peak_tf32, "nominal_bf16": nominal,
                          "flops_per_token": fpt, "size": sz, "argv": sys.argv})
    if args.profile:
        torch.backends.cuda.matmul.allow_tf32 = True
        profile_rows(ng, sz, dev, X, Y, args.profile)
        print(f"profile tables: {args.profile}")
    return rows


if __name__ == "__main__":
    main()

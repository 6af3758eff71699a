"""Shared helpers of the benchmark scripts: device facts, the measured matmul peak, timing, tables.

Anchors (nanoGPT's model, PyHessian) live in the git-ignored ``.anchors/`` folder; carried wheels in
``.whl/``. Nothing here is imported by the ``rayexp`` package.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = ROOT / ".anchors"
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

# Nominal dense peaks (datasheet, SXM parts), FLOP/s: only a lead; MFU is reported against the measured peak too.
NOMINAL_PEAK = {"H100": {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12},
                "H200": {"bf16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def nominal_peak(kind: str = "bf16") -> float:
    """Datasheet peak of the visible GPU for ``kind`` (bf16 | tf32 | fp32); NaN when unknown or CPU."""
    if not torch.cuda.is_available():
        return float("nan")
    name = torch.cuda.get_device_name(0)
    for key, peaks in NOMINAL_PEAK.items():
        if key in name:
            return peaks[kind]
    return float("nan")


def matmul_peak(dtype=torch.bfloat16, n: int = 8192, reps: int = 20, tf32: bool = False) -> float:
    """Measured FLOP/s of an n×n×n matrix product on random data (median of ``reps``, after warm-up).

    2n³ FLOPs per product; CUDA events around each product. On CPU a 512³ product (a sanity number)."""
    dev = device()
    if dev.type == "cpu":
        n, reps = 512, 3
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        times = time_fn(lambda: a @ b, warmup=3, reps=reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n ** 3 / statistics.median(times)


def time_fn(fn, warmup: int = 3, reps: int = 10) -> list[float]:
    """Seconds per call of ``fn`` (device-synchronized), ``reps`` samples after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def peak_memory_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def table(rows: list[dict], cols: list[str], fmt: dict | None = None) -> str:
    """A markdown table of ``rows`` (dicts) over ``cols``; ``fmt`` maps a column to a format spec."""
    fmt = fmt or {}

    def cell(r, c):
        v = r.get(c, "")
        if isinstance(v, float):
            return "n/a" if v != v else format(v, fmt.get(c, ".4g"))
        return str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    """Write ``payload`` (plus the device line) to ``path`` when given."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"device": device_name(), **payload}, indent=1, default=str))


def install_synthetic_gpt2(n_vocab: int = 50257) -> None:
    """Register a synthetic ``gpt2`` encoding with tiktoken-shaped vocab ``n_vocab`` (no download):
    the 256 bytes plus ``n_vocab - 257`` byte pairs (each one merge of two bytes: a valid BPE) plus EOT.
    Lets ``run_training`` use data.tokenizer=gpt2 (GPT-2's vocab size, so GPT-2's FLOPs) offline."""
    import tiktoken
    from rayexp.data import use_encoding
    n_merge = n_vocab - 257
    ranks = {bytes([i]): i for i in range(256)}
    for k in range(n_merge):
        ranks[bytes([k // 256, k % 256])] = 256 + k
    enc = tiktoken.Encoding("synthetic-gpt2", pat_str=r"""\S+|\s+""", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 256 + n_merge})
    use_encoding("gpt2", enc)

"""Random probe vectors keyed by (seed, kind, index), so a probe is the same whichever process draws it.

A d-vector is drawn in fixed chunks of ``CHUNK`` entries, chunk c from its own ``torch.Generator`` on the
operator's device, seeded by a hash of ``(seed, kind, index, c)``: a process that holds only the span
``[lo, hi)`` of every vector (parameter sharding) draws just the chunks it needs and gets exactly the
entries of the whole vector. Results therefore depend neither on the number of actors nor on the sharding
(CPU and CUDA generators are different streams: a GPU run draws other probes than a CPU run of one seed).
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch

CHUNK = 1 << 20
DISTS = ("rademacher", "gaussian", "cauchy")


def generator(seed: int, kind: str, index: int, device="cpu") -> torch.Generator:
    """A generator on ``device`` seeded by sha256("seed:kind:index")."""
    digest = hashlib.sha256(f"{seed}:{kind}:{index}".encode()).hexdigest()
    return torch.Generator(device=device).manual_seed(int(digest[:15], 16))


def _draw(n: int, dist: str, g: torch.Generator) -> torch.Tensor:
    kw = dict(generator=g, device=g.device)
    if dist == "rademacher":
        return torch.randint(0, 2, (n,), dtype=torch.int8, **kw).to(torch.float64) * 2 - 1
    if dist == "gaussian":
        return torch.randn(n, dtype=torch.float64, **kw)
    if dist == "cauchy":
        return torch.tan(math.pi * (torch.rand(n, dtype=torch.float64, **kw) - 0.5))
    raise ValueError(f"unknown probe distribution {dist!r}; allowed: {', '.join(DISTS)}")


def probe(d: int, dist: str, seed: int, index: int, kind: str = "probe", span: Optional[slice] = None,
          device=None) -> torch.Tensor:
    """Entries ``span`` (default all) of probe ``index`` of length d: ``rademacher`` (±1), ``gaussian``
    (N(0, 1)) or ``cauchy`` (standard Cauchy, tan(π(U − ½))); float64, drawn on ``device`` (default CPU)."""
    lo, hi = (0, d) if span is None else (span.start, span.stop)
    device = torch.device(device or "cpu")
    parts = []
    for c in range(lo // CHUNK, (hi - 1) // CHUNK + 1 if hi > lo else lo // CHUNK):
        start, stop = c * CHUNK, min((c + 1) * CHUNK, d)
        x = _draw(stop - start, dist, generator(seed, f"{kind}/{dist}", index * 1_000_003 + c, device))
        parts.append(x[max(lo, start) - start:min(hi, stop) - start])
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)

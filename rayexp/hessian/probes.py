"""Random probe vectors keyed by (seed, kind, index), so a probe is the same whichever process draws it.

A d-vector is drawn in fixed chunks of ``CHUNK`` entries, chunk c from its own CPU ``torch.Generator``
seeded by a hash of ``(seed, kind, index, c)``: a process that holds only the span ``[lo, hi)`` of every
vector (parameter sharding) draws just the chunks it needs and gets exactly the entries of the whole
vector. Results therefore depend neither on the number of actors nor on the sharding.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch

CHUNK = 1 << 20
DISTS = ("rademacher", "gaussian", "cauchy")


def generator(seed: int, kind: str, index: int) -> torch.Generator:
    """A CPU generator seeded by sha256("seed:kind:index")."""
    digest = hashlib.sha256(f"{seed}:{kind}:{index}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def _draw(n: int, dist: str, g: torch.Generator) -> torch.Tensor:
    if dist == "rademacher":
        return torch.randint(0, 2, (n,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    if dist == "gaussian":
        return torch.randn(n, generator=g, dtype=torch.float64)
    if dist == "cauchy":
        return torch.tan(math.pi * (torch.rand(n, generator=g, dtype=torch.float64) - 0.5))
    raise ValueError(f"unknown probe distribution {dist!r}; allowed: {', '.join(DISTS)}")


def probe(d: int, dist: str, seed: int, index: int, kind: str = "probe", span: Optional[slice] = None,
          device=None) -> torch.Tensor:
    """Entries ``span`` (default all) of probe ``index`` of length d: ``rademacher`` (±1), ``gaussian``
    (N(0, 1)) or ``cauchy`` (standard Cauchy, tan(π(U − ½))); float64."""
    lo, hi = (0, d) if span is None else (span.start, span.stop)
    parts = []
    for c in range(lo // CHUNK, (hi - 1) // CHUNK + 1 if hi > lo else lo // CHUNK):
        start, stop = c * CHUNK, min((c + 1) * CHUNK, d)
        x = _draw(stop - start, dist, generator(seed, f"{kind}/{dist}", index * 1_000_003 + c))
        parts.append(x[max(lo, start) - start:min(hi, stop) - start])
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return out.to(device) if device is not None else out

"""Random probe vectors keyed by (seed, kind, index), so a probe is the same whichever actor draws it.

Every probe is drawn on the CPU in float64 from its own ``torch.Generator`` whose seed is a hash of
``(seed, kind, index)``; results therefore do not depend on how probes are split across actors.
"""
from __future__ import annotations

import hashlib
import math

import torch


def generator(seed: int, kind: str, index: int) -> torch.Generator:
    """A CPU generator seeded by sha256("seed:kind:index")."""
    digest = hashlib.sha256(f"{seed}:{kind}:{index}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def probe(d: int, dist: str, seed: int, index: int, kind: str = "probe") -> torch.Tensor:
    """Probe ``index``: ``rademacher`` (±1), ``gaussian`` (N(0, 1)), ``sphere`` (Gaussian / its norm) or
    ``cauchy`` (i.i.d. standard Cauchy, tan(π(U − ½))); float64 on the CPU."""
    g = generator(seed, f"{kind}/{dist}", index)
    if dist == "rademacher":
        return torch.randint(0, 2, (d,), generator=g, dtype=torch.int64).to(torch.float64) * 2 - 1
    if dist in ("gaussian", "sphere"):
        v = torch.randn(d, generator=g, dtype=torch.float64)
        return v / v.norm() if dist == "sphere" else v
    if dist == "cauchy":
        u = torch.rand(d, generator=g, dtype=torch.float64)
        return torch.tan(math.pi * (u - 0.5))
    raise ValueError(f"unknown probe distribution {dist!r}; allowed: rademacher, gaussian, sphere, cauchy")

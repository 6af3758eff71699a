"""Rotations: run any optimizer of the zoo in a rotated basis (docs/methods.md, "Rotations").

We implement *Adam in a rotated basis* (equivalently the rotated-loss form of arXiv 2410.08198 Sec. 5,
optimizing φ = R(θ) with L(R⁻¹φ), since R is orthogonal): at every step the gradient is rotated,
the base optimizer's state and update live in the rotated coordinates, and the update is rotated back:

    G̃ = R(G),   D̃ = base_update(G̃, state),   θ ← θ − lr · R⁻¹(D̃).

For a matrix W (m×n; tensors with more dims are viewed as (shape[0], rest)) R(X) = U X Vᵀ and
R⁻¹(X) = Uᵀ X V, with U (m×m), V (n×n) orthogonal: a Kronecker rotation of vec(W). Vectors are rotated
one-sided (R(x) = U x), scalars not at all. Kinds:

- ``per_tensor``: U, V Haar-random (QR of a Gaussian with the signs of diag(R) moved into Q), drawn once
  from a torch.Generator seeded by (rotation.seed, parameter index, side): reproducible.
- ``global``: one Haar Q (d×d) over the concatenation of all d parameters (memory d²; d ≤ 20,000).
- ``eigenbasis``: SOAP-like (Vyas et al. 2024): L ← ema·L + (1−ema)·G Gᵀ and Rs ← ema·Rs + (1−ema)·Gᵀ G,
  U = eigenvectors(L)ᵀ, V = eigenvectors(Rs)ᵀ, refreshed at step 1 and every ``update_every`` steps.
  When the basis changes, the optimizer's *linear* state (momentum / first moments, which transform like
  the gradient) is re-projected into the new basis, X̃ ← R_new(R_old⁻¹(X̃)); second moments are not
  (as in SOAP). With this, eigenbasis-SGD is exactly SGD.

A side longer than ``rotation.max_dim`` stays unrotated (identity) under per_tensor/eigenbasis.
Every kind is an orthogonal map of the full parameter vector, so SGD (with momentum, Nesterov, L2)
is unchanged while Adam's coordinate-wise normalisation changes.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch

from rayexp.config import ConfigError, RotationConfig

GLOBAL_MAX_DIM = 20_000


def haar_orthogonal(n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A Haar-distributed n×n orthogonal matrix: Q of QR(A), A Gaussian, with Q·diag(sign(diag R))."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d.unsqueeze(0)).to(dtype)


def seeded_generator(seed: int, index: int | str, side: str) -> torch.Generator:
    """A CPU generator whose seed is a hash of (rotation.seed, parameter index, side)."""
    digest = hashlib.sha256(f"{seed}:{index}:{side}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def matrix_sides(shape: torch.Size, max_dim: int) -> tuple[Optional[int], Optional[int]]:
    """(m, n) sizes of U and V for a tensor of this shape (None: that side is not rotated)."""
    if len(shape) == 0:
        return None, None
    m = shape[0]
    n = math.prod(shape[1:]) if len(shape) >= 2 else None
    return (m if m <= max_dim else None), (n if n is not None and n <= max_dim else None)


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(-1, 1)


def apply_rotation(x: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor]) -> torch.Tensor:
    """R(X) = U X Vᵀ (vectors: U x), on X viewed as a matrix, returned in x's shape."""
    if u is None and v is None:
        return x
    a = _as_matrix(x)
    if u is not None:
        a = u.to(a) @ a
    if v is not None:
        a = a @ v.to(a).T
    return a.reshape(x.shape)


def apply_inverse(x: torch.Tensor, u: Optional[torch.Tensor], v: Optional[torch.Tensor]) -> torch.Tensor:
    """R⁻¹(X) = Uᵀ X V (vectors: Uᵀ x)."""
    if u is None and v is None:
        return x
    a = _as_matrix(x)
    if u is not None:
        a = u.to(a).T @ a
    if v is not None:
        a = a @ v.to(a)
    return a.reshape(x.shape)


def rotation_memory(shapes: list[torch.Size], cfg: RotationConfig, bytes_per: int = 4) -> int:
    """Bytes the rotation holds for parameters of these shapes (eigenbasis: bases plus EMA statistics)."""
    if cfg.kind == "none":
        return 0
    if cfg.kind == "global":
        d = sum(math.prod(s) for s in shapes)
        return d * d * bytes_per
    total = 0
    for s in shapes:
        m, n = matrix_sides(s, cfg.max_dim)
        total += sum(k * k for k in (m, n) if k is not None)
    return total * bytes_per * (2 if cfg.kind == "eigenbasis" else 1)


class Rotation:
    """The rotation of one optimizer: maps gradients into the rotated basis and updates back.

    Parameters are addressed by their index in the optimizer's flat parameter list. per_tensor and
    global matrices are regenerated from the seed (not saved); eigenbasis bases and statistics live in
    the optimizer's per-parameter state (keys ``rot_u``, ``rot_v``, ``eig_l``, ``eig_r``) and so go into
    its state_dict.
    """

    def __init__(self, params: list[torch.Tensor], cfg: RotationConfig):
        self.cfg, self.kind = cfg, cfg.kind
        self.shapes = [p.shape for p in params]
        self.bytes = rotation_memory(self.shapes, cfg, params[0].element_size() if params else 4)
        self.mats: list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        self.q: Optional[torch.Tensor] = None
        if self.kind == "global":
            d = sum(p.numel() for p in params)
            if d > GLOBAL_MAX_DIM:
                raise ConfigError(f"rotation.kind: 'global' needs a {d}x{d} matrix ({d * d * 4 / 2**30:.1f} GiB "
                                  f"fp32) for {d} parameters; allowed only up to {GLOBAL_MAX_DIM} parameters; "
                                  f"use per_tensor or eigenbasis")
            dev, dt = params[0].device, params[0].dtype
            self.q = haar_orthogonal(d, seeded_generator(cfg.seed, "global", "q")).to(dev, dt)
        elif self.kind == "per_tensor":
            for i, p in enumerate(params):
                m, n = matrix_sides(p.shape, cfg.max_dim)
                u = haar_orthogonal(m, seeded_generator(cfg.seed, i, "u")).to(p.device, p.dtype) if m else None
                v = haar_orthogonal(n, seeded_generator(cfg.seed, i, "v")).to(p.device, p.dtype) if n else None
                self.mats.append((u, v))

    def memory_bytes(self) -> int:
        """Bytes held by the rotation (matrices, and for eigenbasis the EMA statistics)."""
        return self.bytes

    # -- per-parameter maps ---------------------------------------------------------------------
    def _uv(self, i: int, state: dict):
        if self.kind == "per_tensor":
            return self.mats[i]
        if self.kind == "eigenbasis":
            return state.get("rot_u"), state.get("rot_v")
        return None, None

    def rotate(self, indices: list[int], xs: list[torch.Tensor], states: list[dict]) -> list[torch.Tensor]:
        """R applied to each tensor (global: to their concatenation)."""
        if self.kind == "none":
            return xs
        if self.kind == "global":
            flat = torch.cat([x.reshape(-1) for x in xs])
            return self._split(self.q.to(flat) @ flat, xs)
        return [apply_rotation(x, *self._uv(i, st)) for i, x, st in zip(indices, xs, states)]

    def unrotate(self, indices: list[int], xs: list[torch.Tensor], states: list[dict]) -> list[torch.Tensor]:
        """R⁻¹ applied to each tensor (global: to their concatenation)."""
        if self.kind == "none":
            return xs
        if self.kind == "global":
            flat = torch.cat([x.reshape(-1) for x in xs])
            return self._split(self.q.to(flat).T @ flat, xs)
        return [apply_inverse(x, *self._uv(i, st)) for i, x, st in zip(indices, xs, states)]

    @staticmethod
    def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
        out, k = [], 0
        for x in like:
            out.append(flat[k:k + x.numel()].reshape(x.shape))
            k += x.numel()
        return out

    # -- eigenbasis -------------------------------------------------------------------------------
    def accumulate(self, grads: list[torch.Tensor], states: list[dict]) -> None:
        """EMA statistics L ← ema·L + (1−ema)·G Gᵀ, Rs ← ema·Rs + (1−ema)·Gᵀ G (eigenbasis only)."""
        if self.kind != "eigenbasis":
            return
        b = self.cfg.ema
        for g, st in zip(grads, states):
            m, n = matrix_sides(g.shape, self.cfg.max_dim)
            a = _as_matrix(g)
            if m:
                st["eig_l"] = st["eig_l"].mul_(b).add_(a @ a.T, alpha=1 - b) if "eig_l" in st else (1 - b) * (a @ a.T)
            if n:
                st["eig_r"] = st["eig_r"].mul_(b).add_(a.T @ a, alpha=1 - b) if "eig_r" in st else (1 - b) * (a.T @ a)

    def due(self, t: int) -> bool:
        """Whether the eigenbasis is recomputed at step t (t = 1, 1 + k, 1 + 2k, ...)."""
        return self.kind == "eigenbasis" and (t - 1) % self.cfg.update_every == 0

    def refresh(self, states: list[dict], linear_keys: tuple[str, ...]) -> None:
        """New bases from the statistics' eigenvectors; re-project the linear state into them."""
        for st in states:
            old = (st.get("rot_u"), st.get("rot_v"))
            new = tuple(torch.linalg.eigh(st[k].double())[1].T.to(st[k].dtype) if k in st else None
                        for k in ("eig_l", "eig_r"))
            for key in linear_keys:
                if key in st and torch.is_tensor(st[key]) and st[key].dim() > 0:
                    st[key] = apply_rotation(apply_inverse(st[key], *old), *new)
            for key, mat in zip(("rot_u", "rot_v"), new):
                if mat is not None:
                    st[key] = mat

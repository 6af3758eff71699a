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

- ``randperm`` (seed 000's ``randperm_k``): the flat parameter vector (``named_parameters`` order) is split
  into two groups, the ``c_proj.weight`` tensors and all the others (embeddings included); with F the
  seed's map of a group vector x, k = ``rotation.rounds`` times: x ← x[π_i], then x (viewed as an a×b×c
  array) ← x ×₁ Q₁ ×₂ Q₂ ×₃ Q₃ (three Haar factors of sizes a, b, c), the gradient rotation is R = Fᵀ
  (the seed trains φ with θ = F φ, so ∇_φ = Fᵀ ∇_θ). Memory: k int32 permutations of d entries and
  k·(a² + b² + c²) floats per group; no d×d matrix. See ``three_factors`` for sizes without a good
  factorization.

A side longer than ``rotation.max_dim`` stays unrotated (identity) under per_tensor/eigenbasis, and
``rotation.scope`` keeps only the output side (U) or only the input side (V). Every kind is an orthogonal
map of the full parameter vector, so SGD (with momentum, Nesterov, L2) is unchanged while Adam's
coordinate-wise normalisation changes.

Parameters are indexed by their position in ``model.named_parameters()`` (``build_optimizer`` passes that
order, whatever the param groups), the same order the Hessian engine flattens them in;
``training_rotation`` gives R and Rᵀ on flat vectors in that order (docs/methods.md, "Rotations").
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch

from rayexp.config import ConfigError, RotationConfig

GLOBAL_MAX_DIM = 20_000
MIXING = ("global", "randperm")  # kinds that rotate the concatenation of tensors, not each tensor
RANDPERM_SECOND_GROUP = "c_proj.weight"  # seed 000's _make_vecs: names ending so form the second group
FACTOR_SLACK = 4  # three_factors: an exact factorization is used while its largest factor ≤ 4·⌈n^(1/3)⌉


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


def matrix_sides(shape: torch.Size, max_dim: int, scope: str = "both") -> tuple[Optional[int], Optional[int]]:
    """(m, n) sizes of U and V for a tensor of this shape (None: that side is not rotated); ``scope``
    ``output`` keeps only U (vectors too), ``input`` only V (vectors get none)."""
    if len(shape) == 0:
        return None, None
    m = shape[0]
    n = math.prod(shape[1:]) if len(shape) >= 2 else None
    m, n = (m if m <= max_dim else None), (n if n is not None and n <= max_dim else None)
    return (None if scope == "input" else m), (None if scope == "output" else n)


def three_factors(n: int) -> tuple[int, int, int]:
    """(a, b, c) with a·b·c ≤ n for the three-factor rotation of a group of n coordinates.

    The exact factorization a ≤ b ≤ c of n with the smallest c, if c ≤ FACTOR_SLACK·⌈n^(1/3)⌉; otherwise
    a = b = ⌊n^(1/3)⌋, c = ⌊n/a²⌋, and the last n − a·b·c (< 3a² + 1) coordinates of the permuted vector are
    left out of that round's rotation (the next round's permutation mixes them in).
    """
    q = max(1, round(n ** (1 / 3)))
    while q ** 3 > n:
        q -= 1
    while (q + 1) ** 3 <= n:
        q += 1
    best = None
    for a in range(1, q + 1):
        if n % a:
            continue
        for b in range(a, math.isqrt(n // a) + 1):
            if (n // a) % b == 0 and (best is None or n // (a * b) < best[2]):
                best = (a, b, n // (a * b))
    if best is not None and best[2] <= FACTOR_SLACK * (q + 1):
        return best
    return q, q, n // (q * q)


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


def randperm_groups(names: list[str]) -> list[list[int]]:
    """Seed 000's two groups of parameter indices: all but the c_proj weights, then the c_proj weights
    (an empty group is dropped)."""
    second = [i for i, n in enumerate(names) if n.endswith(RANDPERM_SECOND_GROUP)]
    first = [i for i in range(len(names)) if i not in set(second)]
    return [g for g in (first, second) if g]


def group_factors(sizes: list[int], cfg: RotationConfig) -> list[tuple[int, int, int]]:
    """The three factor sizes of each randperm group: ``rotation.factors`` (checked) or ``three_factors``."""
    if cfg.factors is None:
        return [three_factors(n) for n in sizes]
    if len(cfg.factors) != len(sizes) or any(math.prod(f) != n for f, n in zip(cfg.factors, sizes)):
        raise ConfigError(f"rotation.factors: {cfg.factors} must give, for each group, three integers whose "
                          f"product is its size; the group sizes here are {sizes}")
    return [tuple(f) for f in cfg.factors]


def rotation_memory(shapes: list[torch.Size], cfg: RotationConfig, bytes_per: int = 4,
                    names: Optional[list[str]] = None) -> int:
    """Bytes the rotation holds for parameters of these shapes (eigenbasis: bases plus EMA statistics;
    randperm: int32 permutations and float64 factors)."""
    if cfg.kind == "none":
        return 0
    if cfg.kind == "global":
        d = sum(math.prod(s) for s in shapes)
        return d * d * bytes_per
    if cfg.kind == "randperm":
        groups = randperm_groups(names or [str(i) for i in range(len(shapes))])
        sizes = [sum(math.prod(shapes[i]) for i in g) for g in groups]
        facs = group_factors(sizes, cfg)
        return cfg.rounds * sum(4 * n + 8 * sum(k * k for k in f) for n, f in zip(sizes, facs))
    total = 0
    for s in shapes:
        m, n = matrix_sides(s, cfg.max_dim, cfg.scope)
        total += sum(k * k for k in (m, n) if k is not None)
    return total * bytes_per * (2 if cfg.kind == "eigenbasis" else 1)


def mode_product(x: torch.Tensor, qs: list[torch.Tensor], transpose: bool) -> torch.Tensor:
    """x (a·b·c entries, viewed as a×b×c) ×₁ Q₁ ×₂ Q₂ ×₃ Q₃, i.e. (Q₁ ⊗ Q₂ ⊗ Q₃) x in row-major order
    (Qᵢᵀ when ``transpose``); three matmuls, no Kronecker matrix."""
    q1, q2, q3 = (q.to(x).T if transpose else q.to(x) for q in qs)
    a, b, c = q1.shape[0], q2.shape[0], q3.shape[0]
    y = (q1 @ x.reshape(a, b * c)).reshape(a, b, c)
    return (torch.matmul(q2, y) @ q3.T).reshape(-1)


class RandPerm:
    """Seed 000's map F of one group vector: ``rounds`` times x ← x[π_i], then the prefix of a·b·c entries
    ← (Q₁ ⊗ Q₂ ⊗ Q₃) prefix. ``forward`` is F, ``backward`` Fᵀ (π and Q drawn from seeded generators)."""

    def __init__(self, n: int, factors: tuple[int, int, int], cfg: RotationConfig, group: int, device):
        self.n, self.m = n, math.prod(factors)
        index_dtype = torch.int32 if n < 2 ** 31 else torch.int64
        self.perms, self.qs = [], []
        for i in range(cfg.rounds):
            gen = seeded_generator(cfg.seed, f"randperm{group}.{i}", "perm")
            self.perms.append(torch.randperm(n, generator=gen).to(index_dtype).to(device))
            self.qs.append([haar_orthogonal(k, seeded_generator(cfg.seed, f"randperm{group}.{i}", f"q{j}")).to(device)
                            for j, k in enumerate(factors)])

    def _rotate_prefix(self, x: torch.Tensor, qs: list, transpose: bool) -> torch.Tensor:
        if self.m == self.n:
            return mode_product(x, qs, transpose)
        return torch.cat([mode_product(x[:self.m], qs, transpose), x[self.m:]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F x (seed: rotations.py forward_impl)."""
        for perm, qs in zip(self.perms, self.qs):
            x = self._rotate_prefix(x[perm], qs, False)
        return x

    def backward(self, x: torch.Tensor) -> torch.Tensor:
        """Fᵀ x (seed: rotations.py backward_impl): per round in reverse, Qᵀ then the inverse permutation."""
        for perm, qs in zip(reversed(self.perms), reversed(self.qs)):
            y = self._rotate_prefix(x, qs, True)
            x = torch.empty_like(y)
            x[perm] = y
        return x


class Rotation:
    """The rotation of one optimizer: maps gradients into the rotated basis and updates back.

    Parameters are addressed by their index in ``params`` (``named_parameters`` order under
    ``build_optimizer``; ``names`` pick randperm's groups). per_tensor, global and randperm matrices are
    regenerated from the seed (not saved), in ``dtype`` (default: the parameters'; randperm factors are
    float64); eigenbasis bases and statistics live in the optimizer's per-parameter state (keys ``rot_u``,
    ``rot_v``, ``eig_l``, ``eig_r``) and so go into its state_dict.
    """

    def __init__(self, params: list[torch.Tensor], cfg: RotationConfig, names: Optional[list[str]] = None,
                 dtype: Optional[torch.dtype] = None):
        self.cfg, self.kind = cfg, cfg.kind
        self.mixes = cfg.kind in MIXING
        self.shapes = [p.shape for p in params]
        self.names = list(names) if names is not None else [str(i) for i in range(len(params))]
        self.bytes = rotation_memory(self.shapes, cfg, params[0].element_size() if params else 4, self.names)
        self.mats: list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = []
        self.q: Optional[torch.Tensor] = None
        self.groups: list[list[int]] = []
        self.randperms: list[RandPerm] = []
        if not params:
            return
        dev, dt = params[0].device, dtype or params[0].dtype
        if self.kind == "global":
            d = sum(p.numel() for p in params)
            if d > GLOBAL_MAX_DIM:
                raise ConfigError(f"rotation.kind: 'global' needs a {d}x{d} matrix ({d * d * 4 / 2**30:.1f} GiB "
                                  f"fp32) for {d} parameters; allowed only up to {GLOBAL_MAX_DIM} parameters; "
                                  f"use randperm, per_tensor or eigenbasis")
            self.q = haar_orthogonal(d, seeded_generator(cfg.seed, "global", "q")).to(dev, dt)
        elif self.kind == "per_tensor":
            for i, p in enumerate(params):
                m, n = matrix_sides(p.shape, cfg.max_dim, cfg.scope)
                u = haar_orthogonal(m, seeded_generator(cfg.seed, i, "u")).to(p.device, dt) if m else None
                v = haar_orthogonal(n, seeded_generator(cfg.seed, i, "v")).to(p.device, dt) if n else None
                self.mats.append((u, v))
        elif self.kind == "randperm":
            self.groups = randperm_groups(self.names)
            sizes = [sum(params[i].numel() for i in g) for g in self.groups]
            self.randperms = [RandPerm(n, f, cfg, j, dev)
                              for j, (n, f) in enumerate(zip(sizes, group_factors(sizes, cfg)))]

    def memory_bytes(self) -> int:
        """Bytes held by the rotation (matrices, permutations, and for eigenbasis the EMA statistics)."""
        return self.bytes

    # -- per-parameter maps ---------------------------------------------------------------------
    def _uv(self, i: int, state: dict):
        if self.kind == "per_tensor":
            return self.mats[i]
        if self.kind == "eigenbasis":
            return state.get("rot_u"), state.get("rot_v")
        return None, None

    def rotate(self, indices: list[int], xs: list[torch.Tensor], states: list[dict]) -> list[torch.Tensor]:
        """R applied to each tensor (global, randperm: to the whole vector, missing indices as zeros)."""
        if self.kind == "none":
            return xs
        if self.mixes:
            return self._mixed(indices, xs, inverse=False)
        return [apply_rotation(x, *self._uv(i, st)) for i, x, st in zip(indices, xs, states)]

    def unrotate(self, indices: list[int], xs: list[torch.Tensor], states: list[dict]) -> list[torch.Tensor]:
        """R⁻¹ = Rᵀ applied to each tensor (global, randperm: to the whole vector)."""
        if self.kind == "none":
            return xs
        if self.mixes:
            return self._mixed(indices, xs, inverse=True)
        return [apply_inverse(x, *self._uv(i, st)) for i, x, st in zip(indices, xs, states)]

    def _mixed(self, indices: list[int], xs: list[torch.Tensor], inverse: bool) -> list[torch.Tensor]:
        """The global / randperm map of the tensors ``xs`` at ``indices`` (the others taken as zeros)."""
        by_index = dict(zip(indices, xs))
        ref = xs[0]
        parts = [by_index[i].reshape(-1) if i in by_index else ref.new_zeros(math.prod(self.shapes[i]))
                 for i in range(len(self.shapes))]
        out = self._split(self.apply_flat(torch.cat(parts), inverse), self.shapes)
        return [out[i] for i in indices]

    def apply_flat(self, flat: torch.Tensor, inverse: bool = False, states: Optional[list[dict]] = None):
        """R v (Rᵀ v when ``inverse``) for a flat vector v over all parameters in index order (eigenbasis:
        the bases in ``states``, one dict per parameter)."""
        if self.kind == "none":
            return flat
        if self.kind == "global":
            q = self.q.to(flat)
            return q.T @ flat if inverse else q @ flat
        parts = self._split(flat, self.shapes)
        if self.kind == "randperm":
            for group, rp in zip(self.groups, self.randperms):
                vec = torch.cat([parts[i].reshape(-1) for i in group])
                vec = rp.forward(vec) if inverse else rp.backward(vec)  # R = Fᵀ, Rᵀ = F
                for i, x in zip(group, self._split(vec, [self.shapes[i] for i in group])):
                    parts[i] = x
        else:
            f = apply_inverse if inverse else apply_rotation
            sts = states if states is not None else [{}] * len(parts)
            parts = [f(x, *self._uv(i, st)) for i, (x, st) in enumerate(zip(parts, sts))]
        return torch.cat([x.reshape(-1) for x in parts])

    @staticmethod
    def _split(flat: torch.Tensor, shapes: list) -> list[torch.Tensor]:
        out, k = [], 0
        for s in shapes:
            n = math.prod(s)
            out.append(flat[k:k + n].reshape(s))
            k += n
        return out

    # -- eigenbasis -------------------------------------------------------------------------------
    def accumulate(self, grads: list[torch.Tensor], states: list[dict]) -> None:
        """EMA statistics L ← ema·L + (1−ema)·G Gᵀ, Rs ← ema·Rs + (1−ema)·Gᵀ G (eigenbasis only)."""
        if self.kind != "eigenbasis":
            return
        b = self.cfg.ema
        for g, st in zip(grads, states):
            m, n = matrix_sides(g.shape, self.cfg.max_dim, self.cfg.scope)
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


class FlatRotation:
    """The rotation R of a training run on flat vectors over ``model.named_parameters()`` (trainable ones,
    in that order): ``apply(v) = R v`` (gradient → optimizer basis), ``apply_t(v) = Rᵀ v``. v is (d,) or
    (rows, d); the result has v's dtype and device. The Hessian in the optimizer's basis is R H Rᵀ."""

    def __init__(self, rotation: Rotation, states: Optional[list[dict]] = None):
        self.rotation, self.states = rotation, states
        self.d = sum(math.prod(s) for s in rotation.shapes)
        self.kind = rotation.kind

    def _map(self, v: torch.Tensor, inverse: bool) -> torch.Tensor:
        if v.dim() == 2:
            return torch.stack([self._map(row, inverse) for row in v])
        if v.shape != (self.d,):
            raise ValueError(f"expected a flat vector of {self.d} entries (or rows of them); got {tuple(v.shape)}")
        return self.rotation.apply_flat(v, inverse, self.states)

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """R v."""
        return self._map(v, False)

    def apply_t(self, v: torch.Tensor) -> torch.Tensor:
        """Rᵀ v (= R⁻¹ v)."""
        return self._map(v, True)


def named_trainable(model) -> list[tuple[str, torch.Tensor]]:
    """``(name, parameter)`` of every trainable parameter in ``model.named_parameters()`` order: the order
    every flat parameter vector of rayexp uses (optimizer rotations and the Hessian engine)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def training_rotation(model, rotation_cfg: RotationConfig, optimizer=None,
                      dtype: Optional[torch.dtype] = None) -> FlatRotation:
    """The rotation a run with ``rotation_cfg`` trains ``model`` in, as a ``FlatRotation``.

    With ``optimizer`` (a ZooOptimizer of that run) its own rotation and state are used (needed for
    eigenbasis, whose bases are learned); otherwise it is rebuilt from the seed, in ``dtype`` (e.g.
    float64 for the Hessian engine: the same draws, not rounded to the parameters' precision).
    """
    named = named_trainable(model)
    if optimizer is not None:
        rot = optimizer.rotation
        if rot.names != [n for n, _ in named]:
            raise ValueError("optimizer's rotation does not index this model's named_parameters")
        return FlatRotation(rot, [optimizer.state[p] for _, p in named])
    if rotation_cfg.kind == "eigenbasis":
        raise ConfigError("rotation.kind: 'eigenbasis' is learned during training; pass the run's optimizer")
    return FlatRotation(Rotation([p for _, p in named], rotation_cfg, [n for n, _ in named], dtype))

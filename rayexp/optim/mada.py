"""MADA: Meta-Adaptive optimizers through hyper-gradient descent (Ozkara et al., arXiv 2401.08893).

The parameterized optimizer (the paper's interpolation of Adam, AVGrad, Yogi, Adan and Lion; the same
update as amazon-science/mada_optimizer_search gdtuo.py ``Meta.step``), with coefficients
k = (β1, β2, β3, ρ, c, γ), learning rate α (from the param group, not learned), step t and gradient g:

    ĝ = g + β3 (g − g_prev)                                  Adan's look-ahead gradient
    s = c ĝ² + (1 − c)(v + ĝ² · sign(ĝ² − v))                c = 1: Adam's g²; c < 1: Yogi-style
    m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) s;   n ← β3 n + (1 − β3)(g − g_prev);   g_prev ← g
    v̄ ← (v + (t − 1) v̄) / t                                  AVGrad: the time-average of v (paper Sec. 3)
    m_L ← 0.98 m_L + 0.02 g;   u_L = 0.95 m_L + 0.05 g       Lion (β = 0.95, 0.98 as for GPT-2)
    m̂ = m / (1 − β1ᵗ);   v̂ = (ρ v + (1 − ρ) v̄) / (1 − β2ᵗ)
    θ ← θ(1 − α wd) − α [ γ (m̂ + β3 n) / (√v̂ + ε) + (1 − γ) sign(u_L) ]

β3 = 0, c = 1, ρ = 1, γ = 1 is Adam (ε added to √v̂, like torch.optim.Adam); γ = 0 is Lion-like.
State starts at zero (m, v, v̄, n, g_prev, m_L); the seed starts v at 1e-15 and n at g², we use 0 and a
guarded square root (√max(v̂, 1e-30)) so the hypergradient stays finite where g ≡ 0.

Hypergradient (one-step unroll, the paper's hyper-gradient descent with the older history detached):
θ_t depends on k through this step only, so with g_{t+1} = ∇L(θ_t), which the train loop's backward has
already put in ``p.grad`` when ``step()`` is called again,

    ∂L(θ_t)/∂k = Σ_params ⟨g_{t+1}, ∂θ_t/∂k⟩ = −α_t Σ ⟨R(g_{t+1}), ∂d_t/∂k⟩

(R the rotation, identity by default). To get ∂d_t/∂k without a second backward of the model we keep
the pre-step state (m, v, n, g_prev: four extra buffers; the old v̄ is recovered as (t v̄ − v)/(t − 1))
and recompute d_t under autograd at step t+1: one vector-Jacobian product per tensor. Then, before the
normal step, each coefficient takes a step of SGD with momentum (b ← μ b + h; k ← k − η_k b; torch's
SGD convention, as the seed's ``SGDPerParamMo``) and is clamped to its range. Under DDP the gradients
are already averaged so every rank gets the same hypergradient; we all-reduce (average) it anyway.
Gradient clipping by the loop scales g_{t+1} and so the hypergradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from rayexp.config import MADA_COEFS, MADA_RANGES
from rayexp.optim.core import Family

LION_BETA1, LION_BETA2 = 0.95, 0.98
_BUFFERS = ("m", "v", "vbar", "n", "g_prev", "m_lion")


def mada_direction(k: dict, t: int, g, g_prev, m, v, n, vbar_prev, u_sign, eps: float):
    """The MADA direction d (θ ← θ − α d) and the new (m, v, n, v̄), differentiable in the coefficients k."""
    b1, b2, b3, rho, c, gam = (k[name] for name in MADA_COEFS)
    diff = g - g_prev
    gh2 = (g + b3 * diff) ** 2
    s = c * gh2 + (1 - c) * (v + gh2 * torch.sign(gh2 - v))
    m_new = b1 * m + (1 - b1) * g
    v_new = b2 * v + (1 - b2) * s
    n_new = b3 * n + (1 - b3) * diff
    vbar_new = (v_new + (t - 1) * vbar_prev) / t
    m_hat = m_new / (1 - b1 ** t)
    v_hat = (rho * v_new + (1 - rho) * vbar_new) / (1 - b2 ** t)
    d = gam * (m_hat + b3 * n_new) / (torch.sqrt(v_hat.clamp_min(1e-30)) + eps) + (1 - gam) * u_sign
    return d, m_new, v_new, n_new, vbar_new


def mada_init(p: torch.Tensor, hp: dict) -> dict:
    """Zero m, v, v̄, n, g_prev and Lion momentum."""
    return {name: torch.zeros_like(p) for name in _BUFFERS}


def mada_init_extra(settings: dict) -> dict:
    """Optimizer-wide state: coefficients (float64 scalars), hyper-momentum buffers, hyper-lrs."""
    return {"coefs": {n: torch.tensor(float(settings["mada_init"][n]), dtype=torch.float64) for n in MADA_COEFS},
            "hyper_buf": {n: torch.tensor(0.0, dtype=torch.float64) for n in MADA_COEFS},
            "hyper_lr": dict(settings["hyper_lr"]), "hyper_momentum": dict(settings["hyper_momentum"]),
            "hypergrad": torch.zeros(len(MADA_COEFS), dtype=torch.float64)}


def _chunks(members: list, chunk_numel: int):
    chunk, size = [], 0
    for it, g in members:
        chunk.append((it, g))
        size += g.numel()
        if size >= chunk_numel:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def hypergradient(opt, items, rgrads, chunk_numel: int = 1 << 24) -> torch.Tensor:
    """h_k = ∂L(θ_{t−1})/∂k = −α Σ ⟨g_t, ∂d_{t−1}/∂k⟩ by recomputing d_{t−1} under autograd (zeros at t = 1).

    Tensors sharing (t, lr, ε, device, dtype) are flattened into one vector per ``chunk_numel``
    coordinates, so the recomputation is a handful of large element-wise ops and one VJP per chunk,
    with extra memory bounded by a few chunk-sized tensors.
    """
    leaves = [opt.extra["coefs"][n].detach().clone().requires_grad_(True) for n in MADA_COEFS]
    h = torch.zeros(len(MADA_COEFS), dtype=torch.float64)
    groups: dict = {}
    for it, g in zip(items, rgrads):
        if "m_old" in it.state:
            key = (int(it.state["step"].item()), it.group.get("lr_used", it.group["lr"]), it.group["eps"],
                   g.device, g.dtype)
            groups.setdefault(key, []).append((it, g))
    for (t, lr, eps, device, _), members in groups.items():
        for chunk in _chunks(members, chunk_numel):
            def flat(key):
                return torch.cat([it.state[key].reshape(-1) for it, _ in chunk])
            g = torch.cat([x.reshape(-1) for _, x in chunk])
            g_prev, v, vbar = flat("g_prev"), flat("v"), flat("vbar")
            vbar_prev = (t * vbar - v) / (t - 1) if t > 1 else torch.zeros_like(v)
            u_sign = torch.sign(LION_BETA1 * flat("m_lion") + (1 - LION_BETA1) * g_prev)
            with torch.enable_grad():
                k = {n: leaf.to(device) for n, leaf in zip(MADA_COEFS, leaves)}
                d = mada_direction(k, t, g_prev, flat("g_prev_old"), flat("m_old"), flat("v_old"), flat("n_old"),
                                   vbar_prev, u_sign, eps)[0]
                grads = torch.autograd.grad(-lr * (g * d).sum(), leaves, allow_unused=True)
            h += torch.stack([x.detach().cpu() if x is not None else torch.zeros((), dtype=torch.float64)
                              for x in grads])
    if dist.is_available() and dist.is_initialized():
        hd = h.to(rgrads[0].device)
        dist.all_reduce(hd, op=dist.ReduceOp.SUM)
        h = hd.cpu() / dist.get_world_size()
    return h


def mada_hypergrad(opt, items, rgrads) -> dict:
    """Hypergradient, then the coefficients' SGD-with-momentum step and clamp; returns the step's ctx."""
    ex = opt.extra
    h = ex["hypergrad"] = hypergradient(opt, items, rgrads)
    if ex["t"] > 1:
        for j, n in enumerate(MADA_COEFS):
            buf = ex["hyper_buf"][n] = ex["hyper_momentum"][n] * ex["hyper_buf"][n] + h[j]
            lo, hi = MADA_RANGES[n]
            ex["coefs"][n] = (ex["coefs"][n] - ex["hyper_lr"][n] * buf).clamp(lo, hi)
    return {"coefs": {n: float(c) for n, c in ex["coefs"].items()}}


def mada_update(g: torch.Tensor, state: dict, hp: dict, ctx: dict) -> torch.Tensor:
    """One MADA direction (module docstring); keeps the pre-step state for the next hypergradient."""
    t = int(state["step"].item())
    m_lion = state["m_lion"].mul_(LION_BETA2).add_(g, alpha=1 - LION_BETA2)
    u_sign = torch.sign(LION_BETA1 * m_lion + (1 - LION_BETA1) * g)
    d, m, v, n, vbar = mada_direction(ctx["coefs"], t, g, state["g_prev"], state["m"], state["v"], state["n"],
                                      state["vbar"], u_sign, hp["eps"])
    for key in ("m", "v", "n", "g_prev"):
        state[key + "_old"] = state[key]
    state.update(m=m, v=v, n=n, vbar=vbar, g_prev=g.clone())
    return d


def mada_metrics(opt) -> dict[str, float]:
    """{"mada/beta1": ..., ..., "mada/gamma": ...}: the coefficients used by the last step."""
    return {f"mada/{n}": float(c) for n, c in opt.extra["coefs"].items()}


MADA = Family(
    name="mada",
    description="MADA: Adam/AVGrad/Yogi/Adan/Lion interpolation, coefficients learned by hypergradient",
    init=mada_init,
    update=mada_update,
    decoupled_wd=True,
    options=("lr", "weight_decay", "mada.beta1", "mada.beta2", "mada.beta3", "mada.rho", "mada.c", "mada.gamma",
             "mada.eps", "mada.hyper_lr", "mada.hyper_momentum"),
    state_floats=lambda cfg: 10.0,  # m v v̄ n g_prev m_L + pre-step m v n g_prev for the hypergradient
    linear_state=("m", "n", "g_prev", "m_lion", "m_old", "n_old", "g_prev_old"),
    hypergrad=mada_hypergrad,
    init_extra=mada_init_extra,
    metrics=mada_metrics,
)

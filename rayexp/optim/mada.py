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

β3 = 0, c = 1, ρ = 1, γ = 1 is Adam up to v's 1e-15 start (ε added to √v̂, like torch.optim.Adam); γ = 0 is
Lion-like.
As the seed (gdtuo.py:320-328): m = g_prev = m_L = 0, v = v̄ = 1e-15, and n = g² at the first step; v̄ enters
v̂ as a constant (detached: no hypergradient through it, gdtuo.py:362). √ is guarded (√max(v̂, 1e-30)).

Hypergradient (one-step unroll, the paper's hyper-gradient descent with the older history detached):
θ_t depends on k through this step only, so with g_{t+1} = ∇L(θ_t) the *unclipped* gradient of the next
step (the train loop hands it over in ``after_backward`` before clipping; seed train_ddp.py:369-384),

    ∂L(θ_t)/∂k = Σ_params ⟨g_{t+1}, ∂θ_t/∂k⟩ = −α_t Σ ⟨R(g_{t+1}), ∂d_t/∂k⟩

(R the rotation, identity by default). To get ∂d_t/∂k without a second backward of the model we keep
the pre-step state (m, v, n, g_prev: four extra buffers) and recompute d_t under autograd at step t+1:
one vector-Jacobian product per chunk. Under DDP the hypergradient is all-reduced (averaged), then each
coefficient's is clipped as torch's clip_grad_norm_ clips a scalar, h ← h·min(1, C/(|h| + 1e-6)) with
C = ``optimizer.hypergrad_clip`` (seed: 10, train_ddp.py:371-373). The hypergradients of the first
``optimizer.hypergrad_delay`` steps are dropped (train_ddp.py:356-358). Then, before the normal step,
each coefficient takes a step of SGD with momentum (b ← μ b + h; k ← k − η_k b; torch's SGD convention,
as the seed's ``SGDPerParamMo``) and is clamped to its range.

``optimizer.mada.seed_quirks`` (the mada_seed004_compat preset) reproduces seed behaviour on top:
g_prev_zero, first_micro_batch, two_micro_batch_start, double_coef_step (docs/methods.md, "MADA, seed 004").
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from rayexp.config import MADA_COEFS, MADA_RANGES
from rayexp.optim.core import Family

LION_BETA1, LION_BETA2 = 0.95, 0.98
STATE_FLOOR = 1e-15  # the seed's start of v and v̄ (gdtuo.py:322-323)
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s, with which the seed clips each hypergradient
_BUFFERS = ("m", "v", "vbar", "n", "g_prev", "m_lion")


def mada_direction(k: dict, t: int, g, g_prev, m, v, n, vbar_prev, u_sign, eps: float, vbar_new=None):
    """The MADA direction d (θ ← θ − α d) and the new (m, v, n, v̄), differentiable in the coefficients k
    (v̄ enters d detached; ``vbar_new`` gives its value when already known)."""
    b1, b2, b3, rho, c, gam = (k[name] for name in MADA_COEFS)
    diff = g - g_prev
    gh2 = (g + b3 * diff) ** 2
    s = c * gh2 + (1 - c) * (v + gh2 * torch.sign(gh2 - v))
    m_new = b1 * m + (1 - b1) * g
    v_new = b2 * v + (1 - b2) * s
    n_new = b3 * n + (1 - b3) * diff
    if vbar_new is None:
        vbar_new = (v_new + (t - 1) * vbar_prev) / t
    m_hat = m_new / (1 - b1 ** t)
    v_hat = (rho * v_new + (1 - rho) * vbar_new.detach()) / (1 - b2 ** t)
    d = gam * (m_hat + b3 * n_new) / (torch.sqrt(v_hat.clamp_min(1e-30)) + eps) + (1 - gam) * u_sign
    return d, m_new, v_new, n_new, vbar_new


def mada_init(p: torch.Tensor, hp: dict) -> dict:
    """m, n, g_prev, Lion momentum 0; v = v̄ = 1e-15 (n becomes g² at the first step)."""
    st = {name: torch.zeros_like(p) for name in _BUFFERS}
    st["v"].fill_(STATE_FLOOR)
    st["vbar"].fill_(STATE_FLOOR)
    return st


def keep_step_state(st: dict, g, m, v, n, vbar, g_prev_zero: bool) -> None:
    """After a step: the pre-step m, v, n, g_prev (for the next hypergradient) and the new state. With the
    seed quirk ``g_prev_zero`` g_prev stays 0 and the step's gradient is kept as ``g_last``."""
    for key in ("m", "v", "n", "g_prev"):
        st[key + "_old"] = st[key]
    st.update(m=m, v=v, n=n, vbar=vbar)
    if g_prev_zero:
        st["g_last"] = g.clone()
    else:
        st["g_prev"] = g.clone()


def mada_init_extra(settings: dict) -> dict:
    """Optimizer-wide state: coefficients (float64 scalars), hyper-momentum buffers, hyper-lrs, clip, delay,
    seed quirks."""
    return {"coefs": {n: torch.tensor(float(settings["mada_init"][n]), dtype=torch.float64) for n in MADA_COEFS},
            "hyper_buf": {n: torch.tensor(0.0, dtype=torch.float64) for n in MADA_COEFS},
            "hyper_lr": dict(settings["hyper_lr"]), "hyper_momentum": dict(settings["hyper_momentum"]),
            "hypergrad": torch.zeros(len(MADA_COEFS), dtype=torch.float64),
            "clip": settings.get("clip"), "delay": int(settings.get("delay", 0)),
            "quirks": tuple(settings.get("quirks", ()))}


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
    """h_k = ∂L(θ_{t−1})/∂k = −α Σ ⟨g_t, ∂d_{t−1}/∂k⟩ by recomputing d_{t−1} under autograd (zeros at t = 1),
    averaged over DDP ranks.

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
            h += _chunk_hypergradient(chunk, leaves, t, lr, eps, device)
    if dist.is_available() and dist.is_initialized():
        hd = h.to(rgrads[0].device)
        dist.all_reduce(hd, op=dist.ReduceOp.SUM)
        h = hd.cpu() / dist.get_world_size()
    return h


def _chunk_hypergradient(chunk, leaves, t: int, lr: float, eps: float, device) -> torch.Tensor:
    """−α ∂⟨g_t, d_{t−1}⟩/∂k over one chunk of flattened tensors (t is their step count, t−1 ≥ 1)."""
    def flat(key):
        return torch.cat([it.state[key].reshape(-1) for it, _ in chunk])
    g = torch.cat([x.reshape(-1) for _, x in chunk])
    g_last = flat("g_last" if "g_last" in chunk[0][0].state else "g_prev")  # the gradient step t−1 used
    u_sign = torch.sign(LION_BETA1 * flat("m_lion") + (1 - LION_BETA1) * g_last)
    with torch.enable_grad():
        k = {n: leaf.to(device) for n, leaf in zip(MADA_COEFS, leaves)}
        d = mada_direction(k, t, g_last, flat("g_prev_old"), flat("m_old"), flat("v_old"), flat("n_old"),
                           None, u_sign, eps, vbar_new=flat("vbar"))[0]
        grads = torch.autograd.grad(-lr * (g * d).sum(), leaves, allow_unused=True)
    return torch.stack([x.detach().cpu() if x is not None else torch.zeros((), dtype=torch.float64) for x in grads])


def clip_hypergradient(h: torch.Tensor, clip) -> torch.Tensor:
    """Each entry clipped as clip_grad_norm_ clips a scalar: h·min(1, C/(|h| + 1e-6)); None: unchanged."""
    if clip is None:
        return h
    return h * (clip / (h.abs() + CLIP_EPS)).clamp(max=1.0)


def mada_observe(opt, items, rgrads, micro: int, n_micro: int) -> None:
    """After a micro-batch's backward: take the hypergradient from the accumulated unclipped gradient at the
    last micro-batch (seed quirk ``first_micro_batch``: at the first, i.e. its loss / grad_accum)."""
    due = 0 if "first_micro_batch" in opt.extra["quirks"] else n_micro - 1
    if micro == due:
        opt.extra["h_pending"] = hypergradient(opt, items, rgrads)


def mada_micro_batches(opt, step: int, grad_accum: int) -> int:
    """grad_accum; with the seed quirk ``two_micro_batch_start`` the first step accumulates only 2."""
    if step == 1 and "two_micro_batch_start" in opt.extra["quirks"]:
        return min(2, grad_accum)
    return grad_accum


def mada_hypergrad(opt, items, rgrads) -> dict:
    """Hypergradient (from ``after_backward`` if the loop called it, else from p.grad now), delay, clip, then
    the coefficients' SGD-with-momentum step (twice under ``double_coef_step``) and clamp; the step's ctx."""
    ex = opt.extra
    h = ex.pop("h_pending", None)
    h = hypergradient(opt, items, rgrads) if h is None else h
    if ex["t"] - 1 <= ex["delay"]:  # h is ∂L(θ_{t−1})/∂k: dropped for the first `delay` updates
        h = torch.zeros_like(h)
    h = ex["hypergrad"] = clip_hypergradient(h, ex["clip"])
    if ex["t"] > 1:
        repeats = 2 if "double_coef_step" in ex["quirks"] else 1
        for j, n in enumerate(MADA_COEFS):
            for r in range(repeats):  # the repeat sees a zero hypergradient (seed: gdtuo.py:294)
                buf = ex["hyper_buf"][n] = ex["hyper_momentum"][n] * ex["hyper_buf"][n] + (h[j] if r == 0 else 0.0)
                ex["coefs"][n] = ex["coefs"][n] - ex["hyper_lr"][n] * buf
            lo, hi = MADA_RANGES[n]
            ex["coefs"][n] = ex["coefs"][n].clamp(lo, hi)
    return {"coefs": {n: float(c) for n, c in ex["coefs"].items()}, "g_prev_zero": "g_prev_zero" in ex["quirks"]}


def mada_update(g: torch.Tensor, state: dict, hp: dict, ctx: dict) -> torch.Tensor:
    """One MADA direction (module docstring); keeps the pre-step state for the next hypergradient."""
    t = int(state["step"].item())
    if t == 1:
        state["n"] = g * g  # the seed's start of n (gdtuo.py:324)
    m_lion = state["m_lion"].mul_(LION_BETA2).add_(g, alpha=1 - LION_BETA2)
    u_sign = torch.sign(LION_BETA1 * m_lion + (1 - LION_BETA1) * g)
    d, m, v, n, vbar = mada_direction(ctx["coefs"], t, g, state["g_prev"], state["m"], state["v"], state["n"],
                                      state["vbar"], u_sign, hp["eps"])
    keep_step_state(state, g, m, v, n, vbar, ctx.get("g_prev_zero", False))
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
    options=("lr", "weight_decay", "decay", "hypergrad_clip", "hypergrad_delay", "mada.beta1", "mada.beta2",
             "mada.beta3", "mada.rho", "mada.c", "mada.gamma", "mada.eps", "mada.hyper_lr", "mada.hyper_momentum",
             "mada.seed_quirks"),
    state_floats=lambda cfg: 10.0,  # m v v̄ n g_prev m_L + pre-step m v n g_prev for the hypergradient
    linear_state=("m", "n", "g_prev", "g_last", "m_lion", "m_old", "n_old", "g_prev_old"),
    hypergrad=mada_hypergrad,
    observe=mada_observe,
    micro_batches=mada_micro_batches,
    init_extra=mada_init_extra,
    metrics=mada_metrics,
)

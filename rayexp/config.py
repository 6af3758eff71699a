"""The experiment schema (pydantic), every list of allowed values, and the raw mapping it validates.

``Experiment`` is one run; ``SweepConfig`` is a sweep file: an Experiment plus ``seeds`` and ``search``.
A raw mapping comes from a YAML file plus ``key=value`` overrides (``load_raw``). Search spaces and
their resolution to concrete Experiments live in ``rayexp.spaces``. Errors name the file, the dotted
field, the bad value and the allowed values. This module knows nothing of Ray, torch or MLflow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

OPTIMIZERS = ("sgd", "signum", "adam", "adamw", "mada")
PRESETS = ("gpt2-tiny", "gpt2-mini", "gpt2-124m", "gpt2-350m")  # sizes: rayexp.models.gpt2.PRESETS
GRANULARITIES = ("coordinate", "row", "column", "tensor", "global")  # adam/adamw second moment shared over
ROTATIONS = ("none", "per_tensor", "global", "eigenbasis")
DEVICES = ("auto", "cpu", "cuda")
DATA_TASKS = ("bfs", "dfs")  # data.corpus task:NAME (rayexp.data.tasks)
CORPORA = ("builtin", "text:PATH", "parquet:PATH", "hf:NAME[:CONFIG]") + tuple(f"task:{t}" for t in DATA_TASKS)
HESSIAN_TASKS = ("top_eigs", "slq", "slq_blocks", "trace", "diag", "l11", "frobenius", "block_curvature",
                 "grad_heterogeneity")
METRICS = ("val_loss", "train_loss")  # what a sweep can optimize
MADA_COEFS = ("beta1", "beta2", "beta3", "rho", "c", "gamma")
MADA_RANGES = {"beta1": (0.01, 0.99), "beta2": (0.501, 0.99), "beta3": (0.0, 0.99), "rho": (0.0, 1.0),
               "c": (0.0, 1.0), "gamma": (0.0, 1.0)}  # each coefficient is clamped to its range


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user (no traceback needed)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    kind: Literal["gpt2", "cnn", "mlp"] = "gpt2"
    preset: Optional[Literal[PRESETS]] = "gpt2-tiny"
    n_layer: Optional[int] = Field(None, ge=1)
    n_head: Optional[int] = Field(None, ge=1)
    n_embd: Optional[int] = Field(None, ge=1)
    block_size: Optional[int] = Field(None, ge=2)
    attention: Literal["naive", "sdpa"] = "sdpa"
    # sdpa kernel on CUDA; auto: torch's choice for bf16/fp16, the memory-efficient kernel for fp32
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    # chunked: fused lm_head + cross-entropy over token chunks, the (B·T, V) logits never materialized
    loss: Literal["chunked", "full"] = "full"  # chunked: 12% slower on H200 (benchmarks/RESULTS.md), less memory
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    # GPT embedding/head rows rounded up to a multiple of this (nanoGPT's 50257 → 50304): the padded ids
    # never occur in the data; an unpadded 50257-wide head costs ~20 ms/step on an H100 (benchmarks/).
    vocab_multiple: int = Field(64, ge=1)


class DataConfig(_Strict):
    corpus: str = "builtin"
    tokenizer: Literal["bytes", "gpt2"] = "bytes"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    text_column: str = "text"
    cache_dir: Optional[str] = None  # None: ./.rayexp_cache
    task_nodes: int = Field(8, ge=2, le=200)  # task:bfs|dfs graph size
    task_examples: int = Field(20000, ge=1)
    task_seed: int = 0

    @field_validator("corpus")
    @classmethod
    def _corpus_form(cls, v: str) -> str:
        head = v.split(":", 1)[0]
        if v != "builtin" and head not in {c.split(":")[0] for c in CORPORA}:
            raise ValueError(f"unknown corpus {v!r}; allowed: {', '.join(CORPORA)}")
        if head != "builtin" and v != "builtin" and not v.split(":", 1)[1]:
            raise ValueError(f"corpus {v!r} needs a value after '{head}:'")
        return v


class TrainConfig(_Strict):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(8, ge=1)
    log_every: int = Field(10, ge=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int = Field(30, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    precision: Literal["fp32", "bf16"] = "fp32"
    clip: Optional[float] = Field(1.0, ge=0.0)
    diverge_factor: float = Field(10.0, gt=1.0)
    checkpoint_every: int = Field(0, ge=0)  # 0: checkpoint at each eval
    compile: bool = False
    device: Literal[DEVICES] = "auto"
    log_block_grad_norms: bool = True


def _coef(name: str, default: float):
    """A MADA coefficient field bounded by its MADA_RANGES entry."""
    lo, hi = MADA_RANGES[name]
    return Field(default, ge=lo, le=hi)


class MadaConfig(_Strict):
    """Initial MADA coefficients and their hyper learning rates (docs/methods.md, "MADA").

    ``hyper_lr`` / ``hyper_momentum``: one number for all six coefficients, or a mapping from coefficient
    name to value (missing names get 0, i.e. the coefficient stays fixed / no momentum).
    """
    beta1: float = _coef("beta1", 0.9)
    beta2: float = _coef("beta2", 0.95)
    beta3: float = _coef("beta3", 0.0)
    rho: float = _coef("rho", 0.6)
    c: float = _coef("c", 1.0)
    gamma: float = _coef("gamma", 1.0)
    eps: float = Field(1e-6, gt=0.0)  # the seed's value; optimizer.eps is not used by mada
    hyper_lr: Union[float, dict[str, float]] = Field(
        default_factory=lambda: {"beta1": 1e-3, "beta2": 1e-3, "beta3": 1e-2, "rho": 1e-2, "c": 1e-2,
                                 "gamma": 0.0})
    hyper_momentum: Union[float, dict[str, float]] = Field(default_factory=lambda: {"c": 0.5})

    @field_validator("hyper_lr", "hyper_momentum")
    @classmethod
    def _per_coef(cls, v: Union[float, dict[str, float]], info) -> Union[float, dict[str, float]]:
        values = v.values() if isinstance(v, dict) else [v]
        if isinstance(v, dict):
            bad = [k for k in v if k not in MADA_COEFS]
            if bad:
                raise ValueError(f"unknown coefficient {bad[0]!r}; allowed: {', '.join(MADA_COEFS)}")
        if any(x < 0 for x in values):
            raise ValueError(f"{info.field_name} must be >= 0")
        if info.field_name == "hyper_momentum" and any(x >= 1 for x in values):
            raise ValueError("hyper_momentum must lie in [0, 1)")
        return v

    def per_coef(self, field: str) -> dict[str, float]:
        """``hyper_lr`` or ``hyper_momentum`` as a full {coefficient: value} mapping."""
        v = getattr(self, field)
        return {k: float(v.get(k, 0.0)) if isinstance(v, dict) else float(v) for k in MADA_COEFS}


class OptimizerConfig(_Strict):
    """Optimizer choice and its hyperparameters (rayexp.optim; ``python -m rayexp.optim --list``).

    ``weight_decay``: coupled (L2 added to the gradient) for sgd/adam, decoupled (θ ← θ(1−lr·wd)) for
    signum/adamw/mada; applied to tensors with ≥ 2 dims only (nanoGPT's grouping).
    ``granularity`` / ``freeze_v_after``: adam/adamw second moment shared over coordinate | row | column |
    tensor | global, and frozen after K steps.
    """
    name: Literal[OPTIMIZERS] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    granularity: Literal[GRANULARITIES] = "coordinate"
    freeze_v_after: Optional[int] = Field(None, ge=1)  # second moment frozen after K steps
    # one compiled multi-tensor step per family (rayexp.optim.fused); auto: on for CUDA parameters
    fused: Union[Literal["auto"], bool] = "auto"
    mada: MadaConfig = Field(default_factory=MadaConfig)

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        for b in v:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"each beta must lie in [0, 1); got {list(v)}")
        return v

    @model_validator(mode="after")
    def _nesterov(self) -> "OptimizerConfig":
        if self.nesterov and self.name == "sgd" and self.momentum == 0.0:
            raise ValueError("optimizer.nesterov=true needs optimizer.momentum > 0")
        return self


class RotationConfig(_Strict):
    """Run the optimizer in a rotated basis (rayexp.optim.rotation; docs/methods.md, "Rotations").

    ``max_dim``: per_tensor/eigenbasis leave a matrix side longer than this unrotated (identity), so
    e.g. a 50k-row embedding gets only its column rotation; ``global`` refuses models over 20k params.
    """
    kind: Literal[ROTATIONS] = "none"
    seed: int = 0
    update_every: int = Field(10, ge=1)  # eigenbasis refresh period
    ema: float = Field(0.95, ge=0.0, lt=1.0)  # eigenbasis statistics EMA
    max_dim: int = Field(8192, ge=1)


class AshaConfig(_Strict):
    grace_period: int = Field(50, ge=1)
    reduction_factor: float = Field(3.0, gt=1.0)
    max_t: Optional[int] = Field(None, ge=1)


class SchedulerConfig(_Strict):
    asha: Optional[AshaConfig] = None


class SearchConfig(_Strict):
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, ge=1)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Union[Literal["none"], SchedulerConfig, None] = None
    seed: int = 0
    max_concurrent: Optional[int] = Field(None, ge=1)
    max_failures: int = Field(2, ge=0)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; allowed: {', '.join(METRICS)}")
        return v


class ResourcesConfig(_Strict):
    workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    strategy: Literal["ddp", "deepspeed"] = "ddp"


class DeepSpeedConfig(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False


class TrackingConfig(_Strict):
    uri: Optional[str] = None  # None: local store (sqlite:///./mlflow.db)
    experiment: Optional[str] = None  # None: the experiment's name


HESSIAN_MODES = ("auto", "cached", "double_backward", "fwd_rev", "fd")
HESSIAN_DTYPES = ("fp32", "tf32", "fp64")
HESSIAN_SHARDS = ("data", "params")
REORTH_MODES = ("none", "full", "selective")
LANCZOS_TASKS = ("top_eigs", "slq", "slq_blocks", "block_curvature")
REORTH_DEFAULTS = {"top_eigs": "full", "slq": "none", "slq_blocks": "none", "block_curvature": "full"}
DURING = ("lambda_max", "trace", "block_lambda_max", "grad_norms", "precond_sharpness")  # hessian.during
L11_ROTATIONS = ("none", "per_tensor", "global", "train")  # train: the rotation the checkpoint was trained in
CURVATURE_METHODS = ("lanczos", "power")  # block_curvature: exact λ_max, or seed 003's power iteration
BLOCK_RULES = ("seed001", "seed003")  # hessian.blocks: a seed's block list (rayexp.hessian.tasks.BLOCK_RULES_SPEC)
# hessian.preset: the seeds' curvature settings (docs/methods.md "Seed presets"); explicit fields override them.
HESSIAN_PRESETS: dict[str, dict] = {
    # seed 000, mohamad-amin/adam-coordinate-adaptivity@1f2e323: configs/gpt2_evaluate.yml:20-27 (k = 50 Cauchy
    # and 50 Rademacher vectors, 50 Lanczos steps), jax_hessian_eval_engine.py:388 (half-IQR headline),
    # :95-98 (use_train_rotations), :243 (mean over batches), :337-342 and yml:37-39 (1280 / 8 ranks = 160
    # batches of 6 × 8 ranks = 48 sequences)
    "seed000": {"tasks": ["l11", "top_eigs", "frobenius"], "cauchy_vectors": 50, "l11_estimator": "iqr",
                "l11_rotation": "train", "top_eigs_steps": 50, "hutchinson_probes": 50, "reduce": "mean",
                "batches": 160, "batch_size": 48},
    # seed 001, zyushun/hessian-spectrum@2f20a39: language_models/hessian_spectrum.py:16 (m = 100, σ² = 1e-5,
    # n_v = 10), :315-361 (no reorthogonalization), :399-423 (HVPs summed over batches), :367 (50,000 points);
    # train_gpt2.py:289-301 (60 batches of 8, blockwise then full); config/train_gpt2_small.py:44-69 (blocks)
    "seed001": {"tasks": ["slq_blocks", "slq"], "reduce": "sum", "batches": 60, "batch_size": 8, "probes": 10,
                "slq_steps": 100, "slq_sigma2": 1e-5, "grid_points": 50_000,
                "reorth": {"slq": "none", "slq_blocks": "none"}, "blocks": "seed001"},
    # seed 003, tom4649/gradient-heterogeneity@9a483ca: hessian_per_param.py:27-51 (blocks), :111-131 (per batch,
    # top_n = 5, get_maximum), pyhessian/hessian_nlp.py:94-150 (≤ 100 iterations, tol 1e-3, deflation)
    "seed003": {"tasks": ["block_curvature", "grad_heterogeneity"], "curvature_method": "power", "power_iters": 100,
                "power_tol": 1e-3, "power_top_n": 5, "blocks": "seed003"},
}


class HessianConfig(_Strict):
    """Curvature analysis (rayexp.hessian; docs/methods.md "Curvature"): tasks, fixed batches, estimator
    sizes, precision, memory budget and sharding over Ray actors.

    ``top_eigs_steps`` / ``slq_steps``: Lanczos steps of the top eigenvalues and of each SLQ probe (``probes``
    of them); ``which``: largest, smallest or both ends of the spectrum; ``reorth``: ``none | full |
    selective``, one mode for every Lanczos task or a mapping task → mode (defaults: full for top_eigs and
    block_curvature, the seed's three-term recurrence for SLQ); ``hutchinson_probes``: Rademacher probes for
    trace/diag/frobenius; ``cauchy_vectors``: k of the 1-1 norm (seed 000: 50); ``l11_rows``: size of an
    exact uniform row sample checking it; ``l11_rotation``: also ‖RHRᵀ‖₁,₁ in this rotated basis (``train``: the rotation the checkpoint's
    optimizer ran in, rebuilt from its experiment; seed 000);
    ``blocks``: fnmatch patterns selecting blocks for slq_blocks / grad_heterogeneity / block_curvature, or a
    seed's block rule (``BLOCK_RULES``); ``curvature_method``: block_curvature by Lanczos (exact λ_max) or by
    seed 003's power iteration (``power_iters``, ``power_tol``, deflation over ``power_top_n``, the first
    positive); ``preset``: a seed's settings (``HESSIAN_PRESETS``), which fields given explicitly override;
    ``reduce``: ``mean`` (the mean loss's Hessian) or ``sum`` (seed 001: n_batches × it);
    ``memory_gib``: the budget per device (default: what the device has free); ``shard``: with ``actors`` > 1,
    ``data`` (each actor holds the model and a share of the batches) or ``params`` (each holds 1/N of the
    parameters and of every vector); ``cpus_per_actor`` / ``gpus_per_actor``: Ray resources per actor
    (default: an equal share of what the cluster has, at most 1). During training, every ``every`` steps
    (0: never) the metrics ``during`` are logged as ``curv/*`` on one fixed batch, with ``during_steps``
    Lanczos steps (warm-started) and ``during_probes`` Hutchinson probes.
    """
    preset: Optional[Literal[tuple(HESSIAN_PRESETS)]] = None  # type: ignore[valid-type]
    after_training: bool = False
    tasks: list[Literal[HESSIAN_TASKS]] = Field(default_factory=lambda: ["top_eigs"])
    batches: int = Field(4, ge=1)
    batch_size: Optional[int] = Field(None, ge=1)
    reduce: Literal["mean", "sum"] = "mean"
    actors: int = Field(1, ge=1)
    shard: Literal[HESSIAN_SHARDS] = "data"  # type: ignore[valid-type]
    cpus_per_actor: Optional[float] = Field(None, gt=0.0)
    gpus_per_actor: Optional[float] = Field(None, ge=0.0)
    mode: Literal[HESSIAN_MODES] = "auto"  # type: ignore[valid-type]
    dtype: Literal[HESSIAN_DTYPES] = "fp32"  # type: ignore[valid-type]
    attention: Literal["naive", "sdpa"] = "naive"
    memory_gib: Optional[float] = Field(None, gt=0.0)
    top_k: int = Field(5, ge=1)
    which: Literal["largest", "smallest", "both"] = "largest"
    top_eigs_steps: int = Field(30, ge=2)
    slq_steps: int = Field(100, ge=2)
    reorth: dict[str, Literal[REORTH_MODES]] = Field(default_factory=lambda: dict(REORTH_DEFAULTS))  # type: ignore[valid-type]
    probes: int = Field(10, ge=1)
    slq_sigma2: float = Field(1e-5, gt=0.0)
    grid_points: int = Field(50_000, ge=100)
    hutchinson_probes: int = Field(100, ge=2)
    cauchy_vectors: int = Field(50, ge=2)
    l11_estimator: Literal["median", "iqr"] = "median"
    l11_rotation: Literal[L11_ROTATIONS] = "per_tensor"  # type: ignore[valid-type]
    l11_rows: int = Field(0, ge=0)
    curvature_steps: int = Field(20, ge=2)
    curvature_method: Literal[CURVATURE_METHODS] = "lanczos"  # type: ignore[valid-type]
    power_iters: int = Field(100, ge=1)
    power_tol: float = Field(1e-3, gt=0.0)
    power_top_n: int = Field(5, ge=1)
    blocks: Union[str, list[str], None] = None
    device: Literal[DEVICES] = "auto"
    seed: int = 0
    every: int = Field(0, ge=0)
    during: list[Literal[DURING]] = Field(default_factory=lambda: ["lambda_max"])  # type: ignore[valid-type]
    during_steps: int = Field(10, ge=2)
    during_probes: int = Field(10, ge=2)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """``preset: NAME`` fills every field the mapping does not give with the seed's value."""
        if isinstance(data, dict) and data.get("preset") in HESSIAN_PRESETS:
            return {**HESSIAN_PRESETS[data["preset"]], **data}
        return data

    @field_validator("blocks", mode="before")
    @classmethod
    def _blocks(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in BLOCK_RULES:
            raise ValueError(f"unknown block rule {v!r}; allowed: {', '.join(BLOCK_RULES)}, or a list of fnmatch "
                             f"patterns")
        return v

    @field_validator("reorth", mode="before")
    @classmethod
    def _reorth(cls, v: Any) -> Any:
        """``reorth: full`` sets every Lanczos task; a mapping sets the tasks it names."""
        if isinstance(v, str):
            return {t: v for t in LANCZOS_TASKS}
        if isinstance(v, dict):
            bad = [k for k in v if k not in LANCZOS_TASKS]
            if bad:
                raise ValueError(f"reorth.{bad[0]}: not a Lanczos task; allowed: {', '.join(LANCZOS_TASKS)}")
            return {**REORTH_DEFAULTS, **v}
        return v


class Experiment(_Strict):
    """One fully specified run: what ``run_training`` is given (a sweep hands on one per trial)."""
    name: str = "experiment"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    rotation: RotationConfig = Field(default_factory=RotationConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    hessian: HessianConfig = Field(default_factory=HessianConfig)
    output_dir: str = "out"

    @model_validator(mode="after")
    def _consistent(self) -> "Experiment":
        m = self.model
        if m.kind == "gpt2" and m.preset is None and None in (m.n_layer, m.n_head, m.n_embd, m.block_size):
            raise ValueError("model: give a preset or all of n_layer, n_head, n_embd, block_size")
        if self.train.warmup > self.train.steps:  # clamped, not refused (SweepSpec.notes says so)
            self.train.warmup = self.train.steps
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class SweepConfig(Experiment):
    """A sweep file: the Experiment of every trial plus the sweep's own fields, which no run reads."""
    seeds: list[int] = Field(default_factory=lambda: [0])  # each sampled config runs once per seed
    search: SearchConfig = Field(default_factory=SearchConfig)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds must list at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct; got {v}")
        return v


SWEEP_FIELDS = tuple(f for f in SweepConfig.model_fields if f not in Experiment.model_fields)


# ----------------------------------------------------------------------------------------------------
# raw mappings


def set_path(raw: dict, path: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for path ``a.b.c``, creating mappings on the way."""
    keys = path.split(".")
    node = raw
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def get_path(raw: dict, path: str, default: Any = None) -> Any:
    node: Any = raw
    for k in path.split("."):
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return node


# ----------------------------------------------------------------------------------------------------
# errors


def _allowed_fields(loc: tuple, schema: type) -> list[str]:
    """Field names accepted at ``loc`` (a pydantic error location ending in an unknown key)."""
    cls: Any = schema
    for part in loc[:-1]:
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        cls = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), ann)
    return list(getattr(cls, "model_fields", {}))


def _format_error(err: dict, source: str, schema: type) -> str:
    loc = tuple(str(p) for p in err["loc"])
    field = ".".join(loc) or "(top level)"
    etype, value = err["type"], err.get("input")
    if etype == "extra_forbidden":
        allowed = _allowed_fields(loc, schema)
        if loc[:1] == ("optimizer",) and len(loc) == 2:
            allowed = allowed + [f"{o} (per-optimizer block)" for o in OPTIMIZERS]
        return f"{source}: {field}: unknown field; allowed: {', '.join(allowed)}"
    if etype == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{source}: {field}: {value!r} is not allowed; allowed: {expected}"
    msg = err["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: {msg}{shown}" if not loc else f"{source}: {field}: {msg}{shown}"


def validate(raw: dict, source: str = "config", schema: type = Experiment):
    """Build an Experiment (or another ``schema``) from a raw mapping without spaces, or raise ConfigError
    naming the field."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(_format_error(err, source, schema) for err in e.errors())) from None


# ----------------------------------------------------------------------------------------------------
# loading


def parse_override(text: str) -> tuple[str, Any]:
    """``'optimizer.lr=1e-3'`` -> ``('optimizer.lr', 0.001)``; values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.steps=50)")
    key, val = text.split("=", 1)
    try:
        value = yaml.safe_load(val) if val else None
    except yaml.YAMLError:
        value = val
    return key.strip(), _float_strings(value)  # YAML 1.1 reads 1e-3 as a string, also inside {loguniform: [...]}


def _float_strings(node: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string: turn such strings into floats."""
    if isinstance(node, dict):
        return {k: _float_strings(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_float_strings(v) for v in node]
    if isinstance(node, str):
        try:
            return float(node) if any(c in node for c in "eE.") and node.strip()[0] in "+-.0123456789" else node
        except ValueError:
            return node
    return node


def load_raw(path: Union[str, Path, None], overrides: list[str] = ()) -> dict:
    """Read a YAML file (or start empty) and apply ``key=value`` overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
    raw = _float_strings(raw)
    for text in overrides:
        key, value = parse_override(text)
        set_path(raw, key, value)
    return raw



"""Experiment schema, YAML loading, search spaces and command-line overrides.

One YAML file describes an experiment and (optionally) its search space. Any scalar, or a list such
as ``betas``, may be replaced by a *space*: a one-key mapping

    {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]}

Per-optimizer blocks give conditional spaces: inside ``optimizer:``, a key named after an optimizer
(``adamw: {lr: ..., betas: ...}``) holds settings applied only when that optimizer is chosen.

Everything is validated before Ray starts; errors name the file, the dotted field, the bad value and
the allowed values. This module knows nothing of Ray, torch or MLflow.
"""
from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

OPTIMIZERS = ("sgd", "signum", "adam", "adamw", "mada")
PRESETS = ("gpt2-tiny", "gpt2-mini", "gpt2-124m", "gpt2-350m")
SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
HESSIAN_TASKS = ("top_eigs", "slq", "slq_blocks", "trace", "diag", "l11", "frobenius", "block_curvature",
                 "grad_heterogeneity")


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user (no traceback needed)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    kind: Literal["gpt2", "cnn", "mlp"] = "gpt2"
    preset: Optional[Literal["gpt2-tiny", "gpt2-mini", "gpt2-124m", "gpt2-350m"]] = "gpt2-tiny"
    n_layer: Optional[int] = Field(None, ge=1)
    n_head: Optional[int] = Field(None, ge=1)
    n_embd: Optional[int] = Field(None, ge=1)
    block_size: Optional[int] = Field(None, ge=2)
    attention: Literal["naive", "sdpa"] = "sdpa"
    # sdpa kernel on CUDA; auto: torch's choice for bf16/fp16, the memory-efficient kernel for fp32
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    # chunked: fused lm_head + cross-entropy over token chunks, the (B·T, V) logits never materialized
    loss: Literal["chunked", "full"] = "chunked"
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
        if v != "builtin" and head not in ("text", "parquet", "hf", "task"):
            raise ValueError(f"unknown corpus {v!r}; allowed: builtin, text:PATH, parquet:PATH, "
                             f"hf:NAME[:CONFIG], task:bfs, task:dfs")
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
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_block_grad_norms: bool = True


MADA_COEFS = ("beta1", "beta2", "beta3", "rho", "c", "gamma")
MADA_RANGES = {"beta1": (0.01, 0.99), "beta2": (0.501, 0.99), "beta3": (0.0, 0.99), "rho": (0.0, 1.0),
               "c": (0.0, 1.0), "gamma": (0.0, 1.0)}


class MadaConfig(_Strict):
    """Initial MADA coefficients and their hyper learning rates (ALGORITHMS.md, MADA).

    ``hyper_lr`` / ``hyper_momentum``: one number for all six coefficients, or a mapping from coefficient
    name to value (missing names get 0, i.e. the coefficient stays fixed / no momentum).
    """
    beta1: float = Field(0.9, ge=0.01, le=0.99)
    beta2: float = Field(0.95, ge=0.501, le=0.99)
    beta3: float = Field(0.0, ge=0.0, le=0.99)
    rho: float = Field(0.6, ge=0.0, le=1.0)
    c: float = Field(1.0, ge=0.0, le=1.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
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
    name: Literal["sgd", "signum", "adam", "adamw", "mada"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    granularity: Literal["coordinate", "row", "column", "tensor", "global"] = "coordinate"
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
    """Run the optimizer in a rotated basis (rayexp.optim.rotation; ALGORITHMS.md, Rotations).

    ``max_dim``: per_tensor/eigenbasis leave a matrix side longer than this unrotated (identity), so
    e.g. a 50k-row embedding gets only its column rotation; ``global`` refuses models over 20k params.
    """
    kind: Literal["none", "per_tensor", "global", "eigenbasis"] = "none"
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
        allowed = ("val_loss", "train_loss")
        if v not in allowed:
            raise ValueError(f"unknown metric {v!r}; allowed: {', '.join(allowed)}")
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


class HessianConfig(_Strict):
    """Curvature analysis (rayexp.hessian; ALGORITHMS.md "Curvature"): tasks, fixed batches, estimator sizes.

    ``probes``/``lanczos_steps``: SLQ probes n_v and Lanczos steps m (also top-eigenvalue steps);
    ``hutchinson_probes``: Rademacher probes for trace/diag/frobenius; ``cauchy_vectors``: k of the 1-1 norm;
    ``l11_rows``: size of the exact uniform row sample checking it (0: none); ``l11_rotation``: also
    estimate ‖RHRᵀ‖₁,₁ in this rotated basis; ``blocks``: fnmatch patterns selecting blocks for
    slq_blocks/grad_heterogeneity/block_curvature (None: all for the first two, weights for
    block_curvature).
    """
    after_training: bool = False
    tasks: list[Literal["top_eigs", "slq", "slq_blocks", "trace", "diag", "l11", "frobenius",
                        "block_curvature", "grad_heterogeneity"]] = Field(default_factory=lambda: ["top_eigs"])
    batches: int = Field(4, ge=1)
    batch_size: Optional[int] = Field(None, ge=1)
    actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    mode: Literal["fwd_rev", "double_backward"] = "fwd_rev"
    dtype: Literal["fp32", "fp64"] = "fp32"
    top_k: int = Field(5, ge=1)
    lanczos_steps: int = Field(30, ge=2)
    reorth: bool = True
    probes: int = Field(10, ge=1)
    slq_sigma2: float = Field(1e-5, gt=0.0)
    grid_points: int = Field(50_000, ge=100)
    hutchinson_probes: int = Field(100, ge=2)
    cauchy_vectors: int = Field(100, ge=2)
    l11_estimator: Literal["median", "iqr"] = "median"
    l11_rotation: Literal["none", "per_tensor", "global"] = "per_tensor"
    l11_rows: int = Field(0, ge=0)
    curvature_steps: int = Field(20, ge=2)
    blocks: Optional[list[str]] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0


class Experiment(_Strict):
    """One fully specified run (a Tune trial is one Experiment with concrete values and one seed)."""
    name: str = "experiment"
    seed: int = 0
    seeds: list[int] = Field(default_factory=lambda: [0])
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    rotation: RotationConfig = Field(default_factory=RotationConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    hessian: HessianConfig = Field(default_factory=HessianConfig)
    output_dir: str = "out"

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("seeds must list at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct; got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Experiment":
        m = self.model
        if m.kind == "gpt2" and m.preset is None and None in (m.n_layer, m.n_head, m.n_embd, m.block_size):
            raise ValueError("model: give a preset or all of n_layer, n_head, n_embd, block_size")
        if self.train.warmup > self.train.steps:
            raise ValueError(f"train.warmup ({self.train.warmup}) exceeds train.steps ({self.train.steps})")
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------------
# search spaces


class Space:
    """A search-space node: ``kind`` in SPACE_KINDS and its argument list."""

    def __init__(self, kind: str, args: list, where: str):
        self.kind, self.args, self.where = kind, args, where
        self._check()

    def _check(self) -> None:
        k, a, w = self.kind, self.args, self.where
        if not isinstance(a, list) or not a:
            raise ConfigError(f"{w}: {{{k}: ...}} needs a non-empty list; got {a!r}")
        if k in ("uniform", "loguniform", "randint"):
            if len(a) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in a):
                raise ConfigError(f"{w}: {{{k}: [lo, hi]}} needs two numbers; got {a!r}")
            lo, hi = a
            if not lo < hi:
                raise ConfigError(f"{w}: {{{k}: [lo, hi]}} needs lo < hi; got lo={lo}, hi={hi}")
            if k == "loguniform" and lo <= 0:
                raise ConfigError(f"{w}: {{loguniform: [lo, hi]}} needs lo > 0; got lo={lo}")
            if k == "randint" and not all(isinstance(x, int) for x in a):
                raise ConfigError(f"{w}: {{randint: [lo, hi]}} needs integers; got {a!r}")

    def candidates(self) -> list:
        """Values that represent the space for validation (all values, or the interval's ends)."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def sample(self, rng: random.Random) -> Any:
        lo_hi = self.args
        if self.kind in ("grid", "choice"):
            return rng.choice(self.args)
        if self.kind == "uniform":
            return rng.uniform(*lo_hi)
        if self.kind == "loguniform":
            return math.exp(rng.uniform(math.log(lo_hi[0]), math.log(lo_hi[1])))
        return rng.randrange(lo_hi[0], lo_hi[1])

    def __repr__(self) -> str:
        return f"{{{self.kind}: {self.args}}}"


def _as_space(node: Any, where: str) -> Optional[Space]:
    if isinstance(node, dict) and len(node) == 1:
        (key, val), = node.items()
        if key in SPACE_KINDS:
            return Space(key, val, where)
    return None


def find_spaces(raw: dict, prefix: str = "") -> dict[str, Space]:
    """All search spaces in a raw config, keyed by dotted path."""
    out: dict[str, Space] = {}
    for key, val in raw.items():
        path = f"{prefix}{key}"
        space = _as_space(val, path)
        if space is not None:
            out[path] = space
        elif isinstance(val, dict):
            out.update(find_spaces(val, path + "."))
    return out


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


def _allowed_fields(loc: tuple) -> list[str]:
    """Field names accepted at ``loc`` (a pydantic error location ending in an unknown key)."""
    cls: Any = Experiment
    for part in loc[:-1]:
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        cls = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")), ann)
    return list(getattr(cls, "model_fields", {}))


def _format_error(err: dict, source: str) -> str:
    loc = tuple(str(p) for p in err["loc"])
    field = ".".join(loc) or "(top level)"
    etype, value = err["type"], err.get("input")
    if etype == "extra_forbidden":
        allowed = _allowed_fields(loc)
        if loc[:1] == ("optimizer",) and len(loc) == 2:
            allowed = allowed + [f"{o} (per-optimizer block)" for o in OPTIMIZERS]
        return f"{source}: {field}: unknown field; allowed: {', '.join(allowed)}"
    if etype == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{source}: {field}: {value!r} is not allowed; allowed: {expected}"
    msg = err["msg"].removeprefix("Value error, ")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{source}: {msg}{shown}" if not loc else f"{source}: {field}: {msg}{shown}"


def validate(raw: dict, source: str = "config") -> Experiment:
    """Build an Experiment from a raw mapping (no spaces left), or raise ConfigError naming the field."""
    try:
        return Experiment.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(_format_error(err, source) for err in e.errors())) from None


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
    if isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


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


class SweepSpec:
    """A sweep: a raw config with search spaces, the seeds, and how to resolve concrete trials.

    ``spaces`` maps dotted paths to Space objects; paths inside per-optimizer blocks look like
    ``optimizer.adamw.lr`` and apply only when that optimizer is chosen.
    """

    def __init__(self, raw: dict, source: str = "config"):
        self.raw, self.source = raw, source
        try:
            self.spaces = find_spaces(raw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        base = validate(self._first_assignment_raw(), source)
        self.name, self.seeds, self.search = base.name, base.seeds, base.search
        self.base = base
        self._validate_all()

    # the optimizer names this sweep can pick
    def optimizer_names(self) -> list[str]:
        sp = self.spaces.get("optimizer.name")
        return sp.candidates() if sp else [get_path(self.raw, "optimizer.name", OptimizerConfig().name)]

    def active_spaces(self, optimizer: str) -> dict[str, Space]:
        """Spaces that matter when ``optimizer`` is chosen (other optimizers' blocks dropped)."""
        out = {}
        for path, sp in self.spaces.items():
            parts = path.split(".")
            if parts[0] == "optimizer" and len(parts) > 2 and parts[1] in OPTIMIZERS:
                if parts[1] != optimizer:
                    continue
            out[path] = sp
        return out

    def resolve(self, assignment: dict[str, Any], seed: Optional[int] = None) -> Experiment:
        """The concrete Experiment for values of the spaces (missing ones take their first candidate)."""
        raw = copy.deepcopy(self.raw)
        for path, sp in self.spaces.items():
            set_path(raw, path, assignment.get(path, sp.candidates()[0]))
        opt = raw.setdefault("optimizer", {})
        chosen = opt.get("name", OptimizerConfig().name)
        for name in OPTIMIZERS:
            block = opt.pop(name, None)
            if name == chosen and block:
                if not isinstance(block, dict):
                    raise ConfigError(f"{self.source}: optimizer.{name}: a per-optimizer block must be a mapping")
                opt.update(block)
        if seed is not None:
            raw["seed"] = seed
        elif "seeds" in raw and isinstance(raw["seeds"], list) and raw["seeds"]:
            raw.setdefault("seed", raw["seeds"][0])
        return validate(raw, self.source)

    def _first_assignment_raw(self) -> dict:
        raw = copy.deepcopy(self.raw)
        for path, sp in self.spaces.items():
            set_path(raw, path, sp.candidates()[0])
        opt = raw.get("optimizer", {})
        if isinstance(opt, dict):
            for name in OPTIMIZERS:
                opt.pop(name, None)
        return raw

    def _validate_all(self) -> None:
        """Every candidate value of every space must give a valid Experiment."""
        for name in self.optimizer_names():
            active = self.active_spaces(name)
            self.resolve({"optimizer.name": name} if "optimizer.name" in self.spaces else {})
            for path, sp in active.items():
                for value in sp.candidates():
                    try:
                        self.resolve({"optimizer.name": name, path: value})
                    except ConfigError as e:
                        raise ConfigError(f"{e} [from {path}: {sp!r}]") from None
        if self.search.algorithm == "grid":
            bad = [p for p, s in self.spaces.items() if s.kind not in ("grid", "choice")]
            if bad:
                raise ConfigError(f"{self.source}: search.algorithm: 'grid' cannot sample {', '.join(bad)}; "
                                  f"allowed: random, optuna (or make them {{grid: [...]}})")

    def experiment(self) -> Experiment:
        """The single Experiment of a file without spaces (for ``python -m rayexp.train``)."""
        if self.spaces:
            raise ConfigError(f"{self.source}: has search spaces ({', '.join(self.spaces)}); fix them with "
                              f"overrides (e.g. {next(iter(self.spaces))}=VALUE) or run it with rayexp.sweep")
        return self.resolve({})


def load_sweep(path: Union[str, Path, None], overrides: list[str] = ()) -> SweepSpec:
    """Load and fully validate a sweep file; raises ConfigError before anything starts."""
    source = str(path) if path is not None else "defaults"
    return SweepSpec(load_raw(path, overrides), source)


def load_experiment(path: Union[str, Path, None], overrides: list[str] = ()) -> Experiment:
    """Load a single-run config (no search spaces after overrides)."""
    return load_sweep(path, overrides).experiment()


def param_label(param: str, value) -> str:
    """Short name of one swept setting: ``lr=0.003`` for optimizer.lr, ``rotation=per_tensor`` for
    rotation.kind, the bare value for optimizer.name and model.kind."""
    if param in ("optimizer.name", "model.kind"):
        return str(value)
    parts = param.split(".")
    name = parts[-2] if parts[-1] in ("kind", "name") and len(parts) > 1 else parts[-1]
    return f"{name}={value}"

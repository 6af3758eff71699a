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
ROTATIONS = ("none", "per_tensor", "global", "eigenbasis", "randperm")
ROTATION_SCOPES = ("both", "output", "input")
ROTATION_INITS = ("native", "rotated")  # rotation.init: θ₀ as built, or θ₀ = Rᵀ θ_init (seed 000: φ₀ = θ_init)  # per_tensor/eigenbasis: U W Vᵀ, U W, or W Vᵀ
DECAY_SCOPES = ("matrices", "all")  # optimizer.decay: tensors with >= 2 dims (nanoGPT), or every parameter
DEVICES = ("auto", "cpu", "cuda")
DATA_TASKS = ("bfs", "dfs", "heapsort", "minimum", "binary_search", "bubble_sort",
              "insertion_sort")  # data.corpus task:NAME, CLRS-text (rayexp.data.tasks)
IMAGE_TASKS = ("images",)  # data.corpus task:images: synthetic image classification (rayexp.data.images)
CORPORA = ("builtin", "text:PATH", "parquet:PATH", "csv:PATH", "hf:NAME[:CONFIG]", "glue:NAME", "images:PATH") + tuple(
    f"task:{t}" for t in DATA_TASKS + IMAGE_TASKS)
# hf:PATH: a transformers tokenizer (local folder, or hub name online); pretrained: hf:<model.pretrained>
TOKENIZERS = ("bytes", "gpt2", "pretrained", "hf:PATH")
# glue:NAME → (text column, paired text column or None); stsb (regression) is not a classification task
GLUE_TASKS = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
              "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
              "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2")}
HF_HEADS = ("causal_lm", "sequence_classification")  # model.hf.head
DATA_METRICS = ("accuracy",)  # what an example dataset can name, logged as val_<metric> (rayexp.train.loop)
IGNORE_INDEX = -100  # a target not scored (prompt, padding): torch's cross_entropy default ignore_index
VISION_KINDS = ("resnet18", "resnet34", "resnet50", "vgg16", "densenet121", "vit_b16")  # rayexp.models.vision
MODEL_KINDS = ("gpt2", "cnn", "mlp", "hf") + VISION_KINDS
NORMS = ("pre", "post")  # GPT-2 LayerNorm placement (docs/methods.md "GPT-2")
STEMS = ("imagenet", "cifar")  # ResNet stem: 7×7/2 conv + max-pool, or 3×3/1 conv without pool
HESSIAN_BACKENDS = ("torch", "jax")  # who computes Hessian-vector products (docs/methods.md "Backends")
HESSIAN_TASKS = ("top_eigs", "slq", "slq_blocks", "trace", "diag", "l11", "frobenius", "block_curvature",
                 "grad_heterogeneity")
METRICS = ("val_loss", "train_loss") + tuple(f"val_{m}" for m in DATA_METRICS)  # what a sweep can optimize
MADA_COEFS = ("beta1", "beta2", "beta3", "rho", "c", "gamma")
# seed 004's behaviours that optimizer.mada.seed_quirks can switch on (docs/methods.md, "MADA, seed 004"):
# g_prev_zero: g_prev is always 0; first_micro_batch: the hypergradient comes from the first micro-batch of
# the next step (its loss / grad_accum); two_micro_batch_start: the first step accumulates 2 micro-batches;
# double_coef_step: the coefficients take a second momentum step with a zero hypergradient every step
SEED004_QUIRKS = ("g_prev_zero", "first_micro_batch", "two_micro_batch_start", "double_coef_step")
MADA_RANGES = {"beta1": (0.01, 0.99), "beta2": (0.501, 0.99), "beta3": (0.0, 0.99), "rho": (0.0, 1.0),
               "c": (0.0, 1.0), "gamma": (0.0, 1.0)}  # each coefficient is clamped to its range


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the user (no traceback needed)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HFConfig(BaseModel):
    """``model.kind: hf``: a transformers model (rayexp.models.hf). ``config``: a model type (``gpt2``,
    ``roberta``, ...) built with random weights from its config class, offline; every other key sets a field of
    that config (``n_layer: 2``, ``hidden_size: 64``); ``head``: ``causal_lm`` or ``sequence_classification``."""
    model_config = ConfigDict(extra="allow", validate_assignment=True)
    config: Optional[str] = None
    head: Literal[HF_HEADS] = "causal_lm"  # type: ignore[valid-type]

    def fields(self) -> dict:
        """The transformers config fields this section sets."""
        return dict(self.model_extra or {})


class ModelConfig(_Strict):
    """What ``rayexp.models.build`` makes. ``preset`` sizes gpt2/cnn/mlp; ``hf`` a transformers model (``hf``, ``pretrained``); vision kinds (VISION_KINDS) use
    the published sizes, with ``n_layer``/``n_head``/``n_embd`` (MLP 4·n_embd) overriding ViT-B's,
    ``image_size``/``patch_size`` the ViT input, ``stem``/``width`` the ResNet stem and base width (64), and
    ``pretrained`` a local state_dict or model folder (docs/methods.md "Vision models").
    """
    kind: Literal[MODEL_KINDS] = "gpt2"  # type: ignore[valid-type]
    norm: Literal[NORMS] = "pre"  # type: ignore[valid-type]
    hf: HFConfig = Field(default_factory=HFConfig)
    pretrained: Optional[str] = None  # kind hf: a local model folder (or a hub name when online); vision: a state_dict or folder
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
    image_size: int = Field(32, ge=4)
    patch_size: int = Field(16, ge=1)
    stem: Literal[STEMS] = "imagenet"  # type: ignore[valid-type]
    width: int = Field(64, ge=1)

    def describe(self) -> str:
        """A short name: the preset, ``hf:TYPE`` / ``hf:PATH`` (plus a classifier head), or the kind."""
        if self.kind == "hf":
            head = "" if self.hf.head == "causal_lm" else f" {self.hf.head}"
            return f"hf:{self.pretrained or self.hf.config}{head}"
        return self.preset if self.kind == "gpt2" and self.preset else self.kind


class DataConfig(_Strict):
    """``corpus`` and ``tokenizer`` (CORPORA, TOKENIZERS). A parquet/csv/hf corpus with ``label_column`` set,
    and every ``glue:NAME``, is text classification (one example a row: ``text_column`` or, when absent,
    ``sentence1``/``sentence2``, plus ``text_pair_column`` if set); ``task:NAME`` is a CLRS-text task of
    ``task_examples`` examples of size ``task_nodes`` (rayexp.data.tasks)."""
    corpus: str = "builtin"
    tokenizer: str = "bytes"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    cache_dir: Optional[str] = None  # None: ./.rayexp_cache
    task_nodes: int = Field(8, ge=2, le=200)  # task:NAME graph size / array length
    task_examples: int = Field(20000, ge=2)
    task_seed: int = 0
    task_classes: int = Field(10, ge=2)  # task:images classes

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, v: str) -> str:
        if v not in TOKENIZERS[:-1] and not (v.startswith("hf:") and v[3:]):
            raise ValueError(f"unknown tokenizer {v!r}; allowed: {', '.join(TOKENIZERS)}")
        return v

    @property
    def images(self) -> bool:
        """True for image classification data: images:PATH (images:hf:NAME for a hub dataset) or task:images."""
        return self.corpus.startswith("images:") or self.corpus == "task:images"

    @property
    def classification(self) -> bool:
        """True when the corpus is labelled text (glue:NAME, or label_column set)."""
        return self.corpus.startswith("glue:") or self.label_column is not None

    @field_validator("corpus")
    @classmethod
    def _corpus_form(cls, v: str) -> str:
        head = v.split(":", 1)[0]
        if v != "builtin" and head not in {c.split(":")[0] for c in CORPORA}:
            raise ValueError(f"unknown corpus {v!r}; allowed: {', '.join(CORPORA)}")
        if head != "builtin" and v != "builtin" and not v.split(":", 1)[1]:
            raise ValueError(f"corpus {v!r} needs a value after '{head}:'")
        if head == "task" and v[5:] not in DATA_TASKS + IMAGE_TASKS:
            raise ValueError(f"unknown task {v!r}; allowed: {', '.join('task:' + t for t in DATA_TASKS + IMAGE_TASKS)}")
        if head == "glue" and v[5:] not in GLUE_TASKS:
            raise ValueError(f"unknown GLUE task {v!r}; allowed: {', '.join('glue:' + t for t in GLUE_TASKS)}")
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


SEED004_HYPER_LR = {"beta1": 5e-4, "beta2": 5e-4, "beta3": 1e-1, "rho": 1e-1, "c": 1e-1, "gamma": 1e-1}
_SEED004 = {  # amazon-science/mada_optimizer_search @2beded8: train_ddp.py:278-279, :373, :396-398;
    "name": "mada", "lr": 6e-4, "weight_decay": 0.1, "decay": "matrices",  # config/train_gpt2_small.py
    "hypergrad_clip": 10.0, "hypergrad_delay": 50,  # hypergrad_init_iter = 50 * gradient_accumulation_steps
    "mada": {"beta1": 0.9, "beta2": 0.95, "beta3": 0.0, "rho": 0.6, "c": 1.0, "gamma": 1.0, "eps": 1e-6,  # README
             "hyper_lr": SEED004_HYPER_LR, "hyper_momentum": 0.0}}
# A preset sets defaults of the optimizer section; fields given explicitly win (a ``mada`` mapping merges
# key by key). docs/methods.md, "Presets", cites each value.
OPTIMIZER_PRESETS: dict[str, dict] = {
    # mohamad-amin/adam-coordinate-adaptivity @1f2e323: configs/gpt2_*train.yml; src/model/model.py:330-337
    # builds torch.optim.AdamW(all parameters) without weight_decay, so torch's default 0.01 decays every one
    "adamw_seed000": {"name": "adamw", "lr": 1.8e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01,
                      "decay": "all"},
    "mada_seed004": _SEED004,
    # the first commit 97c703a: train_ddp.py:312-313 and config/train_gpt2_small.py (delay 200 steps)
    "mada_seed004_v0": {**_SEED004, "hypergrad_delay": 200, "mada": {
        **_SEED004["mada"], "hyper_lr": {"beta1": 1e-3, "beta2": 1e-3, "beta3": 1e-2, "rho": 1e-2, "c": 1e-2,
                                         "gamma": 0.0},
        "hyper_momentum": {"c": 0.5, "gamma": 0.9}}},
    "mada_seed004_compat": {**_SEED004, "mada": {**_SEED004["mada"], "seed_quirks": list(SEED004_QUIRKS)}},
}


def apply_preset(raw: Any) -> Any:
    """``raw`` (an optimizer mapping) with the defaults of its ``preset`` filled in; explicit keys win."""
    name = raw.get("preset") if isinstance(raw, dict) else None
    if not isinstance(name, str) or name not in OPTIMIZER_PRESETS:
        return raw  # no preset, or one the field's validation names as not allowed
    out = {**OPTIMIZER_PRESETS[name], **raw}
    if isinstance(raw.get("mada"), dict) and "mada" in OPTIMIZER_PRESETS[name]:
        out["mada"] = {**OPTIMIZER_PRESETS[name]["mada"], **raw["mada"]}
    return out


def _coef(name: str, default: float):
    """A MADA coefficient field bounded by its MADA_RANGES entry."""
    lo, hi = MADA_RANGES[name]
    return Field(default, ge=lo, le=hi)


class MadaConfig(_Strict):
    """Initial MADA coefficients and their hyper learning rates (docs/methods.md, "MADA").

    ``hyper_lr`` / ``hyper_momentum``: one number for all six coefficients, or a mapping from coefficient
    name to value (missing names get 0, i.e. the coefficient stays fixed / no momentum).
    ``seed_quirks``: seed 004 behaviours to reproduce (SEED004_QUIRKS; the mada_seed004_compat preset sets all).
    """
    beta1: float = _coef("beta1", 0.9)
    beta2: float = _coef("beta2", 0.95)
    beta3: float = _coef("beta3", 0.0)
    rho: float = _coef("rho", 0.6)
    c: float = _coef("c", 1.0)
    gamma: float = _coef("gamma", 1.0)
    eps: float = Field(1e-6, gt=0.0)  # the seed's value; optimizer.eps is not used by mada
    # seed 004's current train_ddp.py (:279): β1, β2 5e-4; β3, ρ, c, γ 1e-1; no momentum
    hyper_lr: Union[float, dict[str, float]] = Field(default_factory=lambda: dict(SEED004_HYPER_LR))
    hyper_momentum: Union[float, dict[str, float]] = 0.0
    seed_quirks: list[Literal[SEED004_QUIRKS]] = Field(default_factory=list)  # type: ignore[valid-type]

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
    tensor | global, and frozen after K steps. ``decay``: weight decay on ``matrices`` (≥ 2 dims) or ``all``.
    ``preset``: defaults from OPTIMIZER_PRESETS (explicit fields win). ``hypergrad_clip`` / ``hypergrad_delay``
    (mada): each coefficient's hypergradient clipped to |h| ≤ clip (None: off); the hypergradients of the
    first ``hypergrad_delay`` steps are dropped (the coefficients stay put until step delay + 2).
    """
    preset: Optional[Literal[tuple(OPTIMIZER_PRESETS)]] = None  # type: ignore[valid-type]
    name: Literal[OPTIMIZERS] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    decay: Literal[DECAY_SCOPES] = "matrices"  # type: ignore[valid-type]
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    granularity: Literal[GRANULARITIES] = "coordinate"
    freeze_v_after: Optional[int] = Field(None, ge=1)  # second moment frozen after K steps
    # one compiled multi-tensor step per family (rayexp.optim.fused); auto: on for CUDA parameters
    fused: Union[Literal["auto"], bool] = "auto"
    mada: MadaConfig = Field(default_factory=MadaConfig)
    hypergrad_clip: Optional[float] = Field(10.0, gt=0.0)  # seed 004 train_ddp.py:373
    hypergrad_delay: int = Field(0, ge=0)  # seed 004 train_ddp.py:32 (0); its GPT-2 configs: 50

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return apply_preset(data)

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
    ``scope`` (per_tensor, eigenbasis): ``both`` sides, only the ``output`` side (U W: vectors too) or
    only the ``input`` side (W Vᵀ: vectors unrotated). ``randperm`` (seed 000): the parameters in
    ``named_parameters`` order form two groups, c_proj weights and the rest; each group gets ``rounds``
    rounds of a random permutation then a three-factor rotation (``factors``). ``init: rotated`` starts
    from θ₀ = Rᵀ θ_init, so the optimizer's coordinates start at φ₀ = R θ₀ = θ_init, as seed 000 trains
    φ from the usual initialization with θ = Rᵀ φ (not for eigenbasis).
    """

    @field_validator("factors")
    @classmethod
    def _factors(cls, v: Optional[list[list[int]]]) -> Optional[list[list[int]]]:
        if v is not None and (not 1 <= len(v) <= 2 or any(len(f) != 3 or min(f) < 1 for f in v)):
            raise ValueError(f"give one or two lists of three positive integers (one per group); got {v}")
        return v
    kind: Literal[ROTATIONS] = "none"
    seed: int = 0
    scope: Literal[ROTATION_SCOPES] = "both"  # type: ignore[valid-type]
    init: Literal[ROTATION_INITS] = "native"  # type: ignore[valid-type]
    rounds: int = Field(2, ge=1)  # randperm: k rounds of permutation + rotation (seed 000's randperm_2)
    # randperm: three factors per group (all but c_proj weights, then c_proj weights) whose product is the
    # group's size, e.g. seed 000's [[883, 139, 725], [256, 256, 540]]; None: chosen near the cube root
    factors: Optional[list[list[int]]] = None
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
    (default: an equal share of what the cluster has, at most 1). ``backend``: ``torch`` or ``jax`` (the JAX
    ports of gpt2/cnn/mlp, token cross-entropy only) computes the analysis' products (the monitor below always
    uses torch). During training, every ``every`` steps
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
    backend: Literal[HESSIAN_BACKENDS] = "torch"  # type: ignore[valid-type]
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

    @model_validator(mode="after")
    def _jax_in_one_process(self) -> "HessianConfig":
        if self.backend == "jax" and self.actors > 1:
            raise ValueError("hessian.backend=jax runs in one process (hessian.actors=1); allowed with actors > 1: "
                             "backend=torch")
        return self


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
        if self.optimizer.name == "mada" and self.optimizer.mada.seed_quirks and self.train.grad_accum < 2:
            raise ValueError("optimizer.mada.seed_quirks: seed 004 has no grad_accum=1 run to reproduce (it steps "
                             "the coefficients twice and crashes: train_ddp.py:376, gdtuo.py:294); set "
                             "train.grad_accum >= 2 or drop the quirks (optimizer.mada.seed_quirks=[])")
        if self.data.tokenizer == "pretrained":
            if not m.pretrained:
                raise ValueError("data.tokenizer=pretrained needs model.pretrained (a model folder with its tokenizer)")
            self.data.tokenizer = f"hf:{m.pretrained}"
        _check_model_data(m, self.data)
        if self.train.warmup > self.train.steps:  # clamped, not refused (SweepSpec.notes says so)
            self.train.warmup = self.train.steps
        return self

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_model_data(m: ModelConfig, d: DataConfig) -> None:
    """Model and data must fit: an hf model names its source; a classifier head needs labelled data and
    labelled data a classifier; masked targets (tasks, classification) need the full loss."""
    if m.kind == "hf" and (m.hf.config is None) == (m.pretrained is None):
        raise ValueError("model.kind=hf: give exactly one of model.hf.config (a transformers model type, random "
                         "init) or model.pretrained (a model folder)")
    vision = m.kind in VISION_KINDS
    if vision and d.corpus.startswith("hf:"):
        d.corpus = f"images:{d.corpus}"  # a hub dataset read as images (rayexp.data.images)
    if vision != d.images:
        need = "image data: images:PATH, hf:NAME or task:images" if vision else f"a vision model.kind ({', '.join(VISION_KINDS)})"
        raise ValueError(f"data.corpus={d.corpus!r} with model.kind={m.kind}: needs {need}")
    if vision:
        return
    classifier = m.kind == "hf" and m.hf.head == "sequence_classification"
    if classifier != d.classification:
        need = ("labelled data: glue:NAME or data.label_column" if classifier else
                "model.kind=hf with model.hf.head=sequence_classification")
        raise ValueError(f"data.corpus={d.corpus!r} with model.kind={m.kind}: needs {need}")
    if m.loss == "chunked" and (d.classification or d.corpus.startswith("task:")):
        raise ValueError(f"model.loss=chunked cannot skip ignored targets of data.corpus={d.corpus!r}; allowed: full")


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
    except yaml.YAMLError:  # e.g. blocks=[*attn*]: a YAML alias; a bracketed list is read as its comma-split items
        inner = val.strip()
        value = [x.strip() for x in inner[1:-1].split(",")] if inner[:1] + inner[-1:] == "[]" else val
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



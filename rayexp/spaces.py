"""Search spaces: the forms a sweep file may give any value, the SweepSpec that holds them, and its
resolution to concrete Experiments.

Any scalar, or a list such as ``betas``, may be replaced by a *space*: a one-key mapping

    {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {randint: [lo, hi]}

Per-optimizer blocks give conditional spaces: inside ``optimizer:``, a key named after an optimizer
(``adamw: {lr: ..., betas: ...}``) holds settings applied only when that optimizer is chosen.

A SweepSpec is validated once, when it is made (every candidate value of every space); ``resolve`` then
hands out concrete Experiments. No Ray, torch or MLflow here.
"""
from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any, Optional, Union

from rayexp.config import (OPTIMIZERS, SWEEP_FIELDS, ConfigError, Experiment, OptimizerConfig, TrainConfig,
                           SweepConfig, get_path, load_raw, parse_override, set_path, validate)

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


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




class SweepSpec:
    """A sweep: a raw config with search spaces, validated once; ``resolve`` gives concrete Experiments.

    ``spaces`` maps dotted paths to Space objects; paths inside per-optimizer blocks look like
    ``optimizer.adamw.lr`` and apply only when that optimizer is chosen. ``seeds`` and ``search`` are the
    sweep's own fields; ``base`` is the Experiment of the first candidates. Relative paths (data cache,
    text/parquet corpora, output_dir) are made absolute here: trials run in other directories and nodes.
    """

    def __init__(self, raw: dict, source: str = "config"):
        self.raw, self.source = _absolute_paths(raw, Path.cwd()), source
        try:
            self.spaces = find_spaces(self.raw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        fixed = [p for p in self.spaces if p.split(".")[0] in SWEEP_FIELDS]
        if fixed:
            raise ConfigError(f"{source}: {fixed[0]}: the sweep's own fields ({', '.join(SWEEP_FIELDS)}) "
                              f"cannot be search spaces")
        sweep: SweepConfig = validate(self._first_assignment_raw(), source, SweepConfig)
        self.name, self.seeds, self.search = sweep.name, sweep.seeds, sweep.search
        self._validate_all()
        self.base = self.resolve({})

    def optimizer_names(self) -> list[str]:
        """The optimizer names this sweep can pick."""
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
            elif self.shadowed(path, optimizer):
                continue
            out[path] = sp
        return out

    def shadowed(self, path: str, optimizer: str) -> bool:
        """True when the generic ``optimizer.X`` at ``path`` is set in ``optimizer``'s own block too (the more
        specific key wins)."""
        parts = path.split(".")
        if parts[0] != "optimizer" or len(parts) < 2 or parts[1] in OPTIMIZERS or parts[1] == "name":
            return False
        return get_path(self.raw, ".".join(["optimizer", optimizer] + parts[1:])) is not None

    def check_overrides(self, overrides: list[str]) -> None:
        """A generic ``optimizer.X=...`` override that every optimizer of the sweep sets in its own block would
        change nothing: an error naming those keys."""
        names = self.optimizer_names()
        for text in overrides:
            key = parse_override(text)[0]
            if all(self.shadowed(key, n) for n in names):
                field = key.split(".", 1)[1]
                blocks = ", ".join(f"optimizer.{n}.{field}" for n in names)
                raise ConfigError(f"{self.source}: override {key}: every optimizer of this sweep sets it in its "
                                  f"own block ({blocks}), and the more specific key wins; override those instead")

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
        for key in SWEEP_FIELDS:
            raw.pop(key, None)
        raw["seed"] = seed if seed is not None else raw.get("seed", self.seeds[0])
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

    def notes(self) -> list[str]:
        """What the sweep changes of its own accord: a warm-up longer than the run, clamped to it."""
        warmup = get_path(self.raw, "train.warmup", TrainConfig().warmup)
        steps = self.spaces["train.steps"].candidates() if "train.steps" in self.spaces else [self.base.train.steps]
        short = sorted({s for s in steps if isinstance(warmup, int) and isinstance(s, int) and s < warmup})
        if not short:
            return []
        return [f"train.warmup={warmup} exceeds train.steps={', '.join(map(str, short))}: clamped to the run's length"]

    def experiment(self) -> Experiment:
        """The single Experiment of a file without spaces (for ``python -m rayexp.train``)."""
        if self.spaces:
            raise ConfigError(f"{self.source}: has search spaces ({', '.join(self.spaces)}); fix them with "
                              f"overrides (e.g. {next(iter(self.spaces))}=VALUE) or run it with rayexp.sweep")
        return self.base


def _absolute_paths(raw: dict, cwd: Path) -> dict:
    """``raw`` with the data cache, text/parquet/csv corpora, output_dir, and an ``hf:PATH`` tokenizer or
    ``model.pretrained`` that is a local folder made absolute against ``cwd``."""
    raw = copy.deepcopy(raw)
    data = raw.setdefault("data", {})
    if not isinstance(data, dict):
        return raw  # not a mapping: the schema's error names it
    if isinstance(data.get("cache_dir"), (str, type(None))):
        data["cache_dir"] = str((cwd / (data.get("cache_dir") or ".rayexp_cache")).resolve())
    corpus = data.get("corpus", "builtin")
    if isinstance(corpus, str) and corpus.split(":", 1)[0] in ("text", "parquet", "csv"):
        kind, path = corpus.split(":", 1)
        data["corpus"] = f"{kind}:{(cwd / path).resolve()}"
    tok = data.get("tokenizer")
    if isinstance(tok, str) and tok.startswith("hf:") and (cwd / tok[3:]).exists():
        data["tokenizer"] = f"hf:{(cwd / tok[3:]).resolve()}"
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str) and (cwd / model["pretrained"]).exists():
        model["pretrained"] = str((cwd / model["pretrained"]).resolve())
    if isinstance(raw.get("output_dir", "out"), str):
        raw["output_dir"] = str((cwd / raw.get("output_dir", "out")).resolve())
    return raw


def load_sweep(path: Union[str, Path, None], overrides: list[str] = ()) -> SweepSpec:
    """Load and fully validate a sweep file; raises ConfigError before anything starts."""
    source = str(path) if path is not None else "defaults"
    spec = SweepSpec(load_raw(path, overrides), source)
    spec.check_overrides(list(overrides))
    return spec


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

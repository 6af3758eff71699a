"""Which trials a sweep runs: assignments of its spaces × its seeds, each a concrete Experiment with a key.

No Ray here. A ``Trial`` is one MLflow child run (one config × one seed). Every Tune trial carries a list
of them in ``config["trials"]``: one for grid and random, every seed of one sampled config for optuna.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass
from typing import Optional

from rayexp.config import Experiment
from rayexp.spaces import SweepSpec, param_label


@dataclass
class Trial:
    """One config × one seed: its MLflow trial key, the space values it was resolved from, its Experiment.
    ``index`` is its place in a planned (grid/random) sweep; None for trials optuna samples."""
    key: str
    assignment: dict
    seed: int
    exp: Experiment
    index: Optional[int] = None

    def label(self) -> str:
        """Short human name: optimizer and the values of the swept fields."""
        vals = " ".join(param_label(p, _fmt(v)) for p, v in self.assignment.items() if p != "optimizer.name")
        return f"{self.exp.optimizer.name} {vals} seed={self.seed}".replace("  ", " ")


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_fmt(x)}" for k, x in v.items()) + "}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def assignments(spec: SweepSpec) -> list[dict]:
    """The space assignments of a grid or random sweep (per-optimizer blocks only for their optimizer)."""
    name_sp = spec.spaces.get("optimizer.name")
    names = spec.optimizer_names()
    rng = random.Random(spec.search.seed)
    out: list[dict] = []
    samples = 1 if spec.search.algorithm == "grid" else spec.search.num_samples
    for _ in range(samples):
        chosen = names if name_sp is None or name_sp.kind == "grid" or spec.search.algorithm == "grid" \
            else [name_sp.sample(rng)]
        for opt in chosen:
            active = {p: s for p, s in spec.active_spaces(opt).items() if p != "optimizer.name"}
            enumerated = {p: s for p, s in active.items()
                          if s.kind == "grid" or spec.search.algorithm == "grid"}
            for combo in itertools.product(*[s.candidates() for s in enumerated.values()]):
                a = {"optimizer.name": opt} if name_sp is not None else {}
                a.update(zip(enumerated, combo))
                a.update({p: s.sample(rng) for p, s in active.items() if p not in enumerated})
                if a not in out or spec.search.algorithm == "random":
                    out.append(a)
    return out


def trial_key(sweep_id: str, exp: Experiment) -> str:
    """Stable id of one trial of one sweep instance (same config + seed ⇒ same key on resume)."""
    return hashlib.sha1((sweep_id + exp.to_yaml()).encode()).hexdigest()[:16]


def trials_of(spec: SweepSpec, sweep_id: str, assignment: dict, index: Optional[int] = None) -> list[Trial]:
    """One trial per seed of ``assignment`` (``index``: the first one's place in a planned sweep)."""
    out = []
    for i, seed in enumerate(spec.seeds):
        exp = spec.resolve(assignment, seed)
        out.append(Trial(trial_key(sweep_id, exp), assignment, seed, exp, None if index is None else index + i))
    return out


def plan(spec: SweepSpec, sweep_id: str) -> list[Trial]:
    """Every (assignment × seed) trial of a grid/random sweep, resolved once; [] for optuna (it samples)."""
    if spec.search.algorithm == "optuna":
        return []
    trials: list[Trial] = []
    known: set[str] = set()
    for a in assignments(spec):  # two assignments that resolve to the same Experiment are one trial
        for t in trials_of(spec, sweep_id, a):
            if t.key not in known:
                known.add(t.key)
                t.index = len(trials)
                trials.append(t)
    return trials

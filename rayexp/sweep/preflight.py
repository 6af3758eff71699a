"""Checks a sweep passes before Ray starts: its corpora can be read, an hf model or tokenizer it names exists,
its MLflow store answers, its output directory is writable. Each failure is one ConfigError line (the CLI
exits 2)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from rayexp import tracking
from rayexp.config import ConfigError
from rayexp.data import corpora
from rayexp.spaces import SweepSpec


def corpora_of(spec: SweepSpec) -> list[str]:
    """Every corpus a trial of ``spec`` may read (a space's candidates, or the one corpus)."""
    sp = spec.spaces.get("data.corpus")
    names = [spec.resolve({"data.corpus": c}).data.corpus for c in sp.candidates()] if sp else [spec.base.data.corpus]
    return list(dict.fromkeys(names))


def check_output_dir(path: str) -> None:
    """Raise ConfigError unless ``path`` can be created and written."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".rayexp-write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"output_dir={path}: not writable ({e.strerror or e})") from None


def check_hf(exp) -> None:
    """An hf model's type and fields, and an ``hf:PATH`` tokenizer, load (rayexp.models.hf.check)."""
    if exp.model.kind == "hf":
        from rayexp.models import hf
        hf.check(exp.model)
    if exp.data.tokenizer.startswith("hf:"):
        from rayexp.data import get_tokenizer
        get_tokenizer(exp.data.tokenizer)


def preflight(spec: SweepSpec, timeout: float = 5.0, local: bool = False) -> None:
    """Every check, cheapest first; raises ConfigError at the first failure. ``local`` (``--dry-run``): only the
    checks that neither reach a network nor write (local corpora, hf configs, the strategy)."""
    if spec.base.resources.strategy == "deepspeed" or "resources.strategy" in spec.spaces:  # not inside a trial
        from rayexp.sweep.plan import plan
        from rayexp.train.launch import check_strategy
        for exp in [t.exp for t in plan(spec, "preflight")] or [spec.base]:
            check_strategy(exp)
    for corpus in corpora_of(spec):
        if not (local and corpora.on_hub(corpus)):
            corpora.check(corpus, timeout)
    check_hf(spec.base)
    if local:
        return
    tracking.check_uri(tracking.resolve_uri(spec.base.tracking.uri), timeout)
    check_output_dir(spec.base.output_dir)

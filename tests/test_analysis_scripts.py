"""The analysis/ claim scripts that tests/test_analysis.py does not run end to end, each at its smallest
scale (2 steps, one seed, real Ray and a local MLflow store): the script exits 0 and its verdict.json has
its claims, each verdict a bool or n/a, and every number in it finite. (The scripts have no smaller mode;
rotation_l11 is checked against MLflow in test_analysis.py.)"""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analysis"))

SCRIPTS = {
    "adam_sgd_signum": [],
    "blockwise_spectra": ["--probes", "1", "--lanczos-steps", "4"],
    "gradient_heterogeneity": [],
    "mada_vs_adam": [],
    "second_moment_granularity": [],
}


def numbers(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from numbers(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from numbers(v)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield node


def test_every_claim_script_is_covered():
    scripts = {p.stem for p in (ROOT / "analysis").glob("*.py") if not p.stem.startswith("_")}
    assert scripts == set(SCRIPTS) | {"rotation_l11"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_claim_script_at_its_smallest_scale_writes_a_finite_verdict(name, tmp_path, capsys, monkeypatch):
    import importlib
    monkeypatch.setenv("RAYEXP_HOME", str(tmp_path / "home"))
    script = importlib.import_module(name)
    assert script.main(["--out", str(tmp_path), "--steps", "2", "--seeds", "0", *SCRIPTS[name]]) == 0
    assert "verdict" in capsys.readouterr().out
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["title"] and verdict["rows"]
    for row in verdict["rows"]:
        assert row["claim"] and row["measured"] and row["holds"] in (True, False, None), row
    values = list(numbers({k: v for k, v in verdict.items() if k != "rows"}))
    assert values and all(math.isfinite(v) for v in values), verdict

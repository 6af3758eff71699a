"""Experiment schema: defaults, overrides, and errors that name file, field, value and allowed values."""
import pytest

from rayexp.config import ConfigError, parse_override
from rayexp.spaces import load_experiment, load_sweep


def _write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_embedded_cpu_job():
    exp = load_experiment(None)
    assert (exp.model.preset, exp.data.corpus, exp.data.tokenizer, exp.optimizer.name) == \
        ("gpt2-tiny", "builtin", "bytes", "adamw")


def test_overrides_parse_yaml_values_and_scientific_floats(tmp_path):
    assert parse_override("optimizer.lr=1e-3") == ("optimizer.lr", 1e-3)
    assert parse_override("optimizer.betas=[0.9, 0.99]") == ("optimizer.betas", [0.9, 0.99])
    # a pattern list whose items start with * (a YAML alias, so no YAML) is still a list of patterns
    assert parse_override("hessian.blocks=[*attn*, *mlp.c_fc.weight]") == ("hessian.blocks", ["*attn*", "*mlp.c_fc.weight"])
    exp = load_experiment(_write(tmp_path, "optimizer: {lr: 3.0e-4}\ntrain: {steps: 10, warmup: 1}\n"),
                          ["train.steps=20", "optimizer.name=sgd"])
    assert exp.train.steps == 20 and exp.optimizer.name == "sgd" and exp.optimizer.lr == 3e-4


@pytest.mark.parametrize("text, needles", [
    ("optimizer: {lrr: 0.1}\n", ["exp.yaml", "optimizer.lrr", "unknown field", "lr", "betas"]),
    ("optimizer: {name: adamm}\n", ["optimizer.name", "'adamm'", "sgd", "signum", "mada"]),
    ("optimizer: {granularity: block}\n", ["optimizer.granularity", "coordinate", "global"]),
    ("optimizer: {betas: [0.9, 1.5]}\n", ["optimizer.betas", "[0, 1)"]),
    ("optimizer: {lr: -1}\n", ["optimizer.lr", "greater than 0"]),
    ("model: {preset: gpt2-huge}\n", ["model.preset", "gpt2-tiny", "gpt2-350m"]),
    ("data: {tokenizer: wordpiece}\n", ["data.tokenizer", "bytes", "gpt2"]),
    ("data: {corpus: 'ftp:x'}\n", ["data.corpus", "builtin", "text:PATH"]),
    ("train: {schedule: exp}\n", ["train.schedule", "cosine", "constant"]),
    ("trian: {steps: 3}\n", ["trian", "unknown field", "train"]),
])
def test_bad_field_error_names_file_field_value_and_allowed(tmp_path, text, needles):
    with pytest.raises(ConfigError) as e:
        load_experiment(_write(tmp_path, text))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(_write(tmp_path, "a: [1, 2\n"))


def test_sweep_spaces_resolve_per_optimizer_blocks(tmp_path):
    spec = load_sweep(_write(tmp_path, """
optimizer:
  name: {grid: [adamw, sgd]}
  adamw: {lr: {grid: [1.0e-3, 3.0e-3]}}
  sgd: {lr: {grid: [0.1]}, momentum: 0.8}
seeds: [0, 1]
"""))
    assert spec.optimizer_names() == ["adamw", "sgd"] and spec.seeds == [0, 1]
    assert set(spec.active_spaces("sgd")) == {"optimizer.name", "optimizer.sgd.lr"}
    exp = spec.resolve({"optimizer.name": "sgd", "optimizer.sgd.lr": 0.1}, seed=1)
    assert (exp.optimizer.name, exp.optimizer.lr, exp.optimizer.momentum, exp.seed) == ("sgd", 0.1, 0.8, 1)
    exp = spec.resolve({"optimizer.name": "adamw", "optimizer.adamw.lr": 3e-3})
    assert exp.optimizer.lr == 3e-3 and exp.optimizer.momentum == 0.9


def test_runs_and_sweeps_have_their_own_schemas(tmp_path):
    """seeds and search belong to the sweep file (SweepConfig), not to the Experiment a trial runs."""
    from rayexp.config import SWEEP_FIELDS, Experiment, SweepConfig
    assert set(SWEEP_FIELDS) == {"seeds", "search"} and not set(SWEEP_FIELDS) & set(Experiment.model_fields)
    assert set(SweepConfig.model_fields) == set(Experiment.model_fields) | set(SWEEP_FIELDS)
    spec = load_sweep(_write(tmp_path, "seeds: [3, 4]\nsearch: {algorithm: random, num_samples: 2}\n"))
    assert (spec.seeds, spec.search.num_samples) == ([3, 4], 2)
    exp = spec.resolve({})
    assert exp.seed == 3 and "search" not in exp.to_dict() and "seeds" not in exp.to_dict()
    with pytest.raises(ConfigError, match="search.num_samples: the sweep's own fields"):
        load_sweep(_write(tmp_path, "search: {num_samples: {grid: [1, 2]}}\n"))
    with pytest.raises(ConfigError) as e:
        load_sweep(_write(tmp_path, "sedes: [0]\n"))
    assert "seeds" in str(e.value) and "search" in str(e.value)  # the allowed top-level fields


def test_relative_paths_are_made_absolute_once_when_the_spec_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_sweep(_write(tmp_path, "data: {corpus: 'text:corpus.txt'}\noutput_dir: runs\n"))
    assert spec.base.data.corpus == f"text:{tmp_path / 'corpus.txt'}"
    assert spec.base.output_dir == str(tmp_path / "runs")
    assert spec.base.data.cache_dir == str(tmp_path / ".rayexp_cache")

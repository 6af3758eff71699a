"""Optimizer presets (config.OPTIMIZER_PRESETS) and the seed sweeps (sweeps/seeds/seed000_rotation*,
seed002_*, seed004_*): a preset sets defaults and explicit fields win; every sweep passes --dry-run at
its GPT-2 124M scale and a scaled-down copy trains on CPU."""
from pathlib import Path

import pytest

from rayexp.config import OPTIMIZER_PRESETS, SEED004_QUIRKS, ConfigError, OptimizerConfig, validate
from rayexp.spaces import load_sweep
from rayexp.sweep.__main__ import main as sweep_main
from rayexp.sweep.plan import plan
from rayexp.train.loop import run_training

SWEEPS = sorted(str(p) for pat in ("seed000_rotation*.yaml", "seed002_*.yaml", "seed004_*.yaml")
                for p in (Path(__file__).parents[1] / "sweeps" / "seeds").glob(pat))


def test_presets_set_defaults_and_explicit_fields_win():
    o = OptimizerConfig(preset="mada_seed004", lr=1e-3, mada={"rho": 0.5, "hyper_momentum": {"c": 0.3}})
    assert (o.name, o.lr, o.weight_decay, o.decay, o.hypergrad_clip, o.hypergrad_delay) == \
        ("mada", 1e-3, 0.1, "matrices", 10.0, 50)
    assert (o.mada.rho, o.mada.beta1, o.mada.eps, o.mada.hyper_momentum) == (0.5, 0.9, 1e-6, {"c": 0.3})
    assert o.mada.hyper_lr == {"beta1": 5e-4, "beta2": 5e-4, "beta3": 0.1, "rho": 0.1, "c": 0.1, "gamma": 0.1}
    v0 = OptimizerConfig(preset="mada_seed004_v0")
    assert v0.mada.hyper_lr["c"] == 1e-2 and v0.mada.per_coef("hyper_momentum")["c"] == 0.5
    assert v0.hypergrad_delay == 200 and v0.mada.seed_quirks == []
    assert OptimizerConfig(preset="mada_seed004_compat").mada.seed_quirks == list(SEED004_QUIRKS)
    assert OptimizerConfig(preset="mada_seed004_compat", mada={"seed_quirks": []}).mada.seed_quirks == []
    s0 = OptimizerConfig(preset="adamw_seed000", weight_decay=0.0)
    assert (s0.name, s0.lr, s0.decay, s0.weight_decay) == ("adamw", 1.8e-3, "all", 0.0)
    assert OptimizerConfig().mada.hyper_lr == OPTIMIZER_PRESETS["mada_seed004"]["mada"]["hyper_lr"]  # defaults


@pytest.mark.parametrize("raw, field", [({"preset": "mada_seed005"}, "optimizer.preset"),
                                        ({"decay": "some"}, "optimizer.decay"),
                                        ({"hypergrad_delay": -1}, "optimizer.hypergrad_delay"),
                                        ({"mada": {"seed_quirks": ["g_prev"]}}, "optimizer.mada.seed_quirks.0")])
def test_bad_optimizer_fields_name_the_field_and_allowed_values(raw, field):
    with pytest.raises(ConfigError) as e:
        validate({"optimizer": raw})
    assert str(e.value).count("\n") == 0 and f"{field}:" in str(e.value)


@pytest.mark.parametrize("raw, field", [({"kind": "randperm", "factors": [[2, 3]]}, "rotation.factors"),
                                        ({"scope": "left"}, "rotation.scope"), ({"init": "x"}, "rotation.init"),
                                        ({"rounds": 0}, "rotation.rounds")])
def test_bad_rotation_fields_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate({"rotation": raw})


def test_seed_sweeps_exist():
    names = {Path(p).name for p in SWEEPS}
    assert {"seed000_rotation_randperm.yaml", "seed004_mada.yaml", "seed004_mada_v0.yaml",
            "seed002_rotation_scopes.yaml", "seed002_second_moment.yaml"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: Path(p).stem)
def test_seed_sweep_dry_run_at_gpt2_124m_scale(path, capsys):
    """--dry-run validates the file as written (GPT-2 124M, 8 GPUs, hf:openwebtext; dry-run reads no data)."""
    assert sweep_main([path, "--dry-run"]) == 0
    spec = load_sweep(path)
    assert spec.base.model.preset == "gpt2-124m" and spec.base.data.corpus == "hf:Skylion007/openwebtext"
    assert spec.base.resources.gpus_per_worker == 1 and spec.base.data.tokenizer == "gpt2"
    assert "trials" in capsys.readouterr().out


CPU = ["model.preset=gpt2-tiny", "model.attention=sdpa", "data.corpus=builtin", "data.tokenizer=bytes",
       "train.steps=3", "train.batch_size=2", "train.grad_accum=2", "train.eval_every=3", "train.eval_batches=1",
       "train.warmup=1", "train.log_every=1", "train.compile=false", "train.precision=fp32", "resources.workers=1",
       "resources.gpus_per_worker=0", "resources.cpus_per_worker=1"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: Path(p).stem)
def test_seed_sweep_scaled_down_trains_on_cpu(path, tmp_path):
    """The same file with a tiny model, the builtin corpus and 3 steps: the first and last trials train."""
    spec = load_sweep(path, CPU + [f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache"])
    trials = plan(spec, "cpu")
    for t in {id(x): x for x in (trials[0], trials[-1])}.values():
        res = run_training(t.exp, workdir=str(tmp_path / str(t.index)))
        assert res.status == "finished", (t.label(), res.status)
        assert res.history and all(h.get("train_loss", 0.0) == h.get("train_loss", 0.0) for h in res.history)

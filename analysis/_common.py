"""What every analysis script shares: command line, running its sweep through ``rayexp.sweep``, curvature
on the sweep's checkpoints through ``rayexp.hessian``, figures through ``rayexp.report``, the verdict table.

Each script describes its sweep as a raw config (the same mapping a sweep YAML holds) for two scales:
``small`` (gpt2-tiny, builtin corpus, CPU; ≤ 10 min on 2 cores) and ``gpt2-124m`` (GPU cluster,
OpenWebText through ``hf:``). Claims 3 and 4 add a ResNet18 arm as a second sweep (``vision_raw``: a vision
model needs image data, so it cannot be a grid value beside gpt2), logged to the same MLflow experiment.
Everything a script prints is read back from MLflow.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import copy
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python analysis/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

from rayexp.config import HessianConfig  # noqa: E402
from rayexp.spaces import SweepSpec  # noqa: E402

SCALES = ("small", "gpt2-124m")

SMALL_TRAIN = {"steps": 400, "batch_size": 32, "eval_every": 50, "eval_batches": 8, "log_every": 25,
               "schedule": "cosine", "warmup": 40, "clip": 1.0, "log_block_grad_norms": False}
GPT2_124M_TRAIN = {"steps": 5000, "batch_size": 12, "grad_accum": 5, "eval_every": 250, "eval_batches": 50,
                   "log_every": 50, "schedule": "cosine", "warmup": 200, "clip": 1.0, "precision": "bf16",
                   "log_block_grad_norms": False}


def base_raw(name: str, scale: str, seeds: Sequence[int]) -> dict:
    """The shared part of a sweep at ``scale``: model, data, train, resources, tracking."""
    if scale == "small":
        return {"name": name, "model": {"preset": "gpt2-tiny", "attention": "sdpa"},
                "data": {"corpus": "builtin", "tokenizer": "bytes"}, "train": dict(SMALL_TRAIN),
                "seeds": list(seeds), "search": {"algorithm": "grid", "metric": "val_loss", "mode": "min"},
                "resources": {"workers": 1, "cpus_per_worker": 1}}
    return {"name": name, "model": {"preset": "gpt2-124m", "attention": "sdpa"},
            "data": {"corpus": "hf:Skylion007/openwebtext", "tokenizer": "gpt2"}, "train": dict(GPT2_124M_TRAIN),
            "seeds": list(seeds), "search": {"algorithm": "grid", "metric": "val_loss", "mode": "min"},
            "resources": {"workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 4}}


# The ResNet18 arm (claims 3, 4). small: CIFAR stem, width 8 (182 k parameters at 100 classes; gpt2-tiny has
# 0.1 M), 16×16 synthetic images of 100 classes (rayexp.data.images, task:images; at 4 or 10 classes Adam reaches
# val loss < 1e-3 within 400 steps, so both optimizers would tie at zero and the curvature would vanish). Width
# 16 costs 4.6× the curvature time (claim 3: 520 s instead of 230 s). gpt2-124m: the real ResNet18 (width 64)
# on CIFAR-10 at 32×32, batch 128.
VISION = {"small": {"model": {"kind": "resnet18", "stem": "cifar", "width": 8, "image_size": 16},
                    "data": {"corpus": "task:images", "task_classes": 100, "task_examples": 4000},
                    "train": {}, "hessian_batch": 8},
          "gpt2-124m": {"model": {"kind": "resnet18", "stem": "cifar", "width": 64, "image_size": 32},
                        "data": {"corpus": "hf:cifar10"}, "train": {"batch_size": 128, "grad_accum": 1},
                        "hessian_batch": 64}}  # hessian_batch: images per curvature batch (text: 8 / 4 sequences)
# Hessian blocks of the ResNet under a seed preset (the presets' own lists name GPT-2 tensors). seed001: the
# conv and linear weights; seed 001 has no ResNet list, and its lists keep weight matrices only, no norm
# layers (vision_models/main.py:270-285 for ViT-B, language_models/config/train_gpt2_small.py:44-69).
# seed003: seed 003's own ResNet-18 list (hessian_per_param.py:52-74; torchvision names, conv1/bn1 γ/conv2
# of layer1.0-1, layer3.0-1, layer4.0-1, the two downsample convs, fc) in transformers' names.
RESNET_WEIGHTS = ["*convolution.weight", "net.classifier.*.weight"]
SEED003_RESNET18 = ("layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.bn1",
                    "layer1.1.conv2", "layer3.0.conv1", "layer3.0.bn1", "layer3.0.conv2", "layer3.0.downsample.0",
                    "layer3.1.conv1", "layer3.1.bn1", "layer3.1.conv2", "layer4.0.conv1", "layer4.0.bn1",
                    "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.bn1", "layer4.1.conv2",
                    "fc")
TV_TO_HF = {"conv1": "layer.0.convolution", "bn1": "layer.0.normalization", "conv2": "layer.1.convolution",
            "downsample.0": "shortcut.convolution"}  # torchvision BasicBlock → transformers ResNetBasicLayer


def hf_resnet_name(tv: str) -> str:
    """transformers' name (under ``ImageClassifier.net``) of torchvision ResNet weight ``tv`` ("layer3.0.conv1"):
    torchvision's layer N is stage N − 1."""
    if tv == "fc":
        return "net.classifier.1.weight"
    layer, block, part = tv.split(".", 2)
    return f"net.resnet.encoder.stages.{int(layer[5:]) - 1}.layers.{block}.{TV_TO_HF[part]}.weight"


SEED_BLOCKS = {"cnn": {"seed001": ["*weight*"], "seed003": ["*weight*"]},
               "resnet18": {"seed001": RESNET_WEIGHTS, "seed003": [hf_resnet_name(n) for n in SEED003_RESNET18]}}


def seed_config(cfg: HessianConfig, kind: str) -> HessianConfig:
    """``cfg`` (a seed preset) for an arm of ``model.kind`` ``kind``: the preset's own block list on GPT-2,
    ``SEED_BLOCKS`` on the others (the token CNN keeps its weight tensors: the seeds' rules are GPT-2's)."""
    return cfg if kind == "gpt2" else cfg.model_copy(update={"blocks": SEED_BLOCKS[kind][cfg.preset]})


def vision_raw(raw: dict, scale: str, images: Optional[str] = None) -> dict:
    """The ResNet18 arm's sweep: ``raw`` (the text sweep, its optimizer set) with ``VISION[scale]``'s model and
    data (``images:PATH`` instead when ``images`` is given), named ``<name>_resnet18``, same MLflow experiment,
    train settings, seeds and resources."""
    arm = VISION[scale]
    v = copy.deepcopy(raw)
    v.update(name=f"{raw['name']}_resnet18", model=dict(arm["model"]),
             data={"corpus": f"images:{Path(images).resolve()}"} if images else dict(arm["data"]))
    v["train"].update(arm["train"])
    return v


def parser(doc: str) -> argparse.ArgumentParser:
    """Common options: --scale, --out, --uri, --steps, --seeds."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0], epilog=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="small", help="small: CPU minutes; gpt2-124m: GPU cluster")
    p.add_argument("--out", default=None, help="output directory (default out/analysis/<script>)")
    p.add_argument("--uri", default=None, help="MLflow URI (default sqlite:///<out>/mlflow.db)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (override)")
    return p


def add_images_option(p: argparse.ArgumentParser) -> None:
    """``--images PATH``: the ResNet18 arm's data (``vision_raw``)."""
    p.add_argument("--images", default=None, metavar="PATH", help="ResNet18 arm's data: CIFAR-10 python batches "
                   "or an ImageFolder tree (default: task:images at small scale, hf:cifar10 at gpt2-124m)")


def add_blocks_option(p: argparse.ArgumentParser) -> None:
    """``--blocks``: fnmatch patterns of Hessian blocks, parsed to ``HessianConfig.blocks`` (None = all)."""
    p.add_argument("--blocks", default="*weight*", type=lambda s: None if s == "all" else s.split(","),
                   help="comma-separated fnmatch patterns of blocks (default: weight tensors, Q/K/V split; "
                        "'all' for every tensor)")


def setup(args, name: str, default_seeds: Sequence[int]) -> tuple[dict, Path, str]:
    """The base raw config, the output directory and the MLflow URI for this invocation."""
    out = Path(args.out or ROOT / "out" / "analysis" / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = args.uri or f"sqlite:///{out / 'mlflow.db'}"
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(default_seeds)
    raw = base_raw(name, args.scale, seeds)
    if args.steps:
        raw["train"]["steps"] = args.steps
        raw["train"]["eval_every"] = max(1, min(raw["train"]["eval_every"], args.steps))
        raw["train"]["warmup"] = min(raw["train"]["warmup"], args.steps // 5)
    raw["tracking"] = {"uri": uri, "experiment": name}
    raw["output_dir"] = str(out)
    return raw, out, uri


def run_sweep(raw: dict) -> dict:
    """Run the sweep ``raw`` with ``rayexp.sweep.tune.run_sweep``; returns its state (a SweepState: uri,
    experiment, parent_run_id), summary rows, error count and seconds, and shuts Ray down."""
    import ray

    from rayexp.sweep.tune import run_sweep as _run

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    try:
        res = _run(SweepSpec(raw, f"analysis:{raw['name']}"), quiet=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    out = {"state": res.state, "summary": res.summary, "errors": res.errors, "seconds": time.perf_counter() - t0}
    print(f"sweep {raw['name']}: {out['seconds']:.0f} s, parent run {res.state.parent_run_id}", flush=True)
    if res.errors:
        print(f"warning: {res.errors} trial(s) raised; their configs count as missing in the verdict", flush=True)
    return out


def run_sweeps(uri: str, *raws: dict) -> tuple[list, list]:
    """``run_sweep`` each of ``raws`` in turn (the text sweep, then the ResNet18 arm); their results and all
    their child runs together (``pick`` them by ``model.kind``)."""
    results = [run_sweep(raw) for raw in raws]
    return results, [r for res in results for r in child_runs(uri, res["state"].parent_run_id)]


def child_runs(uri: str, parent_run_id: str) -> list:
    """MLflow child runs of a sweep (oldest first)."""
    from rayexp.tracking import sweep_children
    return sweep_children(uri, parent_run_id)


def pick(runs: list, **params) -> list:
    """Runs whose params equal ``params`` (keys with dots given as ``optimizer__name``)."""
    want = {k.replace("__", "."): str(v) for k, v in params.items()}
    return [r for r in runs if all(r.data.params.get(k) == v for k, v in want.items())]


def final_val(runs: list) -> tuple[float, float, int]:
    """Mean, sample std (ddof=1) and count of the final val losses of ``runs`` (diverged ⇒ inf), as the
    sweep summary and the report compute them (``rayexp.tracking``)."""
    from rayexp.tracking import final_val_loss, seed_stats
    return seed_stats(final_val_loss(r.data.tags, r.data.metrics) for r in runs)


def best_config(runs: list, key: str = "optimizer.lr", what: str = "") -> tuple[str, list]:
    """The value of ``key`` with the lowest mean final val loss, and its runs. Prints a note when that
    value is the smallest or largest of a numeric grid of ≥ 3 values (the optimum may lie outside it)."""
    values = sorted({r.data.params.get(key) for r in runs})
    best = min(values, key=lambda v: final_val([r for r in runs if r.data.params.get(key) == v])[0])
    try:
        nums = sorted(float(v) for v in values)
        if len(nums) >= 3 and float(best) in (nums[0], nums[-1]):
            print(f"note: best {key}={best}{' for ' + what if what else ''} is at the edge of its grid "
                  f"{nums}: widen it", flush=True)
    except ValueError:
        pass
    return best, [r for r in runs if r.data.params.get(key) == best]


def hessian(uri: str, run, cfg: HessianConfig, out: Path, label: Optional[str] = None) -> dict:
    """Curvature of a child run's final checkpoint (downloaded from MLflow), logged back to that run
    as ``hessian/*`` metrics and ``hessian/hessian.npz`` (``rayexp.hessian.analyze_checkpoint``); with ``label``
    (a second analysis of the same run, e.g. under a seed preset) as ``hessian/<label>/*`` metrics only, so the
    first analysis' metrics and files stay as they were."""
    from rayexp.hessian import analyze_checkpoint
    from rayexp.tracking import checkpoint_from_run, log_hessian_results

    t0 = time.perf_counter()
    path, _ = checkpoint_from_run(run.info.run_id, uri)
    results, files = analyze_checkpoint(path, cfg, out_dir=str(out / "hessian" / run.info.run_id[:8]), progress=False,
                                        title=run.info.run_name)
    if label:
        log_hessian_results(run.info.run_id, uri, {f"{label}/{k}": v for k, v in results["metrics"].items()})
    else:
        log_hessian_results(run.info.run_id, uri, results["metrics"], files)
    print(f"hessian {run.info.run_name}: {results['hvps']} HVPs, {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def report(uri: str, experiment: str, parent_run_id: str, out: Path, **kw):
    """``rayexp.report.build_report`` into ``<out>/report`` (logged to the parent run)."""
    from rayexp.report import build_report
    rep = build_report(experiment, uri, out / "report", parent=parent_run_id, **kw)
    for name, path in rep.figures.items():
        print(f"figure {name}: {path}")
    print(f"html: {rep.html}")
    return rep


def fmt(mean: float, std: float) -> str:
    return "inf (diverged)" if not math.isfinite(mean) else f"{mean:.4f} ± {std:.4f}"


def verdict(title: str, rows: list[tuple[str, str, Optional[bool]]], out: Path, extra: Optional[dict] = None) -> None:
    """Print the verdict table (claim, measured numbers, holds / does not hold) and save it as
    ``verdict.json`` / ``verdict.txt`` in ``out``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=True)
    for col in ("claim", "measured", "verdict"):
        table.add_column(col, overflow="fold")
    for claim, measured, holds in rows:
        table.add_row(claim, measured, "holds" if holds else ("does not hold" if holds is not None else "n/a"))
    console = Console(width=max(120, Console().width))
    console.print(table)
    with open(out / "verdict.txt", "w") as f:
        Console(file=f, width=140).print(table)
    (out / "verdict.json").write_text(json.dumps(
        {"title": title, "rows": [{"claim": c, "measured": m, "holds": h} for c, m, h in rows], **(extra or {})},
        indent=1, default=str))


def quiet_env() -> None:
    """Fewer threads per trial and no progress noise (2 shared cores)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)

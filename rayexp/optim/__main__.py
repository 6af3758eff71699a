"""``python -m rayexp.optim --list [--preset gpt2-tiny] [--vocab 256]``: the zoo, its state memory, and the
memory each rotation kind would take on a model preset."""
from __future__ import annotations

import argparse
import math

import torch

from rayexp.config import ROTATIONS, ModelConfig, OptimizerConfig, RotationConfig
from rayexp.optim.adam import GRANULARITIES
from rayexp.optim.registry import OPTIMIZERS, state_bytes_per_param
from rayexp.optim.rotation import GLOBAL_MAX_DIM, rotation_memory


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def optimizer_table() -> list[tuple[str, str, str, str]]:
    """Rows (name, description, state bytes/param fp32, options) for every optimizer and v granularity."""
    rows = []
    for name, fam in OPTIMIZERS.items():
        cfg = OptimizerConfig(name=name)
        rows.append((name, fam.description, f"{state_bytes_per_param(cfg):g}", ", ".join(fam.options)))
        if name == "adam":
            for gran in GRANULARITIES[1:]:
                extra, what = {"row": ("+4/row", "one v per output neuron (row)"),
                               "column": ("+4/column", "one v per input neuron (column)"),
                               "tensor": ("+4/tensor", "one v per parameter tensor"),
                               "global": ("+4/tensor", "one v for the whole model (AdaSGD)")}[gran]
                b = state_bytes_per_param(OptimizerConfig(name=name, granularity=gran))
                rows.append((f"  adam[{gran}]", what, f"{b:g} {extra}", "(same for adamw)"))
    return rows


def preset_shapes(preset: str, vocab: int) -> tuple[list[torch.Size], list[str]]:
    """Parameter shapes and names of a GPT-2 preset, built on the meta device (no memory)."""
    from rayexp.models.gpt2 import GPT, gpt_config
    with torch.device("meta"):
        model = GPT(gpt_config(ModelConfig(preset=preset), vocab))
    return [p.shape for p in model.parameters()], [n for n, _ in model.named_parameters()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rayexp.optim", description=__doc__)
    ap.add_argument("--list", action="store_true", help="print the optimizers and memory tables")
    ap.add_argument("--preset", default="gpt2-tiny", help="model preset for the rotation memory table")
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary size (256: byte tokenizer; 50304: gpt2)")
    args = ap.parse_args(argv)
    if not args.list:
        ap.print_help()
        return
    rows = [("name", "description", "state B/param (fp32)", "options")] + optimizer_table()
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    shapes, names = preset_shapes(args.preset, args.vocab)
    d = sum(math.prod(s) for s in shapes)
    print(f"\nrotation memory on {args.preset} (vocab {args.vocab}, {d:,} parameters, fp32; "
          f"sides > rotation.max_dim={RotationConfig().max_dim} stay unrotated):")
    for kind in ROTATIONS:
        b = rotation_memory(shapes, RotationConfig(kind=kind), names=names)
        note = {"per_tensor": "Haar U (m×m), V (n×n) per tensor", "eigenbasis": "bases + EMA statistics (SOAP-like)",
                "randperm": "seed 000: 2 rounds of int32 permutation + 3 small Haar factors per group",
                "global": f"one d×d Haar matrix; refused above {GLOBAL_MAX_DIM:,} parameters"
                          + (" (refused here)" if d > GLOBAL_MAX_DIM else ""), "none": ""}[kind]
        print(f"  {kind:<11} {_fmt_bytes(b):>12}  {note}".rstrip())


if __name__ == "__main__":
    main()

"""``rayexp COMMAND ...``: one entry point for the module CLIs.

    rayexp sweep   SWEEP.yaml [key=value ...]     = python -m rayexp.sweep
    rayexp train   CONFIG.yaml [key=value ...]    = python -m rayexp.train
    rayexp hessian --checkpoint DIR --tasks ...   = python -m rayexp.hessian
    rayexp report  EXPERIMENT [--out DIR]         = python -m rayexp.report
    rayexp optim   --list                         = python -m rayexp.optim
    rayexp ui      [--uri URI] [--port 5000]      the MLflow UI on the last sweep's store (rayexp.ui)
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

COMMANDS = {"sweep": "rayexp.sweep.__main__", "train": "rayexp.train.__main__", "hessian": "rayexp.hessian.__main__",
            "report": "rayexp.report.__main__", "optim": "rayexp.optim.__main__", "ui": "rayexp.ui"}


def shell_command(name: str) -> str:
    """The command that runs ``rayexp NAME`` from any shell, this environment active or not (what the CLIs print)."""
    script = Path(sys.executable).parent / "rayexp"
    return f"{script if script.is_file() else f'{sys.executable} -m rayexp.cli'} {name}"


def main(argv=None) -> int:
    """Dispatch ``argv[0]`` to the ``main(argv)`` of the module that owns it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# rayexp set-up and entry points. Creates ./.venv on first use (Python 3.11 + pip), installs the
# pinned dependencies once (re-installs only when pyproject.toml or this file change), then runs:
#   bash run.sh main [SWEEP.yaml] [key=value ...]   the main job: a sweep (default: the embedded adam_vs_sgd)
#   bash run.sh test [pytest args ...]              the test suite (what CI runs)
#   bash run.sh python ...                           anything else inside the venv
set -euo pipefail
cd "$(dirname "$0")"
VENV="${RAYEXP_VENV:-.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
STAMP="$VENV/.rayexp-installed-$(cat pyproject.toml run.sh | sha1sum | cut -c1-12)"

if [ ! -f "$STAMP" ]; then
  echo "rayexp: setting up $VENV with $($PYTHON --version) (first run only, a few minutes)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  pip_install() {  # quiet, minus the warnings of machine-wide find-links that don't exist here
    "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v -e "is ignored: it is neither" -e "^ *$" >&2)
  }
  pip_install --upgrade pip
  # torch pinned: 2.13.0 is the CPU wheel on this project's machines; an unpinned torch may pull CUDA builds.
  pip_install "torch==2.13.0"
  pip_install -e ".[dev,deepspeed,jax,hf,vision]"  # CI runs the jax backend's, HF models' and vision models' tests too
  rm -f "$VENV"/.rayexp-installed-*
  touch "$STAMP"
fi

export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"   # DeepSpeed on CPU-only machines (ignored when CUDA is present)
cmd="${1:-main}"; shift || true
case "$cmd" in
  main)   exec "$VENV/bin/python" -m rayexp.sweep "$@" ;;
  test)   exec "$VENV/bin/python" -m pytest -q "$@" ;;
  python) exec "$VENV/bin/python" "$@" ;;
  *)      echo "usage: bash run.sh main|test|python [args...]" >&2; exit 2 ;;
esac

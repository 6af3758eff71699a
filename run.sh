#!/usr/bin/env bash
# rayexp set-up and entry points. Creates ./.venv on first use (Python 3.11 + pip), bootstraps a pinned uv
# with pip and syncs the venv to requirements.lock (again only when the lock or this file change), then runs:
#   bash run.sh main [SWEEP.yaml] [key=value ...]   the main job: a sweep (default: the embedded adam_vs_sgd)
#   bash run.sh test [pytest args ...]              the test suite (what CI runs)
#   bash run.sh python ...                           anything else inside the venv
#   bash run.sh lock                                 re-resolve requirements.lock from pyproject.toml
set -euo pipefail
cd "$(dirname "$0")"
VENV="${RAYEXP_VENV:-.venv}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
LOCK=requirements.lock
UV_PIN="uv==0.13.9"
EXTRAS="dev deepspeed jax hf"   # the extras the lock (and so CI) installs; not vision: PyPI's torchvision is a CUDA build that does not load next to the CPU torch; torch's pin: pyproject's [tool.uv]

lock_inputs_sha() {  # what the lock is resolved from: pyproject's dependency tables and [tool.uv], the extras, uv
  "$PYTHON" - "$EXTRAS" "$UV_PIN" <<'EOF'
import hashlib, json, sys, tomllib
with open("pyproject.toml", "rb") as f:
    doc = tomllib.load(f)
project = doc["project"]
inputs = [project.get("dependencies"), project.get("optional-dependencies"), project.get("requires-python"),
          doc["build-system"].get("requires"), doc.get("tool", {}).get("uv"), sys.argv[1:]]
print(hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16])
EOF
}

quiet_pip() {  # pip minus the version nag and the warnings of machine-wide find-links that don't exist here
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q "$@" \
    2> >(grep -v -e "is ignored: it is neither" -e "^ *$" >&2)
}

uv_env() {  # uv reads no pip.conf: hand it the index and find-links pip is configured with (the CPU torch)
  local key val links=()
  while IFS='=' read -r key val; do
    val="${val#\'}"; val="${val%\'}"
    case "$key" in
      *.find-links) read -ra links <<<"$val" ;;
      *.extra-index-url) ;;
      *.index-url) export UV_DEFAULT_INDEX="$val" ;;
    esac
  done < <("$VENV/bin/python" -m pip config list 2>/dev/null)  # PIP_* variables come last, so they win
  if [ "${#links[@]}" -gt 0 ]; then UV_FIND_LINKS="$(IFS=,; echo "${links[*]}")"; export UV_FIND_LINKS; fi
  export UV_PYTHON="$VENV/bin/python" VIRTUAL_ENV="$VENV"
}

make_venv() {  # a venv with the pinned uv in it
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  [ "$("$VENV/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" = "${UV_PIN#uv==}" ] || quiet_pip "$UV_PIN"
  uv_env
}

write_lock() {  # bash run.sh lock: resolve pyproject.toml + extras for Python 3.11 on this platform
  local extra_args=() e
  for e in $EXTRAS; do extra_args+=(--extra "$e"); done
  "$VENV/bin/uv" pip compile -q pyproject.toml "${extra_args[@]}" --python-version 3.11 \
    --custom-compile-command "bash run.sh lock" -o "$LOCK.tmp"
  if grep -q "^nvidia-" "$LOCK.tmp"; then  # torch came from PyPI, not the CPU wheel
    echo "rayexp: the lock pulls nvidia-* packages: pip's find-links lack torch 2.13.0+cpu" >&2; exit 1
  fi
  { echo "# lock-inputs-sha256: $(lock_inputs_sha)"; cat "$LOCK.tmp"; } >"$LOCK"
  rm -f "$LOCK.tmp"
  echo "rayexp: wrote $LOCK" >&2
}

install() {  # sync the venv to the lock, then rayexp itself (editable, no deps, setuptools from the lock)
  echo "rayexp: setting up $VENV with $($PYTHON --version) from $LOCK (first run only)" >&2
  make_venv
  "$VENV/bin/uv" pip sync -q "$LOCK"
  "$VENV/bin/uv" pip install -q --no-deps --no-build-isolation -e .
  rm -f "$VENV"/.rayexp-installed-*
  touch "$STAMP"
}

cmd="${1:-main}"; shift || true
if [ "$cmd" = lock ]; then make_venv; write_lock; exit 0; fi
if [ "$(head -1 "$LOCK" | cut -d' ' -f3)" != "$(lock_inputs_sha)" ]; then
  echo "rayexp: $LOCK is stale (pyproject.toml's dependencies or run.sh's extras changed): run bash run.sh lock" >&2
  exit 2
fi
STAMP="$VENV/.rayexp-installed-$(cat "$LOCK" run.sh | sha1sum | cut -c1-12)"
[ -f "$STAMP" ] || install

export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"   # DeepSpeed on CPU-only machines (ignored when CUDA is present)
case "$cmd" in
  main)   exec "$VENV/bin/python" -m rayexp.sweep "$@" ;;
  test)   exec "$VENV/bin/python" -m pytest -q "$@" ;;
  python) exec "$VENV/bin/python" "$@" ;;
  *)      echo "usage: bash run.sh main|test|python|lock [args...]" >&2; exit 2 ;;
esac

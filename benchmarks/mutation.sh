#!/usr/bin/env bash
# Mutation testing of rayexp's core with mutmut 3 ([tool.mutmut] in pyproject.toml), outside CI.
#
#   bash benchmarks/mutation.sh [--sample N] [--seed S] [--tests-from REF] [--only GLOB] [--names FILE] [--keep DIR]
#
# Copies the working tree (tracked + untracked, not ignored) to a scratch directory, runs mutmut there at
# nice 19 (one worker: the machines are shared), and prints killed / tried per module. --sample N tries a
# seeded random sample of N mutants per module instead of all of them; --tests-from REF swaps in the tests/
# of another commit (the "before" score); --only GLOB restricts modules (mutmut names, e.g. 'rayexp.hessian.*');
# --names FILE tries exactly the mutants listed there (e.g. another run's names.txt). --keep DIR reuses DIR:
# a DIR that already holds mutmut's stats skips the copy and the test-to-function mapping.
# Exit codes mutmut records: killed (1/timeout), survived (0), no tests (33).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python)}"
SAMPLE=0 SEED=0 TESTS_FROM="" ONLY="rayexp.*" KEEP="" NAMES=""
while [ $# -gt 0 ]; do
  case "$1" in
    --sample) SAMPLE="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --tests-from) TESTS_FROM="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --keep) KEEP="$2"; shift 2 ;;
    --names) NAMES="$(realpath "$2")"; shift 2 ;;
    *) echo "usage: $0 [--sample N] [--seed S] [--tests-from REF] [--only GLOB] [--names FILE] [--keep DIR]" >&2; exit 2 ;;
  esac
done
WORK="${KEEP:-$(mktemp -d /tmp/rayexp-mutation-XXXX)}"
mkdir -p "$WORK"
if [ ! -f "$WORK/mutants/mutmut-stats.json" ]; then
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -f "$f" ] && mkdir -p "$WORK/$(dirname "$f")" && cp -p "$f" "$WORK/$f"; done
if [ -n "$TESTS_FROM" ]; then rm -rf "$WORK/tests"; git archive "$TESTS_FROM" tests | tar -x -C "$WORK"; fi
cd "$WORK"
# keep only the selected test files this tests/ has (an older tests/ lacks the newer files)
"$PY" - <<'PYEOF'
import re
from pathlib import Path
p = Path("pyproject.toml")
text = p.read_text()
sel = re.search(r"pytest_add_cli_args_test_selection = \[(.*?)\]", text, re.S)
kept = [f for f in re.findall(r'"([^"]+)"', sel.group(1)) if Path(f).exists()]
p.write_text(text[:sel.start(1)] + ", ".join(f'"{f}"' for f in kept) + text[sel.end(1):])
PYEOF
export OMP_NUM_THREADS=1 PYTHONPATH=""
echo "mutation: scratch $WORK, tests=${TESTS_FROM:-working tree}: generating mutants, mapping tests" >&2
# 1) generate every mutant and map tests to functions (mutmut runs the selected tests once for that);
#    a pattern that matches no mutant stops it there
nice -n 19 "$PY" -m mutmut run --max-children 1 "no.such.mutant*" >mutmut-setup.log 2>&1 || true
fi
cd "$WORK"
export OMP_NUM_THREADS=1 PYTHONPATH="" MUTMUT_SAMPLE="$SAMPLE" MUTMUT_SEED="$SEED" MUTMUT_ONLY="$ONLY"
# 2) the mutants to try: all, or a seeded sample per module
if [ -n "$NAMES" ]; then cp "$NAMES" names.txt; else "$PY" - >names.txt <<'PYEOF'
import fnmatch, json, os, random
from pathlib import Path
names = []
for meta in Path("mutants").rglob("*.meta"):
    names += json.loads(meta.read_text())["exit_code_by_key"]
names = sorted(n for n in names if fnmatch.fnmatch(n, os.environ["MUTMUT_ONLY"]))
n, rng = int(os.environ["MUTMUT_SAMPLE"]), random.Random(int(os.environ["MUTMUT_SEED"]))
by_module = {}
for name in names:
    by_module.setdefault(name.split(".x")[0].split(".xǁ")[0], []).append(name)
for module, ms in sorted(by_module.items()):
    print("\n".join(sorted(rng.sample(ms, min(n, len(ms)))) if n else ms))
PYEOF
fi
echo "mutation: trying $(wc -l <names.txt) mutants" >&2
xargs -a names.txt -d '\n' nice -n 19 "$PY" -m mutmut run --max-children 1 >mutmut-run.log 2>&1 || true
# 3) killed / tried per module
"$PY" - <<'PYEOF'
import json
from pathlib import Path
tried = set(Path("names.txt").read_text().split())
rows, survivors = {}, []
for meta in Path("mutants").rglob("*.meta"):
    for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
        if name not in tried:
            continue
        module = name.split(".x")[0].split(".xǁ")[0]
        r = rows.setdefault(module, [0, 0, 0, 0])
        r[0] += 1
        r[1] += code not in (0, 33, None)
        r[2] += code == 0
        r[3] += code == 33
        if code in (0, 33):
            survivors.append(f"{name} {'survived' if code == 0 else 'no tests'}")
print(f"{'module':40} {'tried':>6} {'killed':>7} {'survived':>9} {'no tests':>9} {'score':>6}")
tot = [0, 0, 0, 0]
for module, r in sorted(rows.items()):
    tot = [a + b for a, b in zip(tot, r)]
    print(f"{module:40} {r[0]:6d} {r[1]:7d} {r[2]:9d} {r[3]:9d} {100 * r[1] / max(r[0], 1):5.1f}%")
print(f"{'total':40} {tot[0]:6d} {tot[1]:7d} {tot[2]:9d} {tot[3]:9d} {100 * tot[1] / max(tot[0], 1):5.1f}%")
Path("survivors.txt").write_text("\n".join(sorted(survivors)) + "\n")
PYEOF
echo "mutation: survivors in $WORK/survivors.txt (mutmut show NAME there for a diff)" >&2

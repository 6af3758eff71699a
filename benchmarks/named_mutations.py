"""The deliberate bugs of issue 16, each applied alone to a scratch copy of the working tree, and the tests that
must kill it. ``python benchmarks/named_mutations.py [--only N,M] [--fast]`` prints one row per mutation:
the tests' exit status under the mutation (non-zero = killed) and whether the text was found exactly once.
The copy lives in a temporary directory; the working tree is never modified. --fast skips rows marked slow."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
E = "tests/test_edges.py::"
HE = "tests/test_hessian_estimators.py::"
T = "tests/test_estimators_truth.py::"

# (name, file, old text, new text, tests that must fail, slow)
MUTATIONS = [
    ("Lanczos: β·q_{j−1} term dropped", "rayexp/hessian/lanczos.py",
     "w = w.to(r.q) - a * r.q - r.b_prev * r.q_prev", "w = w.to(r.q) - a * r.q",
     [E + "test_three_term_recurrence_alone_gives_the_extremes_of_eigvalsh",
      "tests/test_hessian.py::test_lanczos_recurrence_matches_numpy_transcription"], False),
    ("Lanczos: β·q_{j−1} sign flipped", "rayexp/hessian/lanczos.py",
     "w = w.to(r.q) - a * r.q - r.b_prev * r.q_prev", "w = w.to(r.q) - a * r.q + r.b_prev * r.q_prev",
     [E + "test_three_term_recurrence_alone_gives_the_extremes_of_eigvalsh"], False),
    ("Lanczos lockstep (lanczos_batch): β term dropped when several runs advance", "rayexp/hessian/lanczos.py",
     "w = w.to(r.q) - a * r.q - r.b_prev * r.q_prev",
     "w = w.to(r.q) - a * r.q - (r.b_prev * r.q_prev if len(runs) == 1 else 0)",
     [E + "test_lockstep_runs_without_reorthogonalization_each_follow_the_numpy_recurrence"], False),
    ("divergence: 10× rule dropped", "rayexp/train/loop.py",
     "return loss > self.t.diverge_factor * self.init_loss", "return False",
     [E + "test_a_loss_above_ten_times_the_first_step_diverges_and_below_it_does_not"], False),
    ("divergence: non-finite check dropped", "rayexp/train/loop.py",
     "if not math.isfinite(loss):\n            return True", "if False:\n            return True",
     [E + "test_a_non_finite_loss_diverges_even_below_ten_times_the_first"], False),
    ("divergence: reference loss reset every step", "rayexp/train/loop.py",
     "return loss > self.t.diverge_factor * self.init_loss",
     "out, self.init_loss = loss > self.t.diverge_factor * self.init_loss, loss\n        return out",
     [E + "test_the_reference_loss_is_the_first_steps_and_is_never_reset"], False),
    ("Hutchinson: trace ×1.2 and its standard error ×10", "rayexp/hessian/estimators.py",
     'out = {"trace": float(s["vhv"].mean()), "trace_se": se(s["vhv"]),',
     'out = {"trace": 1.2 * float(s["vhv"].mean()), "trace_se": 10 * se(s["vhv"]),',
     [T + "test_hutchinson_spread_and_reported_se_equal_the_closed_form",
      HE + "test_hutchinson_is_within_its_true_standard_error_and_reports_it"], False),
    ("Hutchinson: Frobenius ×1.2 and its standard error ×10", "rayexp/hessian/estimators.py",
     '"frobenius_sq": fro2, "frobenius_sq_se": se(s["hv2"]),',
     '"frobenius_sq": 1.2 * fro2, "frobenius_sq_se": 10 * se(s["hv2"]),',
     [T + "test_hutchinson_spread_and_reported_se_equal_the_closed_form",
      HE + "test_hutchinson_on_a_diagonally_dominant_matrix_is_sharp"], False),
    ("Cauchy 1-1: median ×1.05", "rayexp/hessian/estimators.py",
     "out.append(torch.quantile(part.abs(), 0.5, dim=1))", "out.append(1.05 * torch.quantile(part.abs(), 0.5, dim=1))",
     [HE + "test_cauchy_l11_is_unbiased_to_2_percent_with_many_vectors"], False),
    ("l11_exact_rows sorts the rows asked for", "rayexp/hessian/estimators.py",
     "rows, lo, n_local = list(rows),", "rows, lo, n_local = sorted(rows),",
     [HE + "test_l11_exact_rows_in_any_order_and_row_sample",
      "tests/test_properties.py::test_exact_rows_come_back_in_the_order_asked"], False),
    ("train resume restarts from step 0 (checkpoint ignored)", "rayexp/train/loop.py",
     "    if resume_from:\n        state = restore(", "    if False:\n        state = restore(",
     ["tests/test_train.py::test_resume_from_checkpoint_reproduces_losses_exactly"], False),
    ("train --resume ignores the checkpoint's config", "rayexp/train/__main__.py",
     "    own = checkpoint_experiment(ckpt)", "    own = load_sweep(None, []).experiment()",
     ["tests/test_userpath.py::test_train_resume_continues_the_checkpoints_own_optimizer_and_lr"], True),
    ("a per-optimizer block silently beats a generic override", "rayexp/spaces.py",
     "            if all(self.shadowed(key, n) for n in names):", "            if False:",
     ["tests/test_userpath.py::test_a_generic_override_every_optimizer_block_shadows_is_an_error_naming_them"], True),
    ("more actors than batches: shares of n // world batches", "rayexp/hessian/distributed.py",
     "    cuts = [round(i * n / world) for i in range(world + 1)]",
     "    cuts = [min(i * (n // world or 1), n) for i in range(world + 1)]",
     ["tests/test_properties.py::test_batch_shares_cover_every_batch_once_contiguously_and_balanced",
      "tests/test_hessian_distributed.py::test_sharded_equals_in_process"], True),
    ("DeepSpeed's refusal only inside a trial (the pre-flight check this issue added, removed)",
     "rayexp/sweep/preflight.py",
     '    if spec.base.resources.strategy == "deepspeed" or "resources.strategy" in spec.spaces:', "    if False:",
     ["tests/test_cli_paths.py::test_deepspeed_with_a_whole_tensor_optimizer_exits_2_before_ray"], True),
]


def mutmut_row(workdir: str, name: str, tests: str):
    """(name, file, old line, new line, tests, slow) from ``mutmut show NAME`` run in ``workdir``."""
    diff = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=workdir, capture_output=True,
                          text=True).stdout.splitlines()
    file = next(line[4:] for line in diff if line.startswith("--- "))
    old = "\n".join(line[1:] for line in diff if line.startswith("-") and not line.startswith("---"))
    new = "\n".join(line[1:] for line in diff if line.startswith("+") and not line.startswith("+++"))
    return name, file, old, new, tests.split(","), False


def copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="", help="comma-separated row numbers (1-based)")
    ap.add_argument("--fast", action="store_true", help="skip the rows marked slow (subprocess training, Ray)")
    ap.add_argument("--mutmut-dir", help="a benchmarks/mutation.sh scratch dir: with --mutant, its mutants instead")
    ap.add_argument("--mutant", action="append", default=[], metavar="NAME=TEST[,TEST]",
                    help="a mutmut mutant (its one-line diff from `mutmut show`) and the tests that must kill it")
    args = ap.parse_args(argv)
    only = {int(x) for x in args.only.split(",") if x}
    if args.mutant:
        global MUTATIONS
        MUTATIONS = [mutmut_row(args.mutmut_dir, *m.split("=", 1)) for m in args.mutant]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("| # | mutation | file | killed by | result |\n|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory(prefix="rayexp-named-mutations-") as tmp:
        work = Path(tmp)
        copy_tree(work)
        env["PYTHONPATH"] = str(work)
        failures = 0
        for i, (name, file, old, new, tests, slow) in enumerate(MUTATIONS, 1):
            if (only and i not in only) or (args.fast and slow):
                continue
            path = work / file
            text = path.read_text()
            if text.count(old) != 1:
                print(f"| {i} | {name} | {file} | - | text found {text.count(old)}× (not applied) |", flush=True)
                failures += 1
                continue
            path.write_text(text.replace(old, new))
            try:
                out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
                                     cwd=work, env=env, capture_output=True, text=True)
            finally:
                path.write_text(text)
            failed = sorted({line.split()[1].split("[")[0] for line in out.stdout.splitlines()
                             if line.startswith("FAILED ")})
            killers = [t for t in tests if any(f == t or f.startswith(t) for f in failed)]
            verdict = f"killed ({len(failed)} failed)" if out.returncode == 1 else f"NOT killed (pytest exit {out.returncode})"
            failures += out.returncode != 1
            shown = "<br>".join(f"`{t.split('/')[-1]}`" + ("" if t in killers else " (passed)") for t in tests)
            print(f"| {i} | {name} | `{file}` | {shown} | {verdict} |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

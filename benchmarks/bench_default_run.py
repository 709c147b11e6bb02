"""Wall time of the main job, as a user runs it: `policysearch run --strategy sqnr_diff`.

    python benchmarks/bench_default_run.py [--against DIR] [--rounds 3]

Runs the CLI in a fresh process (interpreter start, imports and model load included) in a
temporary results folder and prints the wall time against the 60 s budget of the issue.

``--against DIR``: a checkout of another version of policysearch (e.g. the commit before the
integer engine: ``git worktree add /tmp/before 717256f``), run the same way with ``DIR`` first on
``PYTHONPATH``; the two alternate for ``--rounds`` rounds and the medians and the median of the
per-round ratios are printed. Meaningful only on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run_once(tree: Path) -> tuple[float, str]:
    """Seconds of one default run with ``tree`` first on the path, and its first printed line."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "policysearch.cli", "run", "--strategy", "sqnr_diff", "--no-progress",
               "--results-dir", tmp, "--run-name", "bench"]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run with {tree} failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stdout.strip().splitlines()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", type=Path, default=None, help="another policysearch checkout to time side by side")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3 with --against, else 1)")
    args = ap.parse_args()
    trees = {"this": HERE} | ({"against": args.against.resolve()} if args.against else {})
    rounds = args.rounds or (3 if args.against else 1)
    times: dict[str, list[float]] = {k: [] for k in trees}
    first: dict[str, str] = {}
    for _ in range(rounds):
        for k, tree in trees.items():
            wall, first[k] = run_once(tree)
            times[k].append(wall)
    for k, tree in trees.items():
        print(f"policysearch run --strategy sqnr_diff ({k}: {tree}): median {statistics.median(times[k]):.1f} s wall "
              f"of {rounds} (budget 60 s, 2 cores); it printed: {first[k]}")
    if args.against:
        r = statistics.median(a / b for a, b in zip(times["this"], times["against"], strict=True))
        print(f"this / against: {r:.2f} (median of per-round ratios)")


if __name__ == "__main__":
    main()

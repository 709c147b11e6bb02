"""Wall time of the main job, as a user runs it: `policysearch run --strategy sqnr_diff`.

    python benchmarks/bench_default_run.py

Runs the CLI in a fresh process (interpreter start, imports and model load included) in a
temporary results folder and prints the wall time against the 60 s budget of the issue.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "policysearch.cli", "run", "--strategy", "sqnr_diff", "--no-progress",
               "--results-dir", tmp, "--run-name", "bench"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"run failed:\n{proc.stderr[-2000:]}")
    print(proc.stdout.strip().splitlines()[0])
    print(f"policysearch run --strategy sqnr_diff: {wall:.1f} s wall (budget 60 s, 2 cores)")


if __name__ == "__main__":
    main()

"""The accuracy-latency Pareto front of a finished run, as a markdown table.

    python reproduce/pareto.py RUN [--results-dir results] [--out results/pareto.md]

Reads every evaluation of ``results/RUN/run.json`` (each carries ``top1`` and, under a latency
objective or constraint, ``latency``: the policy's latency relative to the float model as the
cost profile predicts it) and lists the non-dominated ones (no other evaluation is both faster and
at least as accurate), sorted by latency, with their method counts. The same front is the study's
``best_trials`` for a two-objective run (optuna-dashboard's Pareto-front plot) and the report's
accuracy-latency figure.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from policysearch.errors import ConfigError
from policysearch.numerics import NUMERICS_VERSION
from policysearch.report.figures import pareto_front

__all__ = ["pareto_rows", "pareto_table"]


def pareto_rows(record: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """The front's evaluations (sorted by latency) and the number of evaluations with a latency."""
    evals = [e for e in record.get("evaluations", ()) if e.get("error") is None
             and isinstance(e.get("latency"), (int, float)) and isinstance(e.get("top1"), (int, float))]
    if not evals:
        raise ConfigError(f"run {record.get('name')!r} has no evaluation with a latency: run it with a latency "
                          "objective (--objective accuracy_and_latency) or --max-latency")
    front = pareto_front([(float(e["latency"]), float(e["top1"])) for e in evals])
    return [evals[i] for i in front], len(evals)


def _counts(e: dict[str, Any]) -> str:
    return "; ".join(f"{k}: " + ", ".join(f"{m} {n}" for m, n in sorted(v.items()))
                     for k, v in e.get("counts", {}).items())


def _numerics_line(version: str | None) -> str:
    if version is None:
        return "Numerics: the run records no numerics version; not regenerated."
    if version != NUMERICS_VERSION:
        return (f"Numerics: made with an earlier numerics version ({version}); the current code's is "
                f"{NUMERICS_VERSION}; not regenerated.")
    return f"Numerics: made with numerics {version}, the current code's."


def pareto_table(run: str, *, results_dir: str | Path = "results", command: str | None = None,
                 run_command: str | None = None) -> str:
    from policysearch.run import RunRecord, resolve_run_dir

    record = RunRecord.load(resolve_run_dir(run, results_dir)).data
    front, n = pareto_rows(record)
    cfg = record.get("config", {})
    answer = record.get("answer", {}).get("policy")
    answer_key = answer if isinstance(answer, str) else None
    lines = [f"### Pareto front of run `{record.get('name')}`", "",
             f"Produced by `{command or f'python reproduce/pareto.py {run}'}`: model {cfg.get('model')}, "
             f"strategy {cfg.get('strategy')}, objective {record.get('objective', {}).get('name')}, space "
             f"{cfg.get('space')}, data {cfg.get('data')} ({cfg.get('eval_size')} evaluation images per policy). "
             f"{len(front)} of {n} evaluated policies are non-dominated. Latency: relative to the float model, "
             "predicted from the run's cost profile (`policysearch profile`; emulated kernels, a proxy: the "
             "int8 runtime check is the ground truth)."
             + (f" The run: `{run_command}`." if run_command else ""), "",
             _numerics_line(record.get("numerics")), "",
             "| relative latency | top-1 (%) | KL | methods per kind | policy |", "|---:|---:|---:|---|---|"]
    for e in front:
        kl = e.get("kl")
        mark = " (answer)" if answer_key is not None and e.get("policy") == answer_key else ""
        lines.append(f"| {e['latency']:.3f} | {100 * e['top1']:.2f} | "
                     f"{'' if kl is None or not math.isfinite(kl) else f'{kl:.4f}'} | {_counts(e)} | "
                     f"`{e.get('policy')}`{mark} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--out", default=None, help="write the table to this file (default: print it)")
    ap.add_argument("--run-command", default=None, help="the command that made the run, quoted in the table")
    args = ap.parse_args(argv)
    command = "python reproduce/pareto.py " + " ".join(map(shlex.quote, argv if argv is not None
                                                                       else sys.argv[1:]))
    try:
        text = pareto_table(args.run, results_dir=args.results_dir, command=command, run_command=args.run_command)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Reproduction of the paper's Table 2: the readings of the SQNR rule on both zoo models.

    python -m policysearch.report.table2 --data fmnist-sample --out results/table2.md

For each model and bit width, the uniform policies are evaluated once and shared; each rule
(``sqnr_diff``: lowest beta - gamma, eq. 11 read literally; ``sqnr_drop``: lowest gamma - beta;
``sqnr_absdiff``: lowest |beta - gamma|; ``sqnr_output``: highest beta) then picks per site from
those runs, and its mixed policy is evaluated. Reported: top-1 (%) of float, each uniform policy
and each rule's policy, with the method counts, logit SQNR and mean beta - gamma of each rule's
policy. SQNR is stored in dB in the 20·log10 convention; ``--db 10`` prints it in 10·log10
(exactly half; the rules' picks are the same in both).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from policysearch.objectives.sqnr import convert_db
from policysearch.result import EvalResult
from policysearch.spaces import load_space
from policysearch.spec import EvaluatorSpec, get_evaluator, resolve_device
from policysearch.strategies import create_strategy

RULES = ("sqnr_diff", "sqnr_drop", "sqnr_absdiff", "sqnr_output")


def _counts(policy) -> str:  # noqa: ANN001
    c = policy.method_counts()
    return "; ".join(f"{k}: " + ", ".join(f"{m} {n}" for m, n in sorted(v.items())) for k, v in c.items())


class _Cached:
    """Evaluate each policy once: the rules share the uniform runs."""

    def __init__(self, evaluator: object) -> None:
        self.evaluator = evaluator
        self.cache: dict[str, EvalResult] = {}

    def evaluate(self, policy: object) -> EvalResult:
        key = policy.key()
        if key not in self.cache:
            self.cache[key] = self.evaluator.evaluate(policy)
        return self.cache[key]


def run(models: list[str], data: str, bits: list[int], device: str, eval_size: int | None,
        db: int = 20) -> list[str]:
    """The table's lines; SQNR columns in dB in the ``db``·log10 convention (10 or 20)."""
    convert_db(0.0, 20, db)  # a bad db fails before any model is loaded
    rows, details = [], []
    for model in models:
        ev = get_evaluator(EvaluatorSpec(model=model, data=data, device=device, eval_size=eval_size))
        for b in bits:
            space = load_space("paper", ev.sites, weight_bits=b, act_bits=b)
            evaluate = _Cached(ev).evaluate
            uniform = {m: evaluate(p) for m, p in space.uniform_policies().items()}
            row = [model, f"W{b}A{b}", f"{100 * ev.float_metrics['top1']:.2f}"]
            row += [f"{100 * uniform[m].metrics['top1']:.2f}" for m in ("ibert", "fqvit", "ivit")]
            for rule in RULES:
                strategy = create_strategy(rule, space, directions=("minimize",))
                while batch := strategy.ask(4):
                    for p in batch:
                        strategy.tell(p, evaluate(p))
                policy, res = strategy.best()
                row.append(f"{100 * res.metrics['top1']:.2f}")
                sqnr = [f"{convert_db(res.metrics[k], 20, db):.2f}" for k in ("logit_sqnr", "mean_sqnr_diff")]
                details.append(f"| {model} | W{b}A{b} | {rule} | {_counts(policy)} | {' | '.join(sqnr)} |")
                logging.info("%s W%dA%d %s: %s", model, b, b, rule, row[-1])
            rows.append("| " + " | ".join(row) + " |")
    head = ["model", "bits", "float", "uniform ibert", "uniform fqvit", "uniform ivit", *RULES]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows]
    counts = [f"| model | bits | rule | methods chosen per kind | logit SQNR (dB, {db}·log10) "
              f"| mean beta - gamma (dB, {db}·log10) |", "|---|---|---|---|---|---|", *details]
    return table + ["", "Methods each rule chose:", "", *counts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist_vit", "fmnist_swin"])
    ap.add_argument("--data", default="fmnist-sample")
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6])
    ap.add_argument("--eval-size", type=int, default=None, help="default: every evaluation image")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/table2.md")
    ap.add_argument("--db", type=int, choices=(20, 10), default=20,
                    help="print SQNR in 20·log10 (the paper's eq. 10, as stored) or 10·log10 dB")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    device = resolve_device(args.device)
    lines = run(args.models, args.data, args.bits, device, args.eval_size, db=args.db)
    cmd = f"python -m policysearch.report.table2 --data {args.data} --out {args.out}"
    cmd += f" --db {args.db}" if args.db != 20 else ""
    text = (f"# SQNR rules compared (the paper's Table 2 on the zoo models)\n\n"
            f"Produced by `{cmd}` (device {device}, torch {torch.__version__}, {time.time() - t0:.0f} s). "
            "Top-1 (%) on the evaluation images of the data; space `paper` (softmax and LayerNorm from "
            "ibert/fqvit/ivit, GELU from ibert/ivit); per-site SQNR (eq. 10) measured on 64 calibration "
            "images in each method's uniform run.\n\n" + "\n".join(lines) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

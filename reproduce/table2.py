"""Reproduction of the paper's Table 2: the readings of the SQNR rule on both zoo models.

    python reproduce/table2.py --data fmnist --out results/table2.md [--bits 8] [--append]
    python reproduce/table2.py --render   # results/table2.md from its record, results/table2.json

For each model and bit width, the uniform policies are evaluated once and shared; each rule
(``sqnr_diff``: lowest beta - gamma, eq. 11 read literally; ``sqnr_drop``: lowest gamma - beta;
``sqnr_absdiff``: lowest |beta - gamma|; ``sqnr_output``: highest beta) then picks per site from
those runs, and its mixed policy is evaluated. Reported: top-1 (%) of float, each uniform policy
and each rule's policy, with the method counts, logit SQNR and mean beta - gamma of each rule's
policy. SQNR is stored in dB in the 20·log10 convention; ``--db 10`` prints it in 10·log10
(exactly half; the rules' picks are the same in both). Every top-1 is followed by its difference
from the best uniform method of the same model, bits and wiring with a paired 95% interval
(``policysearch.stats``); both wirings, ``paper`` and ``native``, are run side by side.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from policysearch.errors import PolicySearchError
from policysearch.numerics import NUMERICS_VERSION
from policysearch.objectives.sqnr import convert_db
from policysearch.result import EvalResult
from policysearch.spaces import load_space
from policysearch.spec import EvaluatorSpec, get_evaluator, resolve_device
from policysearch.stats import best_of, cell
from policysearch.strategies import create_strategy

RULES = ("sqnr_diff", "sqnr_drop", "sqnr_absdiff", "sqnr_output")


def _counts(policy) -> str:  # noqa: ANN001
    c = policy.method_counts()
    return "; ".join(f"{k}: " + ", ".join(f"{m} {n}" for m, n in sorted(v.items())) for k, v in c.items())


class _Cached:
    """Evaluate each policy once: the rules share the uniform runs. Keeps each one's predictions."""

    def __init__(self, evaluator: object) -> None:
        self.evaluator = evaluator
        self.cache: dict[str, EvalResult] = {}
        self.predictions: dict[str, torch.Tensor | None] = {}

    def evaluate(self, policy: object) -> EvalResult:
        key = policy.key()
        if key not in self.cache:
            res = self.cache[key] = self.evaluator.evaluate(policy)
            self.predictions[key] = self.evaluator.last_predictions if res.ok else None
        return self.cache[key]


HEAD = ["model", "wiring", "bits", "policy", "top-1 (difference from best uniform [paired 95%])",
        "methods per kind (Table 3)"]


def run(models: list[str], data: str, bits: list[int], device: str, eval_size: int | None,
        db: int = 20, wirings: tuple[str, ...] = ("paper", "native"),
        on_block: Callable[[list[str], int], None] | None = None) -> tuple[list[str], int]:
    """The table's rows and the number of evaluation images; SQNR in dB, ``db``·log10 (10 or 20).

    ``on_block(rows, n)`` is called after each (model, wiring, bits) block with the rows so far, so
    that a long run keeps what it has finished."""
    convert_db(0.0, 20, db)  # a bad db fails before any model is loaded
    rows, n = [], 0
    for model in models:
        for wiring in wirings:
            # reuse=False: the rules' policies change the first sites, so activation reuse saves little
            # here, while keeping every segment input of 10,000 images costs gigabytes
            ev = get_evaluator(EvaluatorSpec(model=model, data=data, device=device, eval_size=eval_size,
                                             wiring=wiring, reuse=False))
            labels = ev.labels.cpu()
            n = labels.numel()
            for b in bits:
                space = load_space("paper", ev.sites, weight_bits=b, act_bits=b)
                cached = _Cached(ev)
                uniform = {m: (p, cached.evaluate(p)) for m, p in space.uniform_policies().items()}
                results = {f"uniform {m}": pr for m, pr in uniform.items()}
                for rule in RULES:
                    strategy = create_strategy(rule, space, directions=("minimize",))
                    while batch := strategy.ask(4):
                        for p in batch:
                            strategy.tell(p, cached.evaluate(p))
                    results[rule] = strategy.best()
                    logging.info("%s %s W%dA%d %s: %.2f", model, wiring, b, b, rule,
                                 100 * results[rule][1].metrics.get("top1", float("nan")))
                preds = {k: cached.predictions[p.key()] for k, (p, _) in results.items()}
                best = best_of({k: preds[k] for k in preds if k.startswith("uniform ")}, labels)
                ref = preds[best] if best is not None else None
                first = f"| {model} | {wiring} | W{b}A{b} "
                rows.append(first + f"| float | {cell(ev.float_predictions, ref, labels)} | | | |")
                for k, (policy, res) in results.items():
                    sqnr = [f"{convert_db(res.metrics[m], 20, db):.2f}" if res.ok else ""
                            for m in ("logit_sqnr", "mean_sqnr_diff")]
                    rows.append(first + f"| {k} | {cell(preds[k], ref, labels, is_best=k == best)} | "
                                f"{_counts(policy)} | {' | '.join(sqnr)} |")
                if on_block is not None:
                    on_block(list(rows), n)
    return rows, n


STATE_FORMAT = "policysearch.table2/v1"


def numerics_line(version: str, *, commit: str | None = None, note: str | None = None) -> str:
    """Which numerics version made the rows, and whether the current code still does."""
    at = f" (commit {commit})" if commit else ""
    if version != NUMERICS_VERSION:
        return (f"Numerics: made with an earlier numerics version ({version}){at}; the current code's is "
                f"{NUMERICS_VERSION}; not regenerated.")
    return f"Numerics: made with numerics {version}{at}" + (f"; not regenerated: {note}." if note else ", the current code's.")


def render(rows: list[str], *, commands: list[str], n: int, data: str, db: int, numerics: str = NUMERICS_VERSION,
           commit: str | None = None, note: str | None = None) -> str:
    """The markdown file: header naming every command whose rows it holds, its numerics, and the table."""
    head = [*HEAD, f"logit SQNR (dB, {db}·log10)", f"mean beta - gamma (dB, {db}·log10)"]
    return ("# SQNR rules compared (the paper's Table 2 on the zoo models)\n\n"
            "Produced by " + ", then ".join(f"`{c}`" for c in commands) + f" (torch {torch.__version__}). "
            f"Top-1 (%) on the {n} evaluation images of `{data}`; space `paper` (softmax and LayerNorm from "
            "ibert/fqvit/ivit, GELU from ibert/ivit); per-site SQNR (eq. 10) measured on 64 calibration "
            "images in each method's uniform run.\n\n"
            "Each top-1 is followed by its difference from the best uniform method of the same model, wiring "
            "and bits (in bold), in points, with a paired 95% interval over the same images; `*` marks an "
            "interval that excludes 0, a difference that is not noise. The methods column is the paper's "
            "Table 3 (counts per kind).\n\n"
            + numerics_line(numerics, commit=commit, note=note) + "\n\n"
            + "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows])
            + "\n\nThe earlier `native`-wiring table (the shipped sample, no intervals) is kept in "
            "`results/table2-native.md`.\n")


def read_state(path: Path) -> dict[str, Any] | None:
    """The rows and commands a previous run recorded in ``path`` (JSON), or None."""
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("format") != STATE_FORMAT:
        raise PolicySearchError(f"{path}: not a Table 2 record (format {state.get('format')!r})")
    return state


def write_state(path: Path, *, rows: list[str], commands: list[str], n: int, data: str, db: int) -> None:
    state = {"format": STATE_FORMAT, "commands": commands, "numerics": NUMERICS_VERSION, "data": data, "db": db,
             "n": n, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1, ensure_ascii=False) + "\n")


def render_file(state_path: Path, out: Path) -> None:
    """Write ``out`` from the recorded rows of ``state_path``."""
    state = read_state(state_path)
    if state is None:
        raise PolicySearchError(f"{state_path} does not exist: run this script first")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(state["rows"], commands=state["commands"], n=state["n"], data=state["data"], db=state["db"],
                          numerics=state["numerics"], commit=state.get("commit"), note=state.get("note")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist_vit", "fmnist_swin"])
    ap.add_argument("--data", default="fmnist")
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6])
    ap.add_argument("--eval-size", type=int, default=None, help="default: every evaluation image")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--wirings", nargs="+", choices=["paper", "native"], default=["paper", "native"])
    ap.add_argument("--out", default="results/table2.md")
    ap.add_argument("--record", default=None,
                    help="the JSON record of the rows (default: --out with .json): what --append and --render read")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already recorded (by this script) and add these")
    ap.add_argument("--render", action="store_true", help="only write --out from the JSON record")
    ap.add_argument("--db", type=int, choices=(20, 10), default=20,
                    help="print SQNR in 20·log10 (the paper's eq. 10, as stored) or 10·log10 dB")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    record = Path(args.record) if args.record else out.with_suffix(".json")
    if args.render:
        render_file(record, out)
        print(out.read_text())
        return
    t0 = time.time()
    device = resolve_device(args.device)
    cmd = "python reproduce/table2.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    prev = read_state(record) if args.append else None
    if prev is not None and (prev["data"], prev["db"]) != (args.data, args.db):
        raise SystemExit(f"error: {record} holds rows of --data {prev['data']} --db {prev['db']}; --append needs the same")
    if prev is not None and (prev["numerics"] != NUMERICS_VERSION or prev.get("note")):
        raise SystemExit(f"error: {record} holds rows made with numerics {prev['numerics']} that this code "
                         f"({NUMERICS_VERSION}) does not reproduce; regenerate them instead of --append")
    old_rows, commands = (prev["rows"], [*prev["commands"], cmd]) if prev else ([], [cmd])

    def write(rows: list[str], n: int) -> None:
        write_state(record, rows=[*old_rows, *rows], commands=commands, n=n, data=args.data, db=args.db)
        render_file(record, out)

    rows, n = run(args.models, args.data, args.bits, device, args.eval_size, db=args.db,
                  wirings=tuple(args.wirings), on_block=write)
    write(rows, n)
    logging.info("%s written (%.0f s)", out, time.time() - t0)
    print(out.read_text())


if __name__ == "__main__":
    main()

"""Baseline table of the zoo models: float and uniform-method top-1 at 8 and 6 bits, per wiring.

    python reproduce/zoo_table.py --data fmnist --out results/zoo.md [--wirings paper] [--append]
    python reproduce/zoo_table.py --render   # results/zoo.md from its record, results/zoo.json

Uniform policies as the paper's baselines: all sites ``ibert``; all ``ivit``; all ``fqvit`` with
GELU from I-BERT, and with GELU from I-ViT (FQ-ViT has no integer GELU). Weights and activations
at the same bit width. Top-1 on every evaluation image of ``--data`` (``fmnist``: the full
10,000-image Fashion-MNIST test set); every top-1 is followed by its difference from the best
uniform policy of the same model, bits and wiring, with a paired 95% interval
(``policysearch.stats``). Both wirings (``paper``: one integer pipeline for every method;
``native``: each method wired as its own paper wires it) are evaluated side by side.

The rows, the commands, the numerics version and the image count are recorded in a JSON file
(``--record``, default ``--out`` with ``.json``); the Markdown is rendered from that record only.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from policysearch.errors import PolicySearchError
from policysearch.numerics import NUMERICS_VERSION
from policysearch.policy import Policy
from policysearch.spec import EvaluatorSpec, get_evaluator, resolve_device
from policysearch.stats import best_of, cell

POLICIES = {
    "ibert": ("ibert", {}),
    "ivit": ("ivit", {}),
    "fqvit + I-BERT GELU": ("fqvit", {"gelu": "ibert"}),
    "fqvit + I-ViT GELU": ("fqvit", {"gelu": "ivit"}),
}
HEAD = ["model", "wiring", "bits", "float", *POLICIES]
STATE_FORMAT = "policysearch.zoo/v1"
log = logging.getLogger(__name__)


def build_table(models: list[str], data: str, bits: list[int], device: str, wirings: list[str],
                eval_size: int | None = None,
                on_row: Callable[[list[str], int], None] | None = None) -> tuple[list[str], int]:
    """The table's rows and the number of evaluation images; ``on_row(rows, n)`` after each row."""
    rows, n = [], 0
    for model in models:
        for wiring in wirings:
            # reuse=False: uniform policies share no prefix; keeping segment inputs of 10,000 images costs gigabytes
            ev = get_evaluator(EvaluatorSpec(model=model, data=data, device=device, wiring=wiring,
                                             eval_size=eval_size, reuse=False))
            labels = ev.labels.cpu()
            n = labels.numel()
            for b in bits:
                preds: dict[str, torch.Tensor | None] = {}
                for name, (method, fallback) in POLICIES.items():
                    policy = Policy.uniform(ev.sites, method, fallback=fallback, act_bits=b, weight_bits=b)
                    res = ev.evaluate(policy)
                    preds[name] = ev.last_predictions if res.ok else None
                    log.info("%s %s %s %d-bit: %s", model, wiring, name, b,
                             f"{100 * res.metrics['top1']:.2f}" if res.ok else res.error)
                best = best_of(preds, labels)
                ref = preds[best] if best is not None else None
                cells = [cell(preds[k], ref, labels, is_best=k == best) for k in POLICIES]
                rows.append(f"| {model} | {wiring} | W{b}A{b} | {cell(ev.float_predictions, ref, labels)} | "
                            + " | ".join(cells) + " |")
                if on_row is not None:
                    on_row(list(rows), n)
    return rows, n


def numerics_line(version: str | None, *, commit: str | None = None, note: str | None = None) -> str:
    """The sentence that states which numerics version made a table, and whether the code still does."""
    at = f" (commit {commit})" if commit else ""
    if version is None:
        return (f"Numerics: made{f' at commit {commit},' if commit else ''} before numerics versions existed (the "
                "first, 2026.12.1, is in `policysearch/numerics.py` since commit 982ebc6); not regenerated.")
    if version != NUMERICS_VERSION:
        return (f"Numerics: made with an earlier numerics version ({version}){at}; the current code's is "
                f"{NUMERICS_VERSION}; not regenerated.")
    return f"Numerics: made with numerics {version}{at}" + (f"; not regenerated: {note}." if note else
                                                             ", the current code's.")


def _table(columns: list[str], rows: list[str]) -> str:
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), *rows])


def render(state: dict[str, Any]) -> str:
    """The Markdown file from a record (see :func:`write_state`); kept tables after the main one."""
    commands = ", then ".join(f"`{c}`" for c in state["commands"])
    parts = ["# Zoo baselines: top-1 (%) in float and under uniform integer-only policies\n",
             f"Produced by {commands} ({state['n']} evaluation images of `{state['data']}`, calibration on the "
             f"data's calibration split, device {state['device']}, torch {state['torch']}, Python {state['python']}, "
             f"{state['seconds']:.0f} s).\n",
             numerics_line(state["numerics"], commit=state.get("commit"), note=state.get("note")) + "\n",
             _table(HEAD, state["rows"]) + "\n",
             "Each cell: top-1, then its difference from the best uniform policy of its row (in bold) in points, "
             "with a paired 95% interval over the same images; `*` marks an interval that excludes 0, i.e. a "
             "difference that is not noise. The float cell compares float with that best uniform policy.\n",
             "Uniform policies: every softmax, GELU and LayerNorm site runs the named method; FQ-ViT has no "
             "integer GELU, so its GELU sites run I-BERT's or I-ViT's. Weights per channel and activations per "
             "tensor at the same bit width (W/A). Wirings: `paper` runs every method inside one integer pipeline "
             "after I-ViT's reference code (`policysearch/models/paper.py`); `native` wires each method as its own "
             "paper does (`policysearch/models/precision.py`), with a float residual stream.\n"]
    for kept in state.get("kept", []):
        parts += [f"## {kept['title']}\n", kept["about"] + "\n",
                  numerics_line(kept.get("numerics"), commit=kept.get("commit"), note=kept.get("note")) + "\n",
                  _table(kept["columns"], kept["rows"]) + "\n"]
    return "\n".join(parts)


def read_state(path: Path) -> dict[str, Any] | None:
    """The record of ``path`` (JSON), or None where there is none."""
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("format") != STATE_FORMAT:
        raise PolicySearchError(f"{path}: not a zoo table record (format {state.get('format')!r})")
    return state


def write_state(path: Path, *, rows: list[str], commands: list[str], n: int, data: str, device: str,
                seconds: float, kept: list[dict[str, Any]] | None = None) -> None:
    """Record rows made by this code (its numerics version, torch and Python) in ``path``."""
    state = {"format": STATE_FORMAT, "commands": commands, "numerics": NUMERICS_VERSION, "data": data, "n": n,
             "device": device, "torch": torch.__version__, "python": platform.python_version(),
             "seconds": round(seconds), "rows": rows, "kept": kept or []}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1, ensure_ascii=False) + "\n")


def render_file(state_path: Path, out: Path) -> None:
    """Write ``out`` from the record ``state_path``."""
    state = read_state(state_path)
    if state is None:
        raise PolicySearchError(f"{state_path} does not exist: run this script first")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(state))


def _previous(record: Path, data: str) -> dict[str, Any]:
    """What ``--append`` keeps: rows of the same data made by the same numerics version."""
    prev = read_state(record)
    if prev is None:
        return {"rows": [], "commands": [], "seconds": 0}
    if prev["data"] != data:
        raise PolicySearchError(f"{record} holds rows of --data {prev['data']}; --append needs the same data")
    if prev["numerics"] != NUMERICS_VERSION or prev.get("note"):
        raise PolicySearchError(f"{record} holds rows made with numerics {prev['numerics']} that this code "
                                f"({NUMERICS_VERSION}) does not reproduce; regenerate them instead of --append")
    return prev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist_vit", "fmnist_swin"])
    ap.add_argument("--data", default="fmnist")
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6])
    ap.add_argument("--wirings", nargs="+", choices=["paper", "native"], default=["paper", "native"])
    ap.add_argument("--eval-size", type=int, default=None, help="default: every evaluation image")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/zoo.md")
    ap.add_argument("--record", default=None,
                    help="the JSON record of the rows (default: --out with .json): what --append and --render read")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already recorded (same data and numerics) and add these")
    ap.add_argument("--render", action="store_true", help="only write --out from the JSON record")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    record = Path(args.record) if args.record else out.with_suffix(".json")
    try:
        if args.render:
            render_file(record, out)
        else:
            _run(args, out, record)
    except PolicySearchError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(out.read_text())


def _run(args: argparse.Namespace, out: Path, record: Path) -> None:
    t0 = time.time()
    device = resolve_device(args.device)
    old = read_state(record) or {}
    prev = _previous(record, args.data) if args.append else {"rows": [], "commands": [], "seconds": 0}
    # an earlier measurement of the same data kept as its own table stays until a run covers its wiring
    kept = [k for k in old.get("kept", []) if k.get("wiring") not in args.wirings and old["data"] == args.data]
    commands = [*prev["commands"], "python reproduce/zoo_table.py " + " ".join(map(shlex.quote, sys.argv[1:]))]

    def write(rows: list[str], n: int) -> None:
        write_state(record, rows=[*prev["rows"], *rows], commands=commands, n=n, data=args.data, device=device,
                    seconds=prev["seconds"] + time.time() - t0, kept=kept)
        render_file(record, out)

    rows, n = build_table(args.models, args.data, args.bits, device, args.wirings, args.eval_size, on_row=write)
    write(rows, n)
    log.info("%s written (%.0f s)", out, time.time() - t0)


if __name__ == "__main__":
    main()

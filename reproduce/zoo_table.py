"""Baseline table of the zoo models: float and uniform-method top-1 at 8 and 6 bits, per wiring.

    python reproduce/zoo_table.py --data fmnist --out results/zoo.md

Uniform policies as the paper's baselines: all sites ``ibert``; all ``ivit``; all ``fqvit`` with
GELU from I-BERT, and with GELU from I-ViT (FQ-ViT has no integer GELU). Weights and activations
at the same bit width. Top-1 on every evaluation image of ``--data`` (``fmnist``: the full
10,000-image Fashion-MNIST test set); every top-1 is followed by its difference from the best
uniform policy of the same model, bits and wiring, with a paired 95% interval
(``policysearch.stats``). Both wirings (``paper``: one integer pipeline for every method;
``native``: each method wired as its own paper wires it) are evaluated side by side.
"""
from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

import torch

from policysearch.policy import Policy
from policysearch.spec import EvaluatorSpec, get_evaluator, resolve_device
from policysearch.stats import best_of, cell

POLICIES = {
    "ibert": ("ibert", {}),
    "ivit": ("ivit", {}),
    "fqvit + I-BERT GELU": ("fqvit", {"gelu": "ibert"}),
    "fqvit + I-ViT GELU": ("fqvit", {"gelu": "ivit"}),
}
log = logging.getLogger(__name__)


def build_table(models: list[str], data: str, bits: list[int], device: str,
                wirings: list[str]) -> tuple[str, int]:
    rows, n = [], 0
    for model in models:
        for wiring in wirings:
            # reuse=False: uniform policies share no prefix; keeping segment inputs of 10,000 images costs gigabytes
            ev = get_evaluator(EvaluatorSpec(model=model, data=data, device=device, wiring=wiring, reuse=False))
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
    head = ["model", "wiring", "bits", "float", *POLICIES]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows]), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist_vit", "fmnist_swin"])
    ap.add_argument("--data", default="fmnist")
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6])
    ap.add_argument("--wirings", nargs="+", choices=["paper", "native"], default=["paper", "native"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/zoo.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    device = resolve_device(args.device)
    table, n = build_table(args.models, args.data, args.bits, device, args.wirings)
    cmd = f"python reproduce/zoo_table.py --data {args.data} --out {args.out}"
    cmd += f" --wirings {' '.join(args.wirings)}" if list(args.wirings) != ["paper", "native"] else ""
    text = (f"# Zoo baselines: top-1 (%) in float and under uniform integer-only policies\n\n"
            f"Produced by `{cmd}` ({n} evaluation images of `{args.data}`, calibration on the data's "
            f"calibration split, device {device}, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{time.time() - t0:.0f} s).\n\n{table}\n\n"
            "Each cell: top-1, then its difference from the best uniform policy of its row (in bold) in points, "
            "with a paired 95% interval over the same images; `*` marks an interval that excludes 0, i.e. a "
            "difference that is not noise. The float cell compares float with that best uniform policy.\n\n"
            "Uniform policies: every softmax, GELU and LayerNorm site runs the named method; FQ-ViT has no "
            "integer GELU, so its GELU sites run I-BERT's or I-ViT's. Weights per channel and activations per "
            "tensor at the same bit width (W/A). Wirings: `paper` runs every method inside one integer pipeline "
            "after I-ViT's reference code (`policysearch/models/paper.py`); `native` wires each method as its own "
            "paper does (`policysearch/models/precision.py`), with a float residual stream.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Baseline table of the zoo models: float and uniform-method top-1 at 8 and 6 bits.

    python -m policysearch.report.zoo_table --data fmnist --out results/zoo.md

Uniform policies as the paper's baselines: all sites ``ibert``; all ``ivit``; all ``fqvit`` with
GELU from I-BERT, and with GELU from I-ViT (FQ-ViT has no integer GELU). Weights and activations
at the same bit width. Top-1 on every evaluation image of ``--data`` (``fmnist``: the full
10,000-image Fashion-MNIST test set).
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

POLICIES = {
    "ibert": ("ibert", {}),
    "ivit": ("ivit", {}),
    "fqvit + I-BERT GELU": ("fqvit", {"gelu": "ibert"}),
    "fqvit + I-ViT GELU": ("fqvit", {"gelu": "ivit"}),
}


def build_table(models: list[str], data: str, bits: list[int], device: str) -> str:
    rows = []
    for model in models:
        ev = get_evaluator(EvaluatorSpec(model=model, data=data, device=device))
        n = ev.labels.numel()
        row = [model, f"{100 * ev.float_metrics['top1']:.2f}"]
        for b in bits:
            for method, fallback in POLICIES.values():
                policy = Policy.uniform(ev.sites, method, fallback=fallback, act_bits=b, weight_bits=b)
                res = ev.evaluate(policy)
                row.append(f"{100 * res.metrics['top1']:.2f}" if res.ok else "failed")
                logging.info("%s %s %d-bit: %s", model, method, b, row[-1])
        rows.append("| " + " | ".join(row) + " |")
    head = ["model", "float"] + [f"{name} W{b}A{b}" for b in bits for name in POLICIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows]
    return "\n".join(lines), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist_vit", "fmnist_swin"])
    ap.add_argument("--data", default="fmnist")
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/zoo.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    device = resolve_device(args.device)
    table, n = build_table(args.models, args.data, args.bits, device)
    cmd = f"python -m policysearch.report.zoo_table --data {args.data} --out {args.out}"
    text = (f"# Zoo baselines: top-1 (%) in float and under uniform integer-only policies\n\n"
            f"Produced by `{cmd}` ({n} evaluation images of `{args.data}`, calibration on the data's "
            f"calibration split, device {device}, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{time.time() - t0:.0f} s).\n\n{table}\n\n"
            "Uniform policies: every softmax, GELU and LayerNorm site runs the named method; FQ-ViT has no "
            "integer GELU, so its GELU sites run I-BERT's or I-ViT's. Weights per channel and activations per "
            "tensor at the same bit width (W/A). Method input precisions: `policysearch/models/precision.py`.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""How far the ReLU repair of the search brings a GELU -> ReLU model back (issue 10, item 2).

    python benchmarks/bench_relu_repair.py [--model fmnist_vit] [--data fmnist-sample] [--method ibert]

Top-1 and KL to float on the data's evaluation images of: the float model; the uniform policy
``--method`` with GELU; the same with every GELU site ``relu``, unrepaired (the activation only
swapped) and repaired (``policysearch.objectives.repair``, default settings, memory cache only so
every repair is computed here). Paper wiring, W8A8. The training stage's full iterative
distillation (``policysearch finetune``) is the comparison to make beside it: results/finetune.md.
"""
from __future__ import annotations

import argparse
import time

from policysearch.policy import Policy
from policysearch.spec import EvaluatorSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist_vit")
    ap.add_argument("--data", default="fmnist-sample")
    ap.add_argument("--method", default="ibert")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = []
    relu = {"softmax": args.method, "layernorm": args.method, "gelu": "relu"}
    for repaired in (False, True):
        t0 = time.perf_counter()
        # repair_cache_dir None: memory cache only, so every repair is computed (and timed) here
        ev = EvaluatorSpec(model=args.model, data=args.data, device=args.device, eval_size=None,
                           relu_repair=repaired, repair_cache_dir=None).build()
        if not repaired:
            rows.append(("float", 100 * ev.float_metrics["top1"], 0.0))
            gelu = ev.evaluate(Policy.uniform(ev.sites, args.method, fallback={"gelu": "ibert"}))
            rows.append((f"uniform {args.method}, GELU", 100 * gelu.metrics["top1"], gelu.metrics["kl"]))
        res = ev.evaluate(Policy.uniform(ev.sites, relu))
        rows.append((f"uniform {args.method}, every GELU -> relu, {'repaired' if repaired else 'unrepaired'}",
                     100 * res.metrics["top1"], res.metrics["kl"], time.perf_counter() - t0))
    n = ev.labels.numel()
    print(f"{args.model} on {n} evaluation images of {args.data}, paper wiring, W8A8")
    for name, top1, kl, *t in rows:
        print(f"  {name:55s} top-1 {top1:6.2f}%   KL {kl:.4f}" + (f"   ({t[0]:.0f} s with set-up)" if t else ""))


if __name__ == "__main__":
    main()

"""Exhaustive search with activation reuse vs full forwards, side by side in one run.

    python benchmarks/bench_exhaustive.py [--model deit_tiny_patch16_224] [--batch 4]

Two evaluators on the same model (random weights, pretrained=False) and the same random images:
one reuses the cached segment inputs up to the first changed site, the other recomputes every
forward. One ``exhaustive`` strategy is driven; every asked policy is evaluated by both, in
alternating order, each timed; the results must agree. Prints total times and the ratio (budget
from the issue: reuse costs at most 0.6x).
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

from policysearch.objectives import Evaluator
from policysearch.spaces import load_space
from policysearch.strategies import create_strategy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--space", default="paper")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    evaluators = {}
    for reuse in (True, False):
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False).eval()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        images = torch.randn(args.batch, *size)
        evaluators[reuse] = Evaluator(model, calib_images=images, eval_images=images,
                                      batch_size=args.batch, sqnr_batch=args.batch, reuse=reuse)
    space = load_space(args.space, evaluators[True].sites)
    strategy = create_strategy("exhaustive", space, directions=("minimize",), seed=0)
    spent = {True: 0.0, False: 0.0}
    n = 0
    worst = 0.0
    with torch.inference_mode():
        while policies := strategy.ask(1):
            for policy in policies:
                order = (True, False) if n % 2 == 0 else (False, True)
                results = {}
                for reuse in order:
                    t0 = time.perf_counter()
                    results[reuse] = evaluators[reuse].evaluate(policy)
                    spent[reuse] += time.perf_counter() - t0
                a, b = results[True].value, results[False].value
                worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
                strategy.tell(policy, results[True])
                n += 1
    print(f"{args.model}, batch {args.batch}, space {args.space}: {n} evaluations")
    print(f"with reuse    {spent[True]:7.1f} s  ({evaluators[True].segment_calls} segment calls)")
    print(f"full forwards {spent[False]:7.1f} s  ({evaluators[False].segment_calls} segment calls)")
    print(f"ratio reuse/full {spent[True] / spent[False]:.2f}x   (budget: 0.6x); "
          f"max relative objective difference {worst:.2e}")


if __name__ == "__main__":
    main()

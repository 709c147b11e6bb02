"""Simulated-integer forward cost vs float, measured side by side in one process.

    python benchmarks/bench_forward.py [--model deit_tiny_patch16_224] [--method ivit] [--batch 8]

Builds the model with random weights (pretrained=False), calibrates it on random images, then
alternates float and quantized forwards (interleaved, medians) and prints the ratio. The issue's
budget: a uniform ``ivit`` policy on deit_tiny_patch16_224, batch 8, 224x224, 2 threads, costs at
most 4x the float forward.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import policysearch as ps
from policysearch.policy import Policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--method", default="ivit")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(args.batch, *size)
    ps.calibrate(ps.prepare(model), [x])
    policy = Policy.uniform(ps.find_sites(model), args.method, fallback={"gelu": "ivit"})
    ps.apply_policy(model, policy)

    def run_float() -> None:
        with ps.float_mode(model):
            model(x)

    def run_quant() -> None:
        model(x)

    times: dict[str, list[float]] = {"float": [], "quant": []}
    with torch.inference_mode():
        run_float(), run_quant()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("float", run_float), ("quant", run_quant)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    f, q = statistics.median(times["float"]), statistics.median(times["quant"])
    print(f"{args.model} batch {args.batch}, {args.threads} threads, uniform {args.method}")
    print(f"float forward     {1000 * f:8.1f} ms (median of {args.repeats})")
    print(f"quantized forward {1000 * q:8.1f} ms (median of {args.repeats})")
    print(f"ratio quant/float {q / f:8.2f}x   (budget: 4x)")


if __name__ == "__main__":
    main()

"""Simulated-integer forward cost vs float, measured side by side in one process.

    python benchmarks/bench_forward.py [--model deit_tiny_patch16_224] [--wiring paper]
                                       [--methods ibert,fqvit,ivit] [--batch 8] [--threads 2]

Builds the model with random weights (pretrained=False), wires it (``--wiring``, default
``paper``), calibrates it on random images, then alternates, in every round, the float forward
(the wired model in float mode, the reference for the ratios), the unwired timm model, and one
forward per uniform policy (``--methods``; FQ-ViT has no integer GELU, so its GELU sites run
``ivit``). It prints the medians and the ratios quant/float. The issue's budget (paper wiring,
batch 8, 2 threads): at most 2.5x on deit_tiny_patch16_224 and 3x on
swin_tiny_patch4_window7_224, for each of ibert, fqvit and ivit. The machine should be otherwise
idle: the ratios are only meaningful when nothing else runs.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch

import policysearch as ps
from policysearch.policy import Policy

BUDGET = {"deit_tiny_patch16_224": 2.5, "swin_tiny_patch4_window7_224": 3.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--wiring", default="paper", choices=("paper", "native"))
    ap.add_argument("--methods", default="ibert,fqvit,ivit", help="comma-separated uniform policies")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    plain = copy.deepcopy(model)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(args.batch, *size)
    ps.calibrate(ps.prepare(model, wiring=args.wiring), [x])
    sites = ps.find_sites(model)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    policies = {m: Policy.uniform(sites, m, fallback={"gelu": "ivit"}) for m in methods}

    def run_float() -> None:
        with ps.float_mode(model):
            model(x)

    def run_plain() -> None:
        plain(x)

    def quant(policy: Policy):  # noqa: ANN202
        def run() -> None:
            model(x)

        run.policy = policy  # type: ignore[attr-defined]
        return run

    runs = {"float": run_float, "timm": run_plain, **{m: quant(p) for m, p in policies.items()}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up (kernels built, weights quantized and cached)
            if hasattr(fn, "policy"):
                ps.apply_policy(model, fn.policy)
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                if hasattr(fn, "policy"):
                    ps.apply_policy(model, fn.policy)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    # the ratio within each round (its forwards run back to back), then the median over rounds:
    # less sensitive to a shared machine's load drifting between rounds
    per_round = {m: statistics.median(q / f for q, f in zip(times[m], times["float"])) for m in methods}
    budget = BUDGET.get(args.model)
    print(f"{args.model} batch {args.batch}, {args.threads} threads, wiring {args.wiring}, "
          f"medians of {args.repeats} interleaved rounds")
    print(f"  float (wired, float mode) {1000 * med['float']:8.1f} ms")
    print(f"  float (unwired timm)      {1000 * med['timm']:8.1f} ms")
    for m in methods:
        note = "" if budget is None else f"   (budget {budget}x: {'ok' if med[m] / med['float'] <= budget else 'OVER'})"
        print(f"  uniform {m:<6}            {1000 * med[m]:8.1f} ms   ratio {med[m] / med['float']:5.2f}x "
              f"(per round {per_round[m]:5.2f}x, vs unwired {med[m] / med['timm']:5.2f}x){note}")


if __name__ == "__main__":
    main()

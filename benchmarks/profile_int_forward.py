"""Where the integer forward spends its time: ``torch.profiler`` self-CPU table, one thread.

    PYTHONPATH=. python benchmarks/profile_int_forward.py [--model deit_small_patch16_224]
        [--batch 8] [--method ibert] [--eval] [--rows 30]

The ``paper``-wired model (random timm weights, ``pretrained=False``) is calibrated on random
images and runs a uniform policy (FQ-ViT's GELU sites: ``ivit``); after a warm-up forward, one
forward (``--eval``: one search evaluation with the per-site SQNR recording) is profiled. Op
counts and self-time shares are meaningful on a loaded machine where wall times are not.
"""
from __future__ import annotations

import argparse
import copy

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import policysearch as ps
from policysearch.objectives import Evaluator
from policysearch.policy import Policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--method", default="ibert")
    ap.add_argument("--eval", action="store_true", help="profile one evaluation with recording")
    ap.add_argument("--float", action="store_true", help="profile the float forward instead")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    size = tuple(base.pretrained_cfg.get("input_size", (3, 224, 224)))
    model = ps.prepare(copy.deepcopy(base), wiring="paper")
    x = torch.randn(args.batch, *size)
    ps.calibrate(model, [x])
    policy = Policy.uniform(ps.find_sites(model), args.method, fallback={"gelu": "ivit"})
    ps.apply_policy(model, policy)
    if args.eval:
        ev = Evaluator(model, calib_images=x, eval_images=x, batch_size=args.batch, sqnr_batch=args.batch,
                       reuse=False)

        def fn() -> None:
            ev.evaluate(policy)
    elif args.float:
        def fn() -> None:
            with ps.float_mode(model):
                model(x)
    else:
        def fn() -> None:
            model(x)
    with torch.inference_mode():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    avg = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in avg)
    print(avg.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"self CPU total: {total / 1e3:.1f} ms, ops: {sum(e.count for e in avg)}")


if __name__ == "__main__":
    main()

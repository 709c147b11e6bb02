"""One QAT step of the integer model vs one float training step, same model and batch, side by side.

    python benchmarks/bench_qat_step.py [--model fmnist_vit] [--model deit_tiny_patch16_224]
                                        [--batch 32] [--threads 2] [--wiring paper]
                                        [--methods ibert,fqvit,ivit] [--ste reference,float]
                                        [--engine int,float] [--quick]

Per model: the float model (unwired timm; zoo weights for a zoo name, random weights otherwise)
and its wired copy calibrated on random images, running each uniform policy (``--methods``; FQ-ViT
has no integer GELU, so its GELU sites run ``ivit``). A *step* is what the trainer does per batch:
forward, loss, backward, AdamW step. The float step trains the float model on cross-entropy; the
QAT step trains the integer model on the distillation loss against the frozen float model with
the activation ranges tracked (``policysearch.finetune``: ``ranges="ema"``), under each STE mode
(``--ste``) and GEMM engine (``--engine``: ``int``, the integer engine whose forward value is
the exact integer result, against ``float``, the old float32 simulation; ``policysearch.quant.intmm``),
and is timed twice: without the teacher's forward (``qat``: the integer model's own
step, the issue's measure) and with it (``qat+teacher``: what ``policysearch finetune`` runs).
Rounds interleave every variant; the medians and the median of the per-round ratios to the float
step are printed, with the machine load (``/proc/loadavg``) before and after. The budget (the
integer-engine issue): ``qat`` at most 2.5x the float step (batch 32, 2 threads).
The ratios are only meaningful on an otherwise idle machine. ``--quick``: a smoke check
(fmnist_vit, batch 4, one round, ``ivit`` only, unless given otherwise).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import policysearch as ps
from policysearch.finetune.kd import freeze, kd_loss
from policysearch.finetune.qat import track_ranges
from policysearch.kernels._common import ste_gradients
from policysearch.models.loading import load_model, model_input_size
from policysearch.policy import Policy
from policysearch.quant.intmm import use_engine
from policysearch.train import param_groups

BUDGET = 2.5


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def bench(name: str, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    base = load_model(name)  # zoo weights, or timm's random weights (pretrained=False)
    size = tuple(model_input_size(base))
    x = torch.randn(args.batch, *size)
    y = torch.randint(0, base.num_classes, (args.batch,))
    teacher = freeze(copy.deepcopy(base))
    student_float = copy.deepcopy(base).train()
    opt_float = torch.optim.AdamW(param_groups(student_float, 0.0), lr=1e-6)
    wired = ps.prepare(copy.deepcopy(base), wiring=args.wiring)
    ps.calibrate(wired, [x])
    sites = ps.find_sites(wired)
    opt_q = torch.optim.AdamW(param_groups(wired, 0.0), lr=1e-6)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    stes = [m.strip() for m in args.ste.split(",") if m.strip()]
    policies = {m: Policy.uniform(sites, m, fallback={"gelu": "ivit"}) for m in methods}

    def float_step() -> None:
        loss = F.cross_entropy(student_float(x), y)
        opt_float.zero_grad(set_to_none=True)
        loss.backward()
        opt_float.step()

    def qat_step(policy: Policy, ste: str, with_teacher: bool, engine: str) -> Callable[[], None]:
        with torch.no_grad():
            fixed = teacher(x)

        def step() -> None:
            with ste_gradients(ste), track_ranges(wired), use_engine(engine):
                if with_teacher:
                    with torch.no_grad():
                        target = teacher(x)
                else:
                    target = fixed
                loss = kd_loss(wired(x), target)
                opt_q.zero_grad(set_to_none=True)
                loss.backward()
                opt_q.step()

        step.policy = policy  # type: ignore[attr-defined]
        return step

    def setup(fn: Callable[[], None]) -> None:  # switching policies is not part of a step
        if hasattr(fn, "policy"):
            ps.apply_policy(wired, fn.policy)
            wired.train()

    runs: dict[str, Callable[[], None]] = {"float": float_step}
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    for m, p in policies.items():
        for ste in stes:
            for engine in engines:
                runs[f"qat {m} {ste} {engine}"] = qat_step(p, ste, False, engine)
        runs[f"qat+teacher {m} {stes[0]} {engines[0]}"] = qat_step(p, stes[0], True, engines[0])
    for fn in runs.values():  # warm-up
        setup(fn)
        fn()
    load_before = loadavg()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            setup(fn)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    load_after = loadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{name}: batch {args.batch}, {args.threads} threads, wiring {args.wiring}, {args.repeats} interleaved "
          f"rounds; load average before {load_before}, after {load_after}")
    print(f"  {'step':40s} {'median ms':>10s} {'x float':>8s}")
    for k in runs:
        ratios = [t / f for t, f in zip(times[k], times["float"], strict=True)]
        r = statistics.median(ratios)
        flag = "" if k == "float" or not k.startswith("qat ") else ("  ok" if r <= BUDGET else f"  > {BUDGET}x")
        print(f"  {k:40s} {1000 * med[k]:10.1f} {r:8.2f}{flag}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None,
                    help="zoo or timm name (repeat; default: fmnist_vit and deit_tiny_patch16_224)")
    ap.add_argument("--batch", type=int, default=None, help="default 32 (--quick: 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wiring", default="paper", choices=("paper", "native"))
    ap.add_argument("--methods", default=None, help="default ibert,fqvit,ivit (--quick: ivit)")
    ap.add_argument("--ste", default="reference,float", help="STE modes to time (the first also with the teacher)")
    ap.add_argument("--engine", default="int,float", help="GEMM engines to time (the first also with the teacher)")
    ap.add_argument("--repeats", type=int, default=None, help="default 7 (--quick: 1)")
    ap.add_argument("--quick", action="store_true", help="smoke check: fmnist_vit, batch 4, one round")
    args = ap.parse_args()
    args.batch = args.batch or (4 if args.quick else 32)
    args.methods = args.methods or ("ivit" if args.quick else "ibert,fqvit,ivit")
    args.repeats = args.repeats or (1 if args.quick else 7)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    for name in args.model or (["fmnist_vit"] if args.quick else ["fmnist_vit", "deit_tiny_patch16_224"]):
        bench(name, args)


if __name__ == "__main__":
    main()

"""How far the ReLU repair of the search brings a GELU -> ReLU model back (issue 10, item 2).

    python benchmarks/bench_relu_repair.py [--model fmnist_vit] [--data fmnist-sample] [--method ibert]
    python benchmarks/bench_relu_repair.py --data fmnist --against results/finetune/geluless/fmnist_vit-w8a8-geluless-e1

Top-1 and KL to float on the data's evaluation images of: the float model; the uniform policy
``--method`` with GELU; the same with every GELU site ``relu``, unrepaired (the activation only
swapped) and repaired (``policysearch.objectives.repair``, default settings, memory cache only so
every repair is computed here). Paper wiring, W8A8.

``--against DIR``: a GELU-less job of the training stage (``python reproduce/finetune_tables.py
run geluless``, same model and data, ``--method ibert``) whose per-image predictions are compared
with the repaired ones on the same images, with paired 95% intervals: the repair against the full
iterative distillation (the float ReLU model, and the integer policy after QAT). The job's
"before" predictions must equal the unrepaired ones here, which checks that both saw the same
images in the same order.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from policysearch.policy import Policy
from policysearch.spec import EvaluatorSpec
from policysearch.stats import format_interval, paired_interval, top1_percent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist_vit")
    ap.add_argument("--data", default="fmnist-sample")
    ap.add_argument("--method", default="ibert")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="a GELU-less training-stage job folder to compare with image by image")
    args = ap.parse_args()
    rows = []
    predictions = {}
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
        predictions["repaired" if repaired else "unrepaired"] = ev.last_predictions.numpy()
        rows.append((f"uniform {args.method}, every GELU -> relu, {'repaired' if repaired else 'unrepaired'}",
                     100 * res.metrics["top1"], res.metrics["kl"], time.perf_counter() - t0))
    n = ev.labels.numel()
    print(f"{args.model} on {n} evaluation images of {args.data}, paper wiring, W8A8")
    for name, top1, kl, *t in rows:
        print(f"  {name:55s} top-1 {top1:6.2f}%   KL {kl:.4f}" + (f"   ({t[0]:.0f} s with set-up)" if t else ""))
    if args.against:
        compare(Path(args.against), predictions, ev.labels.cpu().numpy())


def compare(folder: Path, mine: dict, labels) -> None:
    import numpy as np

    with np.load(folder / "finetune" / "predictions.npz") as z:
        job = {k: z[k] for k in z.files}
    if len(job["labels"]) != len(labels) or not np.array_equal(job["labels"], labels):
        raise SystemExit(f"{folder}: its evaluation labels are not these images' labels; use the job's model and data")
    same = bool(np.array_equal(job["before"], mine["unrepaired"]))
    print(f"\nagainst {folder} ({len(labels)} images; its 'before' equals the unrepaired predictions here: {same})")
    for name, key in (("float ReLU model (iterative distillation)", "relu_float"),
                      ("integer policy after distillation + QAT", "after"), ("float GELU model", "float")):
        d = paired_interval(mine["repaired"], job[key], labels)
        print(f"  repaired - {name:45s} ({top1_percent(job[key], labels):.2f}%): {format_interval(d)}")


if __name__ == "__main__":
    main()

"""int8 latency of GELU against ReLU MLPs in ONNX Runtime, measured interleaved in one run.

    python benchmarks/bench_int8_relu.py [--models swin_tiny_patch4_window7_224,deit_small_patch16_224]
                                         [--batches 1,8] [--threads 2] [--repeats 20]
                                         [--compare-formats] [--table results/latency.md]

For each timm model (random weights, ``pretrained=False``): exports the float model and the same
model with every MLP GELU replaced by ReLU (legacy exporter, opset 17), quantizes both with
static QDQ int8 (U8S8 unless ``--int8 s8s8``; min/max calibration on ``--calib`` random images in
the normalized input domain: with random weights there is no real data distribution to follow),
then measures float, int8 GELU and int8 ReLU with ONNX Runtime, interleaved (every round runs each
variant once, rotating the order), median of ``--repeats`` rounds per batch size. It prints the
medians, the ratio int8 ReLU / int8 GELU (median of the per-round ratios, and the ratio of the
medians) and the load average. The target (issue 10, the GELU-less Swin paper's 11 %): at most
0.89 at batch 8 for both models.

``--compare-formats`` adds the S8S8 int8 models (int8 activations and weights, ONNX Runtime's
default) to the same interleaved run, to show which format is faster on this CPU.
``--table PATH`` replaces these models' rows in the latency table (``results/latency.md``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402

from policysearch.deploy.latency import machine_info, measure, paired_ratio, rows_from_latency, update_table  # noqa: E402
from policysearch.deploy.onnx_export import export_float  # noqa: E402
from policysearch.deploy.ort_int8 import quantize_int8  # noqa: E402

TARGET = 0.89
MODELS = "swin_tiny_patch4_window7_224,deit_small_patch16_224"


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    calib = torch.randn(args.calib, c, h, w, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    f_gelu = export_float(model, folder / f"{name}-float.onnx", example=calib[:2])
    f_relu = export_float(model, folder / f"{name}-float-relu.onnx", relu=True, example=calib[:2])
    paths = {"float": f_gelu}
    formats = ["u8s8", "s8s8"] if args.compare_formats else [args.int8]
    for fmt in formats:
        suffix = "" if fmt == args.int8 else f"_{fmt}"
        paths[f"int8_gelu{suffix}"] = quantize_int8(f_gelu, folder / f"{name}-int8-gelu-{fmt}.onnx", calib, fmt=fmt)
        paths[f"int8_relu{suffix}"] = quantize_int8(f_relu, folder / f"{name}-int8-relu-{fmt}.onnx", calib, fmt=fmt)
    prep = time.perf_counter() - t0
    res = measure(paths, batches=args.batches, repeats=args.repeats, threads=args.threads, provider=args.provider)
    res["ratios"] = {}
    for b in res["batches"]:
        r = {"int8_relu/int8_gelu": paired_ratio(res, "int8_relu", "int8_gelu", b),
             "int8_gelu/float": paired_ratio(res, "int8_gelu", "float", b)}
        for other in [f for f in formats if f != args.int8]:
            r[f"int8_gelu_{other}/int8_gelu"] = paired_ratio(res, f"int8_gelu_{other}", "int8_gelu", b)
            r[f"int8_relu_{other}/int8_relu"] = paired_ratio(res, f"int8_relu_{other}", "int8_relu", b)
        res["ratios"][str(b)] = r
    res.pop("_rounds")
    res.update(model=name, weights="random (timm, pretrained=False)", int8={"format": args.int8},
               top1={}, created=time.strftime("%Y-%m-%d"), prep_s=round(prep, 1))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS, help=f"comma-separated timm names (default {MODELS})")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--calib", type=int, default=16, help="calibration images (random, default 16)")
    ap.add_argument("--int8", choices=("u8s8", "s8s8"), default="u8s8")
    ap.add_argument("--compare-formats", action="store_true", help="also measure the other int8 format")
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--table", default=None, help="update this latency table (e.g. results/latency.md)")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    command = "python benchmarks/bench_int8_relu.py " + " ".join(map(shlex.quote, sys.argv[1:]))
    print(f"machine: {machine_info()}")
    ok = True
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-relu-") as tmp:
        for name in args.models.split(","):
            res = bench_model(name, args, Path(tmp))
            res["command"] = command
            print(f"\n{name}: {res['provider']}, {res['threads']} threads, median of {res['repeats']} interleaved "
                  f"rounds, load {res['load_before']} -> {res['load_after']} (export + quantize {res['prep_s']} s)")
            for variant, per in res["results"].items():
                print(f"  {variant:16s} " + "  ".join(f"b{b} {v['median_ms']:9.2f} ms (IQR {v['q1_ms']:.1f}-{v['q3_ms']:.1f})"
                                                      for b, v in per.items()))
            for b, r in res["ratios"].items():
                print(f"  batch {b}: " + ", ".join(f"{k} {v['paired_median']:.3f} (of medians {v['of_medians']:.3f})"
                                                   for k, v in r.items()))
            if "8" in res["ratios"]:
                ratio = res["ratios"]["8"]["int8_relu/int8_gelu"]["paired_median"]
                verdict = "meets" if ratio <= TARGET else "MISSES"
                ok = ok and ratio <= TARGET
                print(f"  => int8 ReLU/GELU at batch 8: {ratio:.3f} ({verdict} the target <= {TARGET})")
            rows += rows_from_latency(res)
    if args.table:
        print(f"\nupdated {update_table(args.table, rows, command=command)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

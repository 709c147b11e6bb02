"""Thin command-line interface: every command calls the public API and prints its result."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = ["main"]

log = logging.getLogger("policysearch")

Handler = Callable[[argparse.Namespace], int]


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        from policysearch import kernels

        for kind in kernels.kinds():
            print(f"{kind:10s} {', '.join(kernels.methods(kind))}")
        return 0
    if args.what == "models":
        from policysearch.models.zoo import list_zoo

        for name in list_zoo():
            print(name)
        print("(and any timm ViT/DeiT/Swin name with --checkpoint PATH)")
        return 0
    if args.what == "strategies":
        from policysearch.strategies import list_strategies

        print("\n".join(list_strategies()))
        return 0
    from policysearch import find_sites
    from policysearch.models.loading import load_model

    model = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                       img_size=args.img_size, in_chans=args.in_chans)
    sites = find_sites(model)
    width = max(len(s.name) for s in sites)
    for s in sites:
        print(f"{s.name:{width}s}  {s.kind}")
    counts = Counter(s.kind for s in sites)
    print(f"{len(sites)} sites: " + ", ".join(f"{counts[k]} {k}" for k in ("softmax", "gelu", "layernorm")))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from policysearch.search import SearchConfig, search

    config = SearchConfig(
        strategy=args.strategy, model=args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
        img_size=args.img_size, in_chans=args.in_chans, data=args.data, space=args.space,
        objective=args.objective, runner=args.runner, trials=args.trials, seed=args.seed,
        weight_bits=args.weight_bits or args.bits, act_bits=args.bits, wiring=args.wiring,
        storage=args.storage, run_name=args.run_name, device=args.device, results_dir=args.results_dir,
        eval_size=None if args.eval_size == 0 else args.eval_size, calib_size=args.calib_size,
        batch_size=args.batch_size,
    )
    res = search(config, progress=not args.no_progress)
    _print_summary(res, db=args.db)
    return 0


def _print_summary(res: "object", *, db: int = 20) -> None:
    from policysearch.report import summary_text

    print(summary_text(res, db=db))


def _cmd_export(args: argparse.Namespace) -> int:
    from policysearch.report import export_run

    path = export_run(args.run, out=args.out, results_dir=args.results_dir)
    print(path)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from policysearch.report import check_policy_file

    model_args = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size),
                                    ("in_chans", args.in_chans)) if v is not None}
    report, reproduced = check_policy_file(
        args.policy, model=args.model, checkpoint=args.checkpoint, data=args.data, device=args.device,
        eval_size=args.eval_size, model_args=model_args or None, wiring=args.wiring,
    )
    print(report)
    if args.command == "apply" and not reproduced:
        print("policysearch: the metrics differ from those the policy file records", file=sys.stderr)
        return 1
    return 0


def _add_model_args(p: argparse.ArgumentParser, *, default: str | None = "fmnist_vit") -> None:
    p.add_argument("--model", default=default,
                   help="zoo name or timm ViT/DeiT/Swin name" + (f" (default: {default})" if default else ""))
    p.add_argument("--checkpoint", default=None, help="weights file for a timm model (safetensors or torch)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: the model's, or inferred from --checkpoint)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")


def _add_wiring_arg(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--wiring", choices=["paper", "native"], default=default,
                   help="paper: every method inside one integer pipeline (I-ViT's); native: each method "
                        "wired as its own paper wires it" + (f" (default: {default})" if default else
                                                               " (default: as the policy file records)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policysearch",
        description="Search per-layer integer-only quantization policies for vision transformers.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list sites of a model, methods, models or strategies")
    p.add_argument("what", choices=["sites", "methods", "models", "strategies"])
    _add_model_args(p)
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="search a policy and write results/<run>/")
    p.add_argument("--strategy", required=True, help="search strategy (see `policysearch list strategies`)")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--space", default="paper", help="space preset name or YAML path (default: paper)")
    p.add_argument("--objective", default="kl", help="objective preset name or YAML path (default: kl)")
    p.add_argument("--runner", default="local", help="runner (default: local)")
    p.add_argument("--trials", type=int, default=None, help="evaluation budget for tpe/nsga2/random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, default=8, help="activation bits (default 8)")
    p.add_argument("--weight-bits", type=int, default=None, help="weight bits (default: --bits)")
    _add_wiring_arg(p, "native")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL, any SQLAlchemy URL (default: sqlite:///<results-dir>/studies.db); "
                        "independent of --results-dir")
    p.add_argument("--run-name", default=None,
                   help="run folder and study name (letters, digits, . _ + = @ -); the same name resumes "
                        "when the work is the same")
    p.add_argument("--eval-size", type=int, default=1000,
                   help="evaluation images scored per policy (default 1000; 0 = all)")
    p.add_argument("--calib-size", type=int, default=None, help="calibration images (default: the data's)")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    p.add_argument("--results-dir", default="results",
                   help="where run folders go (default: results); the default storage lives there too")
    p.add_argument("--db", type=int, choices=[20, 10], default=20,
                   help="print ASQNR in the paper's 20*log10 (default) or the conventional 10*log10 dB")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("export", help="write the policy JSON of a finished run")
    p.add_argument("run", help="run name (folder under results/) or its path")
    p.add_argument("--out", default=None, help="output file (default: print the run's policy.json path)")
    p.add_argument("--results-dir", default="results")
    p.set_defaults(func=_cmd_export)

    for name, help_ in (("apply", "evaluate a policy file in a fresh process and compare with its metrics"),
                        ("eval", "top-1 of a model in float, or under --policy")):
        p = sub.add_parser(name, help=help_)
        if name == "apply":
            p.add_argument("policy", help="policy JSON file")
            _add_model_args(p, default=None)
        else:
            p.add_argument("--policy", default=None, help="policy JSON file (default: float model)")
            _add_model_args(p)
        _add_wiring_arg(p, None)
        _add_data_args(p)
        p.add_argument("--eval-size", type=int, default=None,
                       help="evaluation images (default: as recorded in the policy file, else all)")
        p.set_defaults(func=_cmd_eval)
    return parser


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="fmnist-sample",
                   help="fmnist-sample (default, shipped) | fmnist | imagefolder:PATH")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from policysearch.errors import user_errors

    try:
        return int(args.func(args) or 0)
    except (*user_errors(), PermissionError, IsADirectoryError, NotADirectoryError, RecursionError) as exc:
        print(f"policysearch: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("policysearch: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException, limit: int = 600) -> str:
    """The error as one line, cut to ``limit`` characters (user input can be long)."""
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to read; check the file you passed"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or text}: {exc.filename}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

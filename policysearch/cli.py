"""Thin command-line interface: every command calls the public API and prints its result."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from policysearch import methods as catalogue
from policysearch.errors import ConfigError, user_errors
from policysearch.registry import Registry

__all__ = ["main"]

log = logging.getLogger("policysearch")

Handler = Callable[[argparse.Namespace], int]

#: The library functions the commands call, as lazy ``"module:attr"`` entries (the registry's
#: mechanism for heavy code): the search stack imports torch, timm and optuna, about 4.5 s here
#: against 0.2 s for ``--help``, so each command loads only the part of the library it calls, on
#: its first call. Light modules (the method catalogue, errors, the registry) are imported above.
API: Registry[Any] = Registry("CLI entry point")
for _name, _target in {
    "find_sites": "policysearch.models:find_sites",
    "load_model": "policysearch.models.loading:load_model",
    "list_zoo": "policysearch.models.zoo:list_zoo",
    "list_strategies": "policysearch.strategies:list_strategies",
    "SearchConfig": "policysearch.search:SearchConfig",
    "search": "policysearch.search:search",
    "feasibility_text": "policysearch.objectives.latency:feasibility_text",
    "finetune": "policysearch.finetune:finetune",
    "run_latency": "policysearch.deploy.latency:run_latency",
    "latency_text": "policysearch.deploy.latency:latency_text",
    "profile_model": "policysearch.deploy.profile:profile_model",
    "summary_text": "policysearch.report:summary_text",
    "export_run": "policysearch.report:export_run",
    "build_report": "policysearch.report:build_report",
    "dashboard_target": "policysearch.report:dashboard_target",
    "serve": "policysearch.report:serve",
    "check_policy_file": "policysearch.report:check_policy_file",
    "show_text": "policysearch.report.text:show_text",
    "load_summary": "policysearch.report.inspect:load_summary",
    "list_runs": "policysearch.report.inspect:list_runs",
    "format_runs": "policysearch.report.inspect:format_runs",
    "trial_rows": "policysearch.report.inspect:trial_rows",
    "format_trials": "policysearch.report.inspect:format_trials",
    "next_steps": "policysearch.report.inspect:next_steps",
    "read_run_config": "policysearch.report.inspect:read_run_config",
    "read_policy": "policysearch.policy:read_policy",
}.items():
    API.register_lazy(_name, _target)
API.register_lazy("export_run_onnx", "policysearch.deploy.onnx_export:export_run_onnx", extra="onnx")
del _name, _target


def _cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        for kind in catalogue.kinds():
            print(f"{kind:10s} {', '.join(catalogue.methods(kind))}")
        return 0
    if args.what == "models":
        for name in API.get("list_zoo")():
            print(name)
        print("(and any timm ViT/DeiT/Swin name with --checkpoint PATH)")
        return 0
    if args.what == "strategies":
        print("\n".join(API.get("list_strategies")()))
        return 0
    if args.what == "runs":
        rows = API.get("list_runs")(args.results_dir)
        print(API.get("format_runs")(rows) if rows else f"no runs in {args.results_dir}")
        return 0
    load_model, find_sites = API.get("load_model"), API.get("find_sites")
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
    search, search_config = API.get("search"), API.get("SearchConfig")
    if args.strategy is None:
        raise ConfigError("--strategy is required (see `policysearch list strategies`), or --config "
                          "results/RUN/config.yaml to start from a run's settings")
    if not isinstance(args.objective, str):
        raise ConfigError(f"--config {args.config}: its objective is not a preset of the same name; "
                          "pass --objective NAME or a YAML path")
    config = search_config(
        strategy=args.strategy, strategy_options=args.strategy_options, model=args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
        img_size=args.img_size, in_chans=args.in_chans, data=args.data, space=args.space,
        objective=args.objective, runner=args.runner, trials=args.trials, seed=args.seed,
        weight_bits=args.weight_bits or args.bits, act_bits=args.bits, wiring=args.wiring,
        storage=args.storage, run_name=args.run_name, device=args.device, results_dir=args.results_dir,
        eval_size=None if args.eval_size == 0 else args.eval_size, calib_size=args.calib_size,
        batch_size=args.batch_size,
        runner_options={**args.runner_options,
                        **{k: v for k, v in (("address", args.address), ("workers", args.workers)) if v is not None}},
        relu_repair=not args.no_relu_repair,
        profile=args.profile, max_latency=args.max_latency, min_top1=args.min_top1,
    )
    latency_batches = _batches(args.latency_batches, "--latency-batches") if args.latency else None  # before any work
    res = search(config, progress=not args.no_progress)
    summary = API.get("load_summary")(str(res.run_dir))  # what `policysearch show RUN` prints: the whole search
    _print_summary(summary, db=args.db)
    if args.finetune:  # the next stage, on the run record the search just finished (resumes on its own)
        finetune = API.get("finetune")
        ft = finetune(str(res.run_dir), device=args.device, progress=not args.no_progress,
                      **_finetune_options(args, batch_size=args.train_batch_size))
        print()
        print(ft.summary())
    if args.latency:  # then the int8 latency check (reuses a latency.json measured on the same weights)
        run_latency = API.get("run_latency")
        doc = run_latency(str(res.run_dir), results_dir=args.results_dir, batches=latency_batches,
                          threads=args.latency_threads, reuse=True,
                          command="policysearch " + " ".join(map(shlex.quote, sys.argv[1:])))
        print()
        _print_latency(doc)
    print()
    print("\n".join(API.get("next_steps")(res.run_name, results_dir=args.results_dir)))
    return 0


#: SearchConfig fields that are run options under another name (a config file's key -> the option's dest)
_CONFIG_DESTS = {"act_bits": "bits"}


def _config_defaults(path: str, valid: set[str]) -> dict[str, Any]:
    """``run --config FILE``: the file's settings as the run options' defaults (flags override)."""
    settings = API.get("read_run_config")(path)
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise ConfigError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    out = {_CONFIG_DESTS.get(k, k): v for k, v in settings.items()
           if k not in ("eval_size", "relu_repair", "runner_options", "strategy_options")}
    if "eval_size" in settings:
        out["eval_size"] = settings["eval_size"] or 0  # None (all images) is the option's 0
    if "relu_repair" in settings:
        out["no_relu_repair"] = not settings["relu_repair"]
    runner_options = dict(settings.get("runner_options") or {})
    out.update(address=runner_options.pop("address", None), workers=runner_options.pop("workers", None),
               runner_options=runner_options, strategy_options=dict(settings.get("strategy_options") or {}))
    return out


def _cmd_show(args: argparse.Namespace) -> int:
    summary = API.get("load_summary")(args.run, results_dir=args.results_dir)
    _print_summary(summary, db=args.db)
    print()
    print("\n".join(API.get("next_steps")(summary.run_name, results_dir=args.results_dir)))
    return 0


def _cmd_trials(args: argparse.Namespace) -> int:
    rows = API.get("trial_rows")(args.run, results_dir=args.results_dir, storage=args.storage)
    print(API.get("format_trials")(rows, args.format))
    return 0


def _finetune_options(args: argparse.Namespace, *, batch_size: int) -> dict:
    """The fine-tuning settings the command line gives (those left out keep their defaults)."""
    given = {"epochs": args.epochs, "steps": args.steps, "lr": args.lr, "batch_size": batch_size,
             "kd_temperature": args.kd_temperature, "kd_weight": args.kd_weight, "seed": args.seed,
             "ste": args.ste, "ranges": args.ranges, "relu_blocks_per_stage": args.relu_blocks_per_stage,
             "relu_order": args.relu_order, "relu_epochs": args.relu_epochs, "relu_steps": args.relu_steps,
             "relu_lr": args.relu_lr}
    return {k: v for k, v in given.items() if v is not None}


def _cmd_finetune(args: argparse.Namespace) -> int:
    model_args = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size),
                                    ("in_chans", args.in_chans)) if v is not None}
    sizes = {k: (None if v == 0 else v) for k, v in (("eval_size", args.eval_size), ("calib_size", args.calib_size))
             if v is not None}
    finetune = API.get("finetune")
    res = finetune(args.run, policy=args.policy, model=args.model, checkpoint=args.checkpoint, data=args.data,
                   wiring=args.wiring, model_args=model_args or None, results_dir=args.results_dir, out=args.out,
                   device=args.device, progress=not args.no_progress, restart=args.restart, **sizes,
                   **_finetune_options(args, batch_size=args.batch_size))
    print(res.summary())
    return 0


def _print_summary(summary: Any, *, db: int = 20) -> None:
    print(API.get("summary_text")(summary, db=db))
    if summary.feasibility:
        print(API.get("feasibility_text")(summary.feasibility))


def _cmd_export(args: argparse.Namespace) -> int:
    if args.onnx is None or args.out is not None:
        print(API.get("export_run")(args.run, out=args.out, results_dir=args.results_dir, pick=args.pick))
    if args.onnx is not None:
        print(API.get("export_run_onnx")(args.run, args.onnx, results_dir=args.results_dir))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    model_args = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size),
                                    ("in_chans", args.in_chans)) if v is not None}
    profile_model = API.get("profile_model")
    doc = profile_model(args.model, device=args.device, batch=args.batch, repeats=args.repeats,
                        threads=args.threads, checkpoint=args.checkpoint, model_args=model_args,
                        results_dir=args.results_dir, out=args.out)
    print(doc["path"])
    print(f"{len(doc['sites'])} sites, {len(doc['kernels'])} (shape, method) kernels, {len(doc['linear'])} linear "
          f"layers ({doc['totals_ms']['linear']:.2f} ms) on {doc['device']}, batch {doc['batch']}, "
          f"{doc['threads']} threads, load {doc['machine'].get('load_before')}")
    for kind, per in doc["methods"].items():
        print(f"{kind:10s} " + ", ".join(f"{m} {c:.2f}x" for m, c in per.items()) + "  (relative to fp32)")
    return 0


def _batches(text: str, flag: str = "--batches") -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ConfigError(f"{flag} {text!r}: give positive batch sizes separated by commas, e.g. 1,8")
    return batches


def _print_latency(doc: dict) -> None:
    print(API.get("latency_text")(doc))


def _cmd_latency(args: argparse.Namespace) -> int:
    run_latency = API.get("run_latency")
    doc = run_latency(args.run, results_dir=args.results_dir, batches=_batches(args.batches), repeats=args.repeats,
                      threads=args.threads, provider=args.provider, fmt=args.int8, checkpoint=args.checkpoint,
                      relu_checkpoint=args.relu_checkpoint, keep_onnx=not args.no_keep_onnx, table=args.table,
                      command="policysearch " + " ".join(map(shlex.quote, sys.argv[1:])))
    _print_latency(doc)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    build_report = API.get("build_report")
    path = build_report(args.run, results_dir=args.results_dir, storage=args.storage, out=args.out,
                        device=args.device, histograms=not args.no_histograms, images=args.images)
    print(path)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    dashboard_target, serve = API.get("dashboard_target"), API.get("serve")
    target = dashboard_target(args.run, results_dir=args.results_dir, storage=args.storage,
                              artifact_dir=args.artifact_dir)

    def ready(url: str) -> None:
        print(f"optuna-dashboard on {target.storage}: {url}  (Ctrl-C stops it)", flush=True)

    serve(target, port=args.port, ready=ready)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    model_args = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size),
                                    ("in_chans", args.in_chans)) if v is not None}
    model = args.model
    if args.command == "eval":
        if args.policy is None:
            model = model or EVAL_DEFAULT_MODEL
        else:  # the model the file records; flags that say otherwise are refused, not silently applied
            recorded = dict(API.get("read_policy")(args.policy).model or {})
            if recorded.get("name"):
                _check_eval_flags(recorded, args, model_args)
                model = None
            else:  # a hand-written file that names no model: the flags' (or the default) model
                model = model or EVAL_DEFAULT_MODEL
    check_policy_file = API.get("check_policy_file")
    report, reproduced = check_policy_file(
        args.policy, model=model, checkpoint=args.checkpoint, data=args.data, device=args.device,
        eval_size=args.eval_size, model_args=model_args or None, wiring=args.wiring,
    )
    print(report)
    if args.command == "apply" and not reproduced:
        print("policysearch: the metrics differ from those the policy file records", file=sys.stderr)
        return 1
    return 0


#: ``eval`` without --policy
EVAL_DEFAULT_MODEL = "fmnist_vit"


def _check_eval_flags(recorded: dict[str, Any], args: argparse.Namespace, model_args: dict[str, int]) -> None:
    """``eval --policy FILE`` evaluates the model FILE records: --model, --checkpoint or architecture
    flags that name another are one error, naming both."""
    name, ckpt, rec_args = recorded.get("name"), recorded.get("checkpoint"), dict(recorded.get("args") or {})
    diffs = []
    if args.model is not None and args.model != name:
        diffs.append(f"--model {args.model} (the file's: {name})")
    if args.checkpoint is not None and (ckpt is None or os.path.realpath(args.checkpoint) != os.path.realpath(ckpt)):
        diffs.append(f"--checkpoint {args.checkpoint} (the file's: {ckpt or 'none, the zoo weights'})")
    for key, value in model_args.items():
        if rec_args.get(key) != value:
            diffs.append(f"--{key.replace('_', '-')} {value} (the file's: {rec_args.get(key, 'unset')})")
    if diffs:
        raise ConfigError(
            f"{args.policy} records model {name}" + (f" with checkpoint {ckpt}" if ckpt else "") +
            f", not {'; '.join(diffs)}; drop those flags to evaluate the model the file records, or use "
            "`policysearch apply FILE --checkpoint ...` to try the policy on other weights of that model")


def _add_model_args(p: Any, *, default: str | None = "fmnist_vit", model_help: str | None = None) -> None:
    p.add_argument("--model", default=default,
                   help=model_help or "zoo name or timm ViT/DeiT/Swin name" + (f" (default: {default})" if default else ""))
    p.add_argument("--checkpoint", default=None, help="weights file for a timm model (safetensors or torch; default: the zoo model's own, "
                                                 "random for a timm name)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: the model's, or inferred from --checkpoint)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--in-chans", type=int, default=None, help="input channels (default: the model's)")


def _add_wiring_arg(p: Any, default: str | None) -> None:
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

    p = sub.add_parser("list", help="list runs, sites of a model, methods, models or strategies")
    p.add_argument("what", choices=["runs", "sites", "methods", "models", "strategies"],
                   help="runs: the runs of --results-dir (name, model, strategy, status, evaluations, answer top-1)")
    _add_model_args(p)
    p.add_argument("--results-dir", default="results", help="list runs: where run folders are (default: results)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="search a policy and write results/<run>/", formatter_class=HelpFormatter,
                       description="Search a per-site policy of integer non-linear methods and write results/<run>/ "
                                   "(run.json, config.yaml, policy.json, sensitivity.csv) and its Optuna study.")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="start from the settings of this file, e.g. results/RUN/config.yaml (a run writes it); "
                        "options given on the command line override it (default: none)")
    p.set_defaults(strategy_options={}, runner_options={})
    g = p.add_argument_group("model and data")
    _add_model_args(g)
    _add_data_args(g)
    g.add_argument("--eval-size", type=int, default=1000, help="evaluation images scored per policy (0 = all)")
    g.add_argument("--calib-size", type=int, default=None, help="calibration images (default: the data's)")
    g.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    g = p.add_argument_group("search")
    g.add_argument("--strategy", default=None,
                   help="search strategy, required unless --config gives it (see `policysearch list strategies`). "
                        "The SQNR rules pick per site from the uniform runs: sqnr_output the highest output ASQNR "
                        "beta; sqnr_diff (eq. 11 literally) the lowest beta - gamma; gamma is the same tensor for "
                        "every method at a site, so wherever gamma ties sqnr_diff picks the method with the WORST "
                        "output; sqnr_drop the least gamma - beta (the best output where gamma ties); sqnr_absdiff "
                        "the lowest |beta - gamma|. The summary compares the answer with the best uniform method and "
                        "names `policysearch export RUN --pick best` when a policy beats it (default: none)")
    g.add_argument("--space", default="paper", help="space preset name or YAML path")
    g.add_argument("--trials", type=int, default=None,
                   help="evaluation budget for tpe/nsga2/random (default: the strategy's, 20)")
    g.add_argument("--seed", type=int, default=0, help="seed of the strategy and the data selection")
    g.add_argument("--bits", type=int, default=8, help="activation bits")
    g.add_argument("--weight-bits", type=int, default=None, help="weight bits (default: --bits)")
    _add_wiring_arg(g, "paper")
    g.add_argument("--no-relu-repair", action="store_true",
                   help="evaluate a GELU site's relu choice without repairing its MLP (default: repaired by a "
                        "short block-wise distillation to the float block, cached under results/cache/)")
    g = p.add_argument_group("objective and constraints")
    g.add_argument("--objective", default="kl", help="objective preset name or YAML path")
    g.add_argument("--profile", default=None, metavar="FILE",
                   help="cost profile for the latency metric (policysearch profile; default with a latency "
                        "objective or constraint: <results-dir>/profiles/<model>-cpu-b8.json)")
    g.add_argument("--max-latency", type=float, default=None, metavar="R",
                   help="constraint: latency relative to float at most R (e.g. 0.9); the best feasible policy "
                        "is exported, else the closest, marked infeasible; ilp's budget (default: none)")
    g.add_argument("--min-top1", type=float, default=None, metavar="A",
                   help="constraint: top-1 at least A (a fraction, e.g. 0.85); as --max-latency (default: none)")
    g = p.add_argument_group("runner")
    g.add_argument("--runner", default="local", help="runner preset name or YAML path: local, ray_local, ray_cluster")
    g.add_argument("--address", default=None,
                   help="ray runners: the Ray cluster to join (HOST:PORT, ray://HOST:PORT, auto) or local "
                        "(default: the preset's)")
    g.add_argument("--workers", type=int, default=None,
                   help="ray runners: number of actors (default: one per GPU, else per group of CPU cores)")
    g = p.add_argument_group("storage and outputs")
    g.add_argument("--run-name", default=None,
                   help="run folder and study name (letters, digits, . _ + = @ -); the same name resumes "
                        "when the work is the same (default: <model>-<strategy>-w<bits>a<bits>-<time>)")
    g.add_argument("--results-dir", default="results",
                   help="where run folders go (and the study storage, unless --storage)")
    g.add_argument("--storage", default=None,
                   help="Optuna storage URL, any SQLAlchemy URL (default: sqlite:///<results-dir>/studies.db); "
                        "independent of --results-dir")
    g.add_argument("--db", type=int, choices=[20, 10], default=20,
                   help="print ASQNR in the paper's 20*log10 or the conventional 10*log10 dB")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("stages", "after the search, on its answer")
    g.add_argument("--finetune", action="store_true",
                   help="then fine-tune the answer (policysearch finetune RUN; the fine-tuning options below)")
    g.add_argument("--train-batch-size", type=int, default=None, help="with --finetune: training batch size "
                                                                      "(default 128)")
    g.add_argument("--latency", action="store_true",
                   help="then the int8 latency check in ONNX Runtime (policysearch latency RUN; after --finetune "
                        "on the fine-tuned weights; needs the onnx extra)")
    g.add_argument("--latency-batches", default="1,8", help="with --latency: batch sizes")
    g.add_argument("--latency-threads", type=int, default=2, help="with --latency: ONNX Runtime threads")
    _add_finetune_args(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("show", help="the summary a finished run printed at its end, from its run.json",
                       formatter_class=HelpFormatter)
    p.add_argument("run", help="run name (folder under results/) or its path")
    p.add_argument("--results-dir", default="results", help="where run folders are")
    p.add_argument("--db", type=int, choices=[20, 10], default=20, help="ASQNR in 20*log10 or 10*log10 dB")
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("trials", help="every trial of a run's study (table, json or csv)", formatter_class=HelpFormatter)
    p.add_argument("run", help="run name (folder under results/) or its path")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format")
    p.add_argument("--results-dir", default="results", help="where run folders are")
    p.add_argument("--storage", default=None, help="the study's storage URL (default: the one run.json records)")
    p.set_defaults(func=_cmd_trials)

    p = sub.add_parser("finetune", help="QAT (and GELU->ReLU distillation) of a run's answer or a policy file")
    p.add_argument("run", nargs="?", default=None, help="run name (folder under results/) or its path")
    p.add_argument("--policy", default=None, help="a policy JSON file instead of a run")
    _add_model_args(p, default=None)
    p.add_argument("--data", default=None,
                   help="training and evaluation data (default: the run's or policy file's): fmnist, "
                        "imagefolder:PATH with train/ (fmnist-sample trains on its 512 calibration images)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")
    _add_wiring_arg(p, None)
    p.add_argument("--results-dir", default="results")
    p.add_argument("--out", default=None,
                   help="output folder (default: the run folder; for --policy, <results-dir>/finetune-<model>-<hash>)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluation images for top-1 before/after (default: the run's; 0 = all)")
    p.add_argument("--calib-size", type=int, default=None, help="calibration images (default: the run's)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 128)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default 0)")
    _add_finetune_args(p)
    p.add_argument("--restart", action="store_true", help="discard the checkpoints under <out>/finetune/ and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("export", help="write the policy JSON of a finished run")
    p.add_argument("run", help="run name (folder under results/) or its path")
    p.add_argument("--out", default=None, help="output file (default: print the run's policy.json path)")
    p.add_argument("--pick", choices=["answer", "best"], default="answer",
                   help="answer (default): the strategy's own answer; best: the best evaluated policy by the run's "
                        "objective, uniform baselines included (default file: the run's policy-best.json)")
    p.add_argument("--onnx", default=None, metavar="FILE",
                   help="also write the integer model under the policy as ONNX and check it in ONNX Runtime "
                        '(needs pip install "policysearch[onnx]")')
    p.add_argument("--results-dir", default="results")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("profile", help="measure every (site shape, method) kernel and the linear layers of a model")
    _add_model_args(p)
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda[:N] | auto")
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds, median kept (default 20, at least 20)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads while measuring (default 1: small kernels time stably on one)")
    p.add_argument("--results-dir", default="results", help="the profile goes to <results-dir>/profiles/")
    p.add_argument("--out", default=None, help="output file (default: <results-dir>/profiles/<model>-<device>-b<batch>.json)")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("latency", help="int8 latency check of a finished run in ONNX Runtime (writes latency.json)")
    p.add_argument("run", help="run name (folder under results/) or its path, or the output folder of "
                               "`policysearch finetune --policy` (with finetune.json)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds, median kept (default 20, at least 20)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--provider", default="auto", help="auto (TensorRT, else CUDA, else CPU) | cpu | cuda | tensorrt")
    p.add_argument("--int8", choices=["u8s8", "s8s8"], default="u8s8",
                   help="u8s8: uint8 activations, int8 weights (default; faster on CPUs without VNNI) | s8s8")
    p.add_argument("--checkpoint", default=None,
                   help="weights of the float and int8 GELU models (default: the run's own where the training stage "
                        "distilled GELU into ReLU, else the training stage's when there is one, else the run's)")
    p.add_argument("--relu-checkpoint", default=None,
                   help="weights of the models with ReLU sites (default: the training stage's float ReLU model "
                        "when it made one, else those of --checkpoint)")
    p.add_argument("--table", default=None, metavar="FILE", help="also update this latency table (results/latency.md)")
    p.add_argument("--no-keep-onnx", action="store_true", help="do not keep the ONNX files in results/<run>/onnx/")
    p.set_defaults(func=_cmd_latency)

    p = sub.add_parser("report", help="write results/<run>/report.html: figures and tables (extra: report)")
    p.add_argument("run", help="run name (folder under results/) or its path")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--storage", default=None, help="the study's storage URL (default: the one run.json records)")
    p.add_argument("--out", default=None, help="output file (default: results/<run>/report.html)")
    p.add_argument("--device", default=None, help="device for the histograms' forward (default: the run's)")
    p.add_argument("--images", type=int, default=16, help="calibration images in the histograms (default 16)")
    p.add_argument("--no-histograms", action="store_true", help="leave out Figure 2 (it needs a forward)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard for a run's study on 127.0.0.1 (extra: dashboard)")
    p.add_argument("run", nargs="?", default=None,
                   help="run name or folder (default: every study in the results folder's storage)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--storage", default=None, help="storage URL (default: the run's, else <results-dir>/studies.db)")
    p.add_argument("--artifact-dir", default=None,
                   help="artifact store (default: the run's, else <results-dir>/artifacts)")
    p.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080; 0: a free one)")
    p.set_defaults(func=_cmd_dashboard)

    for name, help_ in (("apply", "evaluate a policy file in a fresh process and compare with its metrics"),
                        ("eval", "top-1 of a model in float, or under --policy")):
        p = sub.add_parser(name, help=help_)
        if name == "apply":
            p.add_argument("policy", help="policy JSON file")
            _add_model_args(p, default=None)
        else:
            p.add_argument("--policy", default=None, help="policy JSON file (default: float model)")
            _add_model_args(p, default=None, model_help="zoo name or timm ViT/DeiT/Swin name (default: the "
                            f"model --policy records, else {EVAL_DEFAULT_MODEL})")
        _add_wiring_arg(p, None)
        _add_data_args(p)
        p.add_argument("--eval-size", type=int, default=None,
                       help="evaluation images (default: as recorded in the policy file, else all)")
        p.set_defaults(func=_cmd_eval)
    return parser


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (policysearch finetune; defaults in policysearch.finetune.FinetuneSettings)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="QAT epochs over the training split (default 1)")
    length.add_argument("--steps", type=int, default=None, help="QAT optimizer steps instead of epochs (default: none, epochs count)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate, AdamW, warm-up + cosine (default 1e-4)")
    g.add_argument("--kd-temperature", type=float, default=None, help="distillation temperature (default 1)")
    g.add_argument("--kd-weight", type=float, default=None,
                   help="weight of the distillation term; 1 - it goes to cross-entropy on labels (default 1)")
    g.add_argument("--ste", choices=["reference", "float"], default=None,
                   help="gradients through the integer kernels: reference (the integer graph with straight-through "
                        "floors and rounds, as I-BERT / I-ViT; default) or float (the float operator's)")
    g.add_argument("--ranges", choices=["ema", "frozen"], default=None,
                   help="activation ranges in training: ema (I-ViT's running ranges, momentum 0.95; default) or frozen")
    g.add_argument("--relu-blocks-per-stage", type=int, default=None,
                   help="GELU->ReLU distillation: GELU sites switched per stage (default 1)")
    g.add_argument("--relu-order", choices=["forward", "backward"], default=None,
                   help="GELU->ReLU distillation: input side first (forward, default) or output side first")
    relu_length = g.add_mutually_exclusive_group()
    relu_length.add_argument("--relu-epochs", type=int, default=None, help="epochs per ReLU stage (default: as QAT)")
    relu_length.add_argument("--relu-steps", type=int, default=None, help="steps per ReLU stage (default: as QAT)")
    g.add_argument("--relu-lr", type=float, default=None, help="learning rate of the ReLU stages (default: --lr)")


def _add_data_args(p: Any) -> None:
    p.add_argument("--data", default="fmnist-sample",
                   help="fmnist-sample (shipped) | fmnist | imagefolder:PATH")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.nargs == 0:  # a flag
            return text + " (default: off)" if action.default is False else text
        return text + (" (default: none)" if action.default is None else " (default: %(default)s)")


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments; for ``run --config FILE`` the file's settings are the defaults, so the options
    given on the command line override them."""
    args = parser.parse_args(argv)
    if args.command == "run" and args.config:
        run_parser = parser._subparsers._group_actions[0].choices["run"]  # noqa: SLF001 - argparse has no getter
        valid = {f.name for f in dataclasses.fields(API.get("SearchConfig"))}
        run_parser.set_defaults(**_config_defaults(args.config, valid))
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except user_errors() as exc:
        print(f"policysearch: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
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

"""A test bed where the choice matters: the ceiling, the uniform methods and every strategy's answer.

    python reproduce/headroom.py --data fmnist [--models fmnist_vit fmnist_swin] [--bits 8 6] [--append]
    python reproduce/headroom.py --random-only [--random-models deit_small_patch16_224 ...] --append
    python reproduce/headroom.py --render   # results/headroom.md from its record, results/headroom.json
    python reproduce/headroom.py --quick    # tiny sizes on the shipped sample (a smoke run)

Per (model, bits), ``paper`` wiring, the same quantized linear layers throughout:

* **zoo models** (trained weights): each strategy (``--strategies``) is run with each space
  (``--spaces``: ``paper``, and ``data_aware`` = paper + the fitted methods) through the public
  driver, :func:`policysearch.search.search`, on the first ``--search-size`` evaluation images
  (``exhaustive``, ``ilp`` and ``unified`` measure every single-site change: they run on the
  first ``--single-site-size`` images and share those measurements through the study storage;
  ``tpe`` gets ``--tpe-trials`` new policies). Then float, the ceiling (every non-linear site
  ``fp32``), each uniform method of the widest space and each distinct answer are evaluated on
  ``--final-size`` images (default: all) by one evaluator, so that every row is paired over the
  same images;
* **random-weight models** (timm, ``pretrained=False``, 10 classes, the data resized to the
  model's input): only the ceiling and the uniform methods, on ``--random-size`` images. Their
  labels mean nothing to random weights, so top-1 is not reported: agreement with the float
  model's top-1 and KL(float || quantized) are.

Each row is compared with the *best uniform method* (highest top-1, ties and unlabelled data by the
lowest KL; the uniform policies of every space run are candidates), paired per image with the 95%
interval of :mod:`policysearch.stats`: top-1 in points, KL in nats (per-image KL), agreement in
points. Logit SQNR (dB, 20·log10) to the float model is a per-policy figure without an interval.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policysearch.errors import PolicySearchError
from policysearch.numerics import NUMERICS_VERSION
from policysearch.objectives.headroom import CEILING_METHOD, best_uniform, ceiling_policy
from policysearch.policy import Policy
from policysearch.result import EvalResult
from policysearch.search import SearchConfig, search
from policysearch.spaces import load_space
from policysearch.spec import EvaluatorSpec
from policysearch.stats import paired_difference

FORMAT = "policysearch.headroom/v1"
STRATEGIES = ("sqnr_diff", "sqnr_output", "exhaustive", "tpe", "ilp", "unified")
SINGLE_SITE = frozenset({"exhaustive", "ilp", "unified"})
SPACES = ("paper", "data_aware")
RANDOM_MODELS = ("deit_small_patch16_224", "swin_tiny_patch4_window7_224")
METRICS = ("top1", "agreement", "kl", "logit_sqnr")

log = logging.getLogger("headroom")


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """The image counts and budgets of one run (recorded with every block)."""

    search: int | None = 1000
    single_site: int | None = 300
    final: int | None = None
    tpe_trials: int = 12
    random: int = 64
    calib: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- evaluation of the rows -------------------------------------------------------------------

def _interval(a: Any, b: Any, scale: float = 1.0) -> dict[str, float]:
    d, lo, hi = paired_difference(a, b, scale=scale)
    return {"diff": d, "low": lo, "high": hi}


def _per_image(result: EvalResult) -> dict[str, Any]:
    if result.images is None:
        raise PolicySearchError("an evaluation without per-image scores: this script needs the current evaluator")
    return result.images.arrays()


def _row(label: str, result: EvalResult | None, *, float_arrays: Mapping[str, Any] | None = None,
         **extra: Any) -> dict[str, Any]:
    """One row: its metrics and per-image arrays (dropped before the row is recorded)."""
    if float_arrays is not None:
        metrics = {"top1": float_arrays["top1"], "agreement": 1.0, "kl": 0.0, "logit_sqnr": math.inf}
        arrays = {k: float_arrays[k] for k in ("correct", "agree", "kl")}
        return {"label": label, "metrics": metrics, "_arrays": arrays, **extra}
    assert result is not None
    if not result.ok:
        return {"label": label, "error": result.error, **extra}
    metrics = {k: float(result.metrics[k]) for k in METRICS if k in result.metrics}
    return {"label": label, "metrics": metrics, "_arrays": _per_image(result), **extra}


def _compare(rows: list[dict[str, Any]], best: str | None) -> None:
    """Each row's paired differences from the row labelled ``best`` (in place); arrays dropped."""
    ref = next((r["_arrays"] for r in rows if r["label"] == best and "_arrays" in r), None)
    for row in rows:
        a = row.pop("_arrays", None)
        if ref is None or a is None or row["label"] == best:
            continue
        vs: dict[str, Any] = {"kl": _interval(a["kl"], ref["kl"]),
                              "agreement": _interval(a["agree"], ref["agree"], 100)}
        if a["correct"] is not None and ref["correct"] is not None:
            vs["top1"] = _interval(a["correct"], ref["correct"], 100)
        row["vs_best_uniform"] = vs


def _counts(policy: Policy) -> dict[str, dict[str, int]]:
    return policy.method_counts()


class Final:
    """One evaluator on the final images for a model; evaluates each distinct policy once."""

    def __init__(self, spec: EvaluatorSpec) -> None:
        t0 = time.perf_counter()
        self.evaluator = spec.build()
        self.build_s = time.perf_counter() - t0
        self.cache: dict[str, tuple[EvalResult, float]] = {}
        ev = self.evaluator
        self.n = int(ev.float_predictions.numel())
        labels = ev.labels.cpu().numpy() if ev.labels is not None else None
        pred = ev.float_predictions.numpy()
        self.float_arrays = {"correct": None if labels is None else pred == labels,
                             "agree": np.ones(self.n, dtype=bool), "kl": np.zeros(self.n),
                             "top1": float(ev.float_metrics.get("top1", math.nan))}

    def evaluate(self, policy: Policy) -> tuple[EvalResult, float]:
        key = policy.key()
        if key not in self.cache:
            t0 = time.perf_counter()
            res = self.evaluator.evaluate(policy)
            self.cache[key] = (res, time.perf_counter() - t0)
            log.info("  evaluated %s on %d images in %.0f s", _short(policy), self.n, self.cache[key][1])
        return self.cache[key]

    def sites(self) -> list[Any]:
        return self.evaluator.sites


def _short(policy: Policy) -> str:
    return "; ".join(f"{k}: " + ",".join(f"{m}{n}" for m, n in sorted(v.items()))
                     for k, v in _counts(policy).items())


def _baselines(final: Final, bits: int, spaces: Sequence[str]) -> tuple[list[dict[str, Any]], str | None]:
    """Float, ceiling and the uniform policies of every space (each method once)."""
    space = load_space(spaces[-1], final.sites(), weight_bits=bits, act_bits=bits)
    uniform: dict[str, Policy] = {}
    for name in spaces:
        for m, p in load_space(name, final.sites(), weight_bits=bits, act_bits=bits).uniform_policies().items():
            uniform.setdefault(m, p)
    rows = [_row("float", None, float_arrays=final.float_arrays, kind="float"),
            _row("ceiling", final.evaluate(ceiling_policy(space))[0], kind="ceiling",
                 note=f"{CEILING_METHOD} at every non-linear site")]
    results = {m: final.evaluate(p)[0] for m, p in uniform.items()}
    for m, p in uniform.items():
        rows.append(_row(f"uniform {m}", results[m], kind="uniform", methods=_counts(p)))
    best = best_uniform(results)
    return rows, None if best is None else f"uniform {best}"


# -- one (model, bits) block ------------------------------------------------------------------

def _search_config(model: str, data: str, bits: int, space: str, strategy: str, size: int | None,
                   sizes: Sizes, work: Path, device: str) -> SearchConfig:
    return SearchConfig(
        strategy=strategy, model=model, data=data, space=space, objective="kl", weight_bits=bits, act_bits=bits,
        wiring="paper", eval_size=size, calib_size=sizes.calib, device=device, results_dir=str(work),
        run_name=f"{model}-w{bits}a{bits}-{space}-{strategy}-n{size or 'all'}",
        trials=sizes.tpe_trials if strategy == "tpe" else None, relu_repair=False)


def zoo_block(model: str, *, data: str, bits: int, strategies: Sequence[str], spaces: Sequence[str],
              sizes: Sizes, work: Path, device: str, final: Final) -> dict[str, Any]:
    """Run every (space, strategy) search, then evaluate every row on the final images."""
    t0 = time.perf_counter()
    answers = []
    # grouped by image count: the driver keeps one evaluator per process, rebuilt when the count changes
    runs = [(space, strategy, sizes.single_site if strategy in SINGLE_SITE else sizes.search)
            for space in spaces for strategy in strategies]
    for space, strategy, size in sorted(runs, key=lambda r: (r[2] is None, r[2] or 0)):
        ts = time.perf_counter()
        res = search(_search_config(model, data, bits, space, strategy, size, sizes, work, device), progress=False)
        answers.append((space, strategy, size, res.policy, time.perf_counter() - ts, res.evaluated))
        log.info("%s W%dA%d %s/%s on %s images: %s (%.0f s, %d evaluated)", model, bits, bits, space, strategy,
                 size or "all", _short(res.policy), answers[-1][4], res.evaluated)
    answers.sort(key=lambda a: (list(spaces).index(a[0]), list(strategies).index(a[1])))
    rows, best = _baselines(final, bits, spaces)
    for space, strategy, size, policy, secs, evaluated in answers:
        result, _ = final.evaluate(policy)
        rows.append(_row(strategy, result, kind="answer", space=space, search_images=size,
                         search_s=round(secs, 1), search_evaluated=evaluated, methods=_counts(policy),
                         same_as=_same_as(policy, bits, final, spaces)))
    _compare(rows, best)
    return {"model": model, "weights": "zoo", "bits": bits, "numerics": NUMERICS_VERSION, "images": final.n,
            "labels": True,
            "best_uniform": best, "sizes": sizes.to_dict(), "strategies": list(strategies), "spaces": list(spaces),
            "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def _same_as(policy: Policy, bits: int, final: Final, spaces: Sequence[str]) -> str | None:
    """``uniform <method>`` when the answer is a uniform policy (or ``ceiling``), else None."""
    for name in spaces:
        space = load_space(name, final.sites(), weight_bits=bits, act_bits=bits)
        for m, p in space.uniform_policies().items():
            if p.key() == policy.key():
                return f"uniform {m}"
        if ceiling_policy(space).key() == policy.key():
            return "ceiling"
    return None


def random_block(final: Final, model: str, *, bits: int, spaces: Sequence[str], sizes: Sizes,
                 model_args: Mapping[str, Any]) -> dict[str, Any]:
    """Ceiling and uniform methods of a random-weight model: agreement and KL only."""
    t0 = time.perf_counter()
    rows, _ = _baselines(final, bits, spaces)
    # no meaningful labels: the best uniform method by KL alone
    results = {r["label"]: r for r in rows if r.get("kind") == "uniform" and "metrics" in r}
    best = min(results, key=lambda k: results[k]["metrics"].get("kl", math.inf)) if results else None
    for r in rows:  # random weights: their labels mean nothing
        if "_arrays" in r:
            r["_arrays"]["correct"] = None
        r.get("metrics", {}).pop("top1", None)
    _compare(rows, best)
    return {"model": model, "weights": "random", "model_args": dict(model_args), "bits": bits,
            "numerics": NUMERICS_VERSION, "images": final.n,
            "labels": False, "best_uniform": best, "sizes": sizes.to_dict(), "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


# -- the record and the Markdown --------------------------------------------------------------

def read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    if rec.get("format") != FORMAT:
        raise PolicySearchError(f"{path}: not a headroom record (format {rec.get('format')!r})")
    return rec


def _key(block: Mapping[str, Any]) -> tuple[str, str, int]:
    return block["model"], block["weights"], int(block["bits"])


def write_record(path: Path, *, commands: list[str], data: str, blocks: list[dict[str, Any]]) -> None:
    rec = {"format": FORMAT, "numerics": NUMERICS_VERSION, "torch": torch.__version__, "commands": commands,
           "data": data, "blocks": blocks}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_finite(rec), indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _iv(d: Mapping[str, float] | None, spec: str) -> str:
    if not d:
        return ""
    star = "*" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{d['diff']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}]{star}"


def _num(v: Any, spec: str, scale: float = 1.0) -> str:
    if v is None:
        return ""
    if v == "inf":
        return "∞"
    return f"{scale * float(v):{spec}}"


def _methods(counts: Mapping[str, Mapping[str, int]] | None) -> str:
    if not counts:
        return ""
    return "; ".join(f"{k}: " + ", ".join(f"{m} {n}" for m, n in sorted(v.items())) for k, v in counts.items())


def _table(block: Mapping[str, Any]) -> list[str]:
    labelled = block["labels"]
    head = ["row", "space", "searched on"]
    head += (["top-1 %", "Δ top-1 (points)"] if labelled else [])
    head += ["agreement %", "KL (×1e-3 nats)", "Δ KL (×1e-3)", "logit SQNR (dB)"]
    head += ([] if labelled else ["Δ agreement (points)"]) + ["methods"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in block["rows"]:
        label = f"**{r['label']}** (best)" if r["label"] == block["best_uniform"] else r["label"]
        if r.get("same_as"):
            label += f" (= {r['same_as']})"
        where = r.get("space") or ""
        searched = f"{r['search_images']} images" if r.get("search_images") else (
            "all" if r.get("kind") == "answer" else "")
        if "error" in r:
            out.append(f"| {label} | {where} | {searched} | failed: {r['error']} |")
            continue
        m, vs = r["metrics"], r.get("vs_best_uniform") or {}
        kl = vs.get("kl")
        kl_milli = {k: 1e3 * v for k, v in kl.items()} if kl else None
        cells = [label, where, searched]
        if labelled:
            cells += [_num(m.get("top1"), ".2f", 100), _iv(vs.get("top1"), "+.2f")]
        cells += [_num(m.get("agreement"), ".2f", 100), _num(m.get("kl"), ".2f", 1e3), _iv(kl_milli, "+.2f"),
                  _num(m.get("logit_sqnr"), ".2f")]
        if not labelled:
            cells += [_iv(vs.get("agreement"), "+.2f")]
        cells += [_methods(r.get("methods"))]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _by_label(block: Mapping[str, Any], label: str) -> Mapping[str, Any] | None:
    return next((r for r in block["rows"] if r["label"] == label and "metrics" in r), None)


def summary(blocks: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain sentences: headroom per zoo block, and whether any answer beats the best uniform on KL."""
    out = []
    zoo = [b for b in blocks if b["weights"] == "zoo"]
    for b in zoo:
        ceil = _by_label(b, "ceiling")
        room = (ceil or {}).get("vs_best_uniform", {})
        t, k = room.get("top1"), room.get("kl")
        top1_zero = t is not None and t["low"] <= 0 <= t["high"]
        out.append(f"- **{b['model']} W{b['bits']}A{b['bits']}** ({b['images']} images, best uniform "
                   f"`{b['best_uniform']}`): ceiling minus best uniform {_iv(t, '+.2f')} top-1 points, "
                   f"{_iv({x: 1e3 * y for x, y in k.items()} if k else None, '+.2f')} ×1e-3 nats KL; "
                   + ("no choice of non-linear methods can measurably beat the best uniform method on top-1 here, "
                      "so strategies are compared on KL and logit SQNR." if top1_zero else
                      "the top-1 headroom interval excludes 0."))
        wins = [r for r in b["rows"] if r.get("kind") == "answer" and (r.get("vs_best_uniform") or {}).get("kl")
                and r["vs_best_uniform"]["kl"]["high"] < 0]
        da = [r for r in wins if r.get("space") == "data_aware"]
        if da:
            out.append("  With the data-aware methods, "
                       + ", ".join(f"`{r['label']}` (KL {_iv({x: 1e3 * y for x, y in r['vs_best_uniform']['kl'].items()}, '+.2f')}"
                                   f" ×1e-3, top-1 {_iv(r['vs_best_uniform'].get('top1'), '+.2f')})" for r in da)
                       + " beat the best uniform method on KL with an interval that excludes 0.")
        else:
            out.append("  No strategy with the data-aware methods beats the best uniform method on KL with an "
                       "interval that excludes 0.")
        paper_wins = [r for r in wins if r.get("space") == "paper"]
        if paper_wins:
            out.append("  With the paper's space alone: " + ", ".join(f"`{r['label']}`" for r in paper_wins)
                       + " do.")
    for b in (b for b in blocks if b["weights"] == "random"):
        ceil = _by_label(b, "ceiling")
        k = (ceil or {}).get("vs_best_uniform", {}).get("kl")
        a = (ceil or {}).get("vs_best_uniform", {}).get("agreement")
        out.append(f"- **{b['model']} (random weights) W{b['bits']}A{b['bits']}** ({b['images']} images, lowest-KL "
                   f"uniform `{b['best_uniform']}`): ceiling minus it {_iv({x: 1e3 * y for x, y in k.items()} if k else None, '+.2f')}"
                   f" ×1e-3 nats KL, {_iv(a, '+.2f')} agreement points.")
    return out


def missing(blocks: Sequence[Mapping[str, Any]]) -> list[str]:
    """What the issue's full table asks for and the record does not hold."""
    have = {(b["model"], b["weights"], int(b["bits"])) for b in blocks}
    out = [f"{m}{' (random weights)' if w == 'random' else ''} W{b}A{b}"
           for w, models in (("zoo", ("fmnist_vit", "fmnist_swin")), ("random", RANDOM_MODELS))
           for m in models for b in (8, 6) if (m, w, b) not in have]
    for b in blocks:
        if b["weights"] == "zoo":
            gone = [f"space {s}" for s in SPACES if s not in b["spaces"]]
            gone += [f"strategy {s}" for s in STRATEGIES if s not in b["strategies"]]
            if gone:
                out.append(f"{b['model']} W{b['bits']}A{b['bits']}: " + ", ".join(gone))
    return out


def numerics_line(blocks: Sequence[Mapping[str, Any]], default: str) -> str:
    """The file's ``Numerics:`` statement: the versions its blocks were made with, and whether
    each is the current code's."""
    made = sorted({b.get("numerics", default) for b in blocks} or {default})
    old = [v for v in made if v != NUMERICS_VERSION]
    line = "Numerics: made with numerics " + ", ".join(made)
    if old:
        return line + (f"; the current code's is {NUMERICS_VERSION}: the blocks made with "
                       f"{', '.join(old)} are an earlier numerics version, not regenerated.")
    return line + ", the current code's."


def block_commands(rec: Mapping[str, Any]) -> list[str]:
    """The commands that made the record's blocks, in order (each block names its own; a record made
    before blocks did lists every command it was appended with)."""
    if any("command" not in b for b in rec["blocks"]):
        return list(rec["commands"])
    return list(dict.fromkeys(b["command"] for b in rec["blocks"]))


def render(rec: Mapping[str, Any]) -> str:
    blocks = rec["blocks"]
    absent = missing(blocks)
    lines = ["# Headroom: where the choice of non-linear methods can matter", "",
             "Produced by " + ", then ".join(f"`{c}`" for c in block_commands(rec))
             + f" (numerics {rec['numerics']} unless a table says otherwise, torch {rec['torch']}); rendered from `results/headroom.json` "
             "by `python reproduce/headroom.py --render`.", "", numerics_line(blocks, rec["numerics"]), "",
             "## Summary", "", *summary(blocks), "",
             *(["Not measured (not run within this record's compute budget): " + "; ".join(absent) + ".", ""]
               if absent else []),
             "## How to read the tables", "",
             "Wiring `paper` (one integer pipeline for every method), the same quantized linear layers in every "
             "row of a table. *ceiling*: every non-linear site in float (`fp32`) on those layers, the best any "
             "choice of non-linear methods could give back. Each Δ is the row minus the best uniform method "
             "(bold), paired per image with a 95% interval; `*` marks an interval that excludes 0. KL is "
             "KL(float || quantized) per image, averaged; lower is better, so a negative Δ KL is better than the "
             "best uniform method. Logit SQNR (dB, 20·log10) to the float model has no interval. Answers are "
             "searched (objective `kl`) on the first *searched on* evaluation images through "
             "`policysearch.search.search`, then evaluated with every other row on all the images of the table. "
             "`(= uniform x)`: the answer is that uniform policy.", ""]
    for b in blocks:
        sz = b["sizes"]
        title = f"## {b['model']}" + (" (random weights, timm pretrained=False)" if b["weights"] == "random" else "")
        lines += [f"{title}, W{b['bits']}A{b['bits']}", ""]
        if b.get("numerics", rec["numerics"]) != rec["numerics"]:
            lines += [f"Made with the earlier numerics {b['numerics']} (not regenerated under {rec['numerics']}).", ""]
        if b["weights"] == "zoo":
            lines += [f"{b['images']} evaluation images of `{rec['data']}`; strategies {', '.join(b['strategies'])} "
                      f"with spaces {', '.join(b['spaces'])}; tpe {sz['tpe_trials']} trials; "
                      f"calibration {sz['calib'] or 'the data default'}; {b['seconds']:.0f} s.", ""]
        else:
            args = ", ".join(f"{k}={v}" for k, v in b.get("model_args", {}).items())
            lines += [f"{b['images']} images of `{rec['data']}` resized to the model's input ({args}); random "
                      "weights make the labels meaningless, so there is no top-1: agreement is with the float "
                      "model's top-1, and the best uniform method is the one with the lowest KL. "
                      f"{b['seconds']:.0f} s.", ""]
        lines += [*_table(b), ""]
    return "\n".join(lines)


def render_file(record: Path, out: Path) -> None:
    rec = read_record(record)
    if rec is None:
        raise PolicySearchError(f"{record} does not exist: run this script first")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rec))


# -- driving it -------------------------------------------------------------------------------

def run(*, models: Sequence[str], random_models: Sequence[str], data: str, bits: Sequence[int],
        strategies: Sequence[str], spaces: Sequence[str], sizes: Sizes, work: Path, device: str,
        random_img_size: int | None = None, on_block: Callable[[dict[str, Any]], None] | None = None
        ) -> list[dict[str, Any]]:
    """Every block (zoo models first); ``on_block`` gets each as it finishes."""
    blocks = []
    for model in models:
        final = Final(EvaluatorSpec(model=model, data=data, device=device, eval_size=sizes.final,
                                    calib_size=sizes.calib, wiring="paper", reuse=False))
        log.info("%s: final evaluator on %d images built in %.0f s", model, final.n, final.build_s)
        for b in bits:
            blocks.append(zoo_block(model, data=data, bits=b, strategies=strategies, spaces=spaces, sizes=sizes,
                                    work=work, device=device, final=final))
            if on_block:
                on_block(blocks[-1])
    for model in random_models:
        args: dict[str, Any] = {"num_classes": 10}
        if random_img_size is not None:
            args["img_size"] = random_img_size
        final = Final(EvaluatorSpec(model=model, model_args=tuple(sorted(args.items())), data=data, device=device,
                                    eval_size=sizes.random, calib_size=sizes.calib or sizes.random,
                                    wiring="paper", reuse=False))
        for b in bits:
            blocks.append(random_block(final, model, bits=b, spaces=spaces, sizes=sizes, model_args=args))
            if on_block:
                on_block(blocks[-1])
    return blocks


def merge(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with each block of ``new`` replacing the one of the same (model, weights, bits)."""
    out = {_key(b): dict(b) for b in old}
    for b in new:
        out[_key(b)] = dict(b)
    return list(out.values())


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["fmnist_vit", "fmnist_swin"])
    ap.add_argument("--random-models", nargs="*", default=list(RANDOM_MODELS))
    ap.add_argument("--random-only", action="store_true", help="only the random-weight models")
    ap.add_argument("--random-img-size", type=int, default=None, help="default: the model's own")
    ap.add_argument("--data", default="fmnist")
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6])
    ap.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    ap.add_argument("--spaces", nargs="+", default=list(SPACES))
    ap.add_argument("--search-size", type=int, default=1000, help="images the rules and tpe search on")
    ap.add_argument("--single-site-size", type=int, default=300, help="images exhaustive/ilp/unified search on")
    ap.add_argument("--final-size", type=int, default=None, help="images every row is evaluated on (default: all)")
    ap.add_argument("--tpe-trials", type=int, default=12)
    ap.add_argument("--random-size", type=int, default=64, help="images for the random-weight models")
    ap.add_argument("--calib-size", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work-dir", default=".devdata/headroom", help="the searches' run folders and study storage")
    ap.add_argument("--out", default="results/headroom.md")
    ap.add_argument("--record", default=None, help="default: --out with .json")
    ap.add_argument("--append", action="store_true", help="keep the recorded blocks; replace those run again")
    ap.add_argument("--render", action="store_true", help="only write --out from the record")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: fmnist-sample, fmnist_vit, W8A8, tiny sizes, 2 tpe trials")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    record = Path(args.record) if args.record else out.with_suffix(".json")
    if args.render:
        render_file(record, out)
        return out
    if args.quick:
        args.data = args.data if args.data != "fmnist" else "fmnist-sample"
        args.models, args.bits = args.models[:1], args.bits[:1]
        args.search_size, args.single_site_size, args.final_size = 16, 8, 32
        args.tpe_trials, args.random_size = 2, 4
    if args.random_only:
        args.models = []
    unknown = sorted(set(args.strategies) - set(STRATEGIES))
    if unknown:
        raise PolicySearchError(f"--strategies: {', '.join(unknown)} not in this table; valid: {', '.join(STRATEGIES)}")
    sizes = Sizes(search=args.search_size, single_site=args.single_site_size, final=args.final_size,
                  tpe_trials=args.tpe_trials, random=args.random_size, calib=args.calib_size)
    cmd = "python reproduce/headroom.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    prev = read_record(record) if args.append else None
    if prev is not None and prev["data"] != args.data:
        raise PolicySearchError(f"{record} holds blocks of --data {prev['data']}; --append needs the same")
    old, commands = (prev["blocks"], [*prev["commands"], cmd]) if prev else ([], [cmd])
    done: list[dict[str, Any]] = []

    def write(block: dict[str, Any]) -> None:
        done.append({**block, "command": cmd})
        # re-read under --append: another process (e.g. the random-weight models) may have added blocks
        now = read_record(record) if args.append else None
        base, cmds = (now["blocks"], now["commands"]) if now else (old, [])
        cmds = [*cmds, *(c for c in commands if c not in cmds)]
        write_record(record, commands=cmds, data=args.data, blocks=merge(base, done))
        render_file(record, out)
        log.info("%s: %s W%dA%d written (%.0f s)", out, block["model"], block["bits"], block["bits"], block["seconds"])

    run(models=args.models, random_models=args.random_models, data=args.data, bits=args.bits,
        strategies=args.strategies, spaces=args.spaces, sizes=sizes, work=Path(args.work_dir), device=args.device,
        random_img_size=args.random_img_size, on_block=write)
    return out


if __name__ == "__main__":
    main()

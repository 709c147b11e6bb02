"""The fine-tuning tables of ``results/finetune.md``: the jobs that produce them, and the rendering.

    python reproduce/finetune_tables.py run geluless [--models fmnist_vit,fmnist_swin]
    python reproduce/finetune_tables.py run table5   [--models ...] [--bits 8,6] [--epochs 1]
    python reproduce/finetune_tables.py render       [--out results/finetune.md] [--epochs 1,N]

Every job is one ``policysearch finetune`` (:func:`policysearch.finetune.finetune`) on the full
Fashion-MNIST (``--data fmnist``: 60,000 training images, evaluation on all 10,000 test images),
``paper`` wiring, the default settings unless given, in its own folder under ``--root``
(``results/finetune/``), with per-image predictions saved for paired intervals. A job that has
finished is skipped, an interrupted one resumes, so ``run`` can be repeated until everything is
there and ``render`` writes whatever has finished, listing the missing rows with the command
that fills them.

* ``geluless``: both zoo models with every GELU replaced by ReLU by iterative distillation (one
  block per stage, input side first, one epoch per stage), then the 8-bit integer policy (I-BERT
  softmax and LayerNorm, ReLU in place of GELU) after QAT (``--epochs``, default 1). The paper's
  claim: within 0.5 points of the float GELU model.
* ``table5`` (the paper's Tables 4 and 5): uniform ibert / fqvit / ivit and the mixed policies of
  the SQNR rules (``sqnr_diff``, ``sqnr_drop``, ``sqnr_absdiff``, ``sqnr_output``) and of one
  search strategy (``tpe``, 40 trials), at W8A8 and W6A6, before QAT and after ``--epochs``
  epochs; the mixed policies come from ``policysearch run`` on the same data (1,000 evaluation
  images per trial). The rules' rows after QAT are the paper's Table 2.

Intervals: for two policies evaluated on the same images, the 95% interval of the difference in
top-1 is ``mean(d) +- 1.96 sd(d) / sqrt(n)`` over the per-image differences ``d`` in correctness
(each -1, 0 or 1): a paired normal interval.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policysearch.errors import PolicySearchError
from policysearch.numerics import NUMERICS_VERSION
from policysearch.stats import paired_interval

__all__ = ["Job", "Kept", "jobs", "main", "paired_interval", "read_kept", "render", "write_kept"]

log = logging.getLogger(__name__)

ROOT = Path("results/finetune")
MODELS = ("fmnist_vit", "fmnist_swin")
UNIFORM = ("ibert", "fqvit", "ivit")
RULES = ("sqnr_diff", "sqnr_drop", "sqnr_absdiff", "sqnr_output")
STRATEGY = "tpe"
STRATEGY_TRIALS = 40
MODULE = "python reproduce/finetune_tables.py"


@dataclass(frozen=True, kw_only=True)
class Job:
    part: str
    model: str
    bits: int
    policy: str  # a uniform method, a strategy name, or "geluless"
    epochs: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.model}-w{self.bits}a{self.bits}-{self.policy}-e{self.epochs}"

    def folder(self, root: Path) -> Path:
        return root / self.part / self.name

    def command(self, root: Path) -> str:
        extra = "" if root == ROOT else f" --root {shlex.quote(str(root))}"
        return (f"{MODULE} run {self.part} --models {self.model} --bits {self.bits} --epochs {self.epochs} "
                f"--only {self.policy}{extra}")


def jobs(part: str, *, models: Sequence[str] = MODELS, bits: Sequence[int] = (8, 6),
         epochs: Sequence[int] = (1,)) -> list[Job]:
    if part == "geluless":
        return [Job(part=part, model=m, bits=8, policy="geluless", epochs=e) for m in models for e in epochs]
    if part == "table5":
        names = [*UNIFORM, *RULES, STRATEGY]
        return [Job(part=part, model=m, bits=b, policy=p, epochs=e)
                for m in models for b in bits for e in epochs for p in names]
    raise SystemExit(f"unknown part {part!r}; valid: geluless, table5")


# -- running -----------------------------------------------------------------------------------

def _sites(model: str) -> list[Any]:
    import policysearch as ps
    from policysearch.models.loading import load_model

    m = load_model(model)
    ps.prepare(m, wiring="paper")
    return ps.find_sites(m)


def _policy(job: Job, root: Path, device: str, progress: bool) -> Any:
    """The job's policy: a uniform one, the GELU-less one, or a search run's answer (run first)."""
    from policysearch.policy import Policy, read_policy

    if job.policy == "geluless":
        return Policy.uniform(_sites(job.model), {"softmax": "ibert", "gelu": "relu", "layernorm": "ibert"},
                              weight_bits=job.bits, act_bits=job.bits)
    if job.policy in UNIFORM:
        return Policy.uniform(_sites(job.model), job.policy, weight_bits=job.bits, act_bits=job.bits,
                              fallback={"gelu": "ibert"})
    from policysearch.search import SearchConfig, search

    run_name = f"{job.model}-w{job.bits}a{job.bits}-{job.policy}"
    runs = root / "runs"
    config = SearchConfig(strategy=job.policy, model=job.model, data="fmnist", space="paper", objective="kl",
                          trials=STRATEGY_TRIALS if job.policy == STRATEGY else None, weight_bits=job.bits,
                          act_bits=job.bits, wiring="paper", run_name=run_name, results_dir=str(runs),
                          storage=f"sqlite:///{runs}/studies.db", device=device, eval_size=1000)
    if not (runs / run_name / "policy.json").is_file():
        search(config, progress=progress)
    return read_policy(runs / run_name / "policy.json")


def run_job(job: Job, root: Path, *, device: str = "auto", progress: bool = True, **options: Any) -> Path:
    from policysearch.finetune import finetune

    out = job.folder(root)
    if _finished(out):
        log.info("%s: finished, skipped", job.name)
        return out
    policy = _policy(job, root, device, progress)
    settings = {"epochs": job.epochs, **options}
    if job.policy == "geluless":
        settings.setdefault("relu_epochs", 1)
    finetune(policy=policy, model=job.model, data="fmnist", wiring="paper", eval_size=None, calib_size=None,
             out=out, device=device, progress=progress, predictions=True, **settings)
    return out


# -- rendering ---------------------------------------------------------------------------------

def _finished(folder: Path) -> bool:
    """A job folder with its record and per-image predictions: what ``run`` skips and ``render`` reads."""
    return (folder / "finetune.json").is_file() and (folder / "finetune" / "predictions.npz").is_file()


def _load(folder: Path) -> dict[str, Any] | None:
    import numpy as np

    rec, pred = folder / "finetune.json", folder / "finetune" / "predictions.npz"
    if not _finished(folder):
        return None
    data = json.loads(rec.read_text())
    with np.load(pred) as z:
        data["pred"] = {k: z[k] for k in z.files}
    return data


def _top1(pred: Any, labels: Any) -> float:
    import numpy as np

    return 100 * float((np.asarray(pred) == np.asarray(labels)).mean())


def _ci(d: tuple[float, float, float]) -> str:
    return f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"


def _verdict(d: tuple[float, float, float]) -> str:
    """Better / worse when the paired interval excludes 0, else no difference measurable."""
    return "better" if d[1] > 0 else "worse" if d[2] < 0 else "no measurable difference"


EPOCHS_DIR = re.compile(r"-e(\d+)$")
KEPT_MARK = "*"
KEPT_FORMAT = "policysearch.finetune-kept/v1"

Interval = tuple[float, float, float]


# -- kept records: figures whose job folder is not in this checkout --------------------------------

@dataclass(frozen=True, kw_only=True)
class Kept:
    """The figures of one job, recorded in ``kept.json`` so that a checkout without its folder renders them.

    ``figures`` by part: ``geluless``: float, relu_float, before, after (top-1 %), after_minus_float
    (a paired interval), hours, device; ``table5``: float and, per column (``before``, ``after``),
    ``top1``, ``interval`` and ``reference`` (the best uniform method and its top-1 the interval was
    paired with; None for a uniform method); ``ste``: before, after, agreement, trained_ranges (top-1 %),
    qat_seconds."""

    part: str
    job: str
    command: str
    numerics: str
    figures: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"part": self.part, "job": self.job, "command": self.command, "numerics": self.numerics,
                "figures": self.figures}


def read_kept(path: Path) -> dict[tuple[str, str], Kept]:
    """The kept records of ``path`` by (part, job name); none when the file is not there."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("format") != KEPT_FORMAT:
        raise PolicySearchError(f"{path}: not a kept-figures file (format {data.get('format')!r}, "
                                f"expected {KEPT_FORMAT!r})")
    records = [Kept(**r) for r in data["records"]]
    return {(r.part, r.job): r for r in records}


def write_kept(path: Path, records: dict[tuple[str, str], Kept]) -> None:
    body = {"format": KEPT_FORMAT,
            "about": "figures of fine-tuning jobs whose folders are not committed; each names the command that "
                     f"produced it and the numerics version it was made with (`{MODULE} render --record` adds "
                     "the jobs it renders from their folders)",
            "records": [r.to_dict() for _, r in sorted(records.items())]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1) + "\n")


def _record(job: Job, root: Path, figures: dict[str, Any]) -> Kept:
    return Kept(part=job.part, job=job.name, command=job.command(root), numerics=NUMERICS_VERSION, figures=figures)


def _found_epochs(root: Path, part: str, prefix: str, kept: dict[tuple[str, str], Kept]) -> list[int]:
    """1 and every number of epochs with a finished or kept job of ``part`` named ``prefix-...``: the
    columns a render without ``--epochs`` shows."""
    found = {1}
    folder = root / part
    if folder.is_dir():
        for d in folder.glob(f"{prefix}*-e*"):
            m = EPOCHS_DIR.search(d.name)
            if m and _finished(d):
                found.add(int(m.group(1)))
    for p, name in kept:
        m = EPOCHS_DIR.search(name)
        if p == part and name.startswith(prefix) and m:
            found.add(int(m.group(1)))
    return sorted(found)


def _geluless_figures(d: dict[str, Any]) -> dict[str, Any]:
    p, y = d["pred"], d["pred"]["labels"]
    return {"float": _top1(p["float"], y), "relu_float": _top1(p["relu_float"], y), "before": _top1(p["before"], y),
            "after": _top1(p["after"], y), "after_minus_float": list(paired_interval(p["after"], p["float"], y)),
            "hours": d.get("seconds", 0) / 3600, "device": d.get("device")}


def _render_geluless(root: Path, models: Sequence[str], epochs: Sequence[int],
                     kept: dict[tuple[str, str], Kept], recorded: dict[tuple[str, str], Kept]) -> list[str]:
    lines = ["## GELU-less: GELU -> ReLU by iterative distillation, then the 8-bit integer policy", ""]
    cmd = f"`{MODULE} run geluless --models {','.join(models)} --epochs {','.join(map(str, epochs))}`"
    lines += [f"Command: {cmd}, then `{MODULE} render`.", "",
              "Policy: ReLU at every GELU site, I-BERT softmax and LayerNorm, W8A8, `paper` wiring. ReLU stages: "
              "one block per stage, input side first, one epoch each, each distilled from the previous stage "
              "(the first from the float GELU model); then QAT of the integer policy with distillation from the "
              "float GELU model. Top-1 (%) on the 10,000 Fashion-MNIST test images; differences against the float "
              "GELU model with paired 95% intervals. The claim (Tayaranian et al.): within 0.5 points.", "",
              "| model | QAT epochs | float GELU | float ReLU (distilled) | integer policy before training | "
              "integer policy after | after - float GELU | within 0.5? | CPU/GPU time |",
              "|---|---|---|---|---|---|---|---|---|"]
    missing = []
    for job in jobs("geluless", models=models, epochs=epochs):
        d = _load(job.folder(root))
        if d is not None:
            f = _geluless_figures(d)
            recorded[(job.part, job.name)] = _record(job, root, f)
        elif (job.part, job.name) in kept:
            f = kept[(job.part, job.name)].figures
        else:
            lines.append(f"| {job.model} | {job.epochs} | not run | | | | | | |")
            missing.append(job.command(root))
            continue
        diff = tuple(f["after_minus_float"])
        ok = "yes" if diff[0] >= -0.5 else "no"
        lines.append(f"| {job.model} | {job.epochs} | {f['float']:.2f} | {f['relu_float']:.2f} | {f['before']:.2f} | "
                     f"{f['after']:.2f} | {_ci(diff)} | {ok} | {f['hours']:.1f} h on {f['device']} |")
    if missing:
        lines += ["", "Missing rows; fill them with:", ""] + [f"    {c}" for c in missing]
    return lines


def _table5_intro(models: Sequence[str], bits: Sequence[int], epochs: Sequence[int]) -> list[str]:
    lines = ["## The paper's Tables 4 and 5 (and Table 2: the SQNR rules after QAT)", ""]
    cmd = (f"`{MODULE} run table5 --models {','.join(models)} --bits {','.join(map(str, bits))} "
           f"--epochs {','.join(map(str, epochs))}`")
    return lines + [f"Command: {cmd}, then `{MODULE} render`.", "",
                    "Top-1 (%) on the 10,000 Fashion-MNIST test images, `paper` wiring; differences against the best "
                    "uniform method of the same column with paired 95% intervals. Uniform fqvit runs I-BERT's GELU "
                    f"(FQ-ViT has none). Mixed policies: `policysearch run` with the SQNR rules and {STRATEGY} "
                    f"({STRATEGY_TRIALS} trials, KL objective), 1,000 evaluation images per trial.", "",
                    "**These tables cannot show the paper's claim (a mixed policy beats every uniform one) on "
                    "fmnist_vit (W8A8, W6A6) and fmnist_swin W6A6.** With every non-linear site in float on the "
                    "same quantized linear layers (the *ceiling*, `results/headroom.md`), top-1 is not measurably "
                    "above the best uniform method there, so no choice of non-linear methods can measurably beat "
                    "it. The claim is untestable there, not refuted. On fmnist_swin W8A8 the ceiling is 0.23 "
                    "[+0.01, +0.45] points above uniform I-BERT before training: at most that much is there to "
                    "gain, about the width of the intervals below. The rows below are kept as measured; no QAT "
                    "rows are added that cannot differ: policies are compared on KL to the float model instead "
                    "(headroom.md)."]


def _after(epochs: int) -> str:
    return f"after {epochs} epoch{'s' if epochs > 1 else ''}"


def _figure(f: dict[str, Any] | None) -> str:
    """A kept column's cell: its top-1 and, where it has one, its interval."""
    if f is None:
        return "not run"
    return f"{f['top1']:.2f}" + (f" ({_ci(tuple(f['interval']))})" if f.get("interval") is not None else "")


def _render_table5_column(root: Path, model: str, b: int, epochs: Sequence[int],
                          kept: dict[tuple[str, str], Kept], recorded: dict[tuple[str, str], Kept], *,
                          per_column: bool = False) -> list[str]:
    """One model at one bit width: every policy before QAT and after each number of epochs.

    ``per_column``: the numbers of epochs other than 1 were found for this column only, so its
    section names the command that runs them.

    A policy none of whose jobs is under ``root`` shows its kept records (``kept.json``), marked ``*``.
    A kept interval stays only in a column whose reference (the best uniform method: name and top-1)
    is the one it was computed against; elsewhere only its top-1 is shown, because its predictions
    are not here to pair with the new reference."""
    cols = [("before QAT", None)] + [(_after(e), e) for e in epochs]
    lines = [f"### {model} W{b}A{b}", ""]
    if per_column and (longer := [e for e in epochs if e != 1]):
        lines += [f"Also after {', '.join(map(str, longer))} epochs in this column only (as time allowed): `{MODULE} "
                  f"run table5 --models {model} --bits {b} --epochs {','.join(map(str, longer))}`.", ""]
    lines += ["| policy | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    names = [*UNIFORM, *RULES, STRATEGY]
    job = {(p, e): Job(part="table5", model=model, bits=b, policy=p, epochs=e) for p in names for e in epochs}
    loaded = {k: _load(j.folder(root)) for k, j in job.items()}
    old = {k: kept[("table5", j.name)].figures for k, j in job.items() if ("table5", j.name) in kept}
    keep = {p for p in names if all(loaded[(p, e)] is None for e in epochs) and any((p, e) in old for e in epochs)}
    missing = [job[(p, e)].command(root) for e in epochs for p in names if loaded[(p, e)] is None and p not in keep]
    any_run = next((d for d in loaded.values() if d is not None), None)
    float_top1 = (_top1(any_run["pred"]["float"], any_run["pred"]["labels"]) if any_run is not None
                  else next((f["float"] for f in old.values()), None))
    if float_top1 is not None:
        lines.append("| float | " + " | ".join(f"{float_top1:.2f}" for _ in cols) + " |")

    def best(e: int | None, key: str) -> tuple[str, float, Any] | None:
        cands = [(p, _top1(d["pred"][key], d["pred"]["labels"]), d["pred"][key]) for (p, ee), d in loaded.items()
                 if p in UNIFORM and d is not None and (ee == e or e is None)]
        return max(cands, key=lambda t: t[1]) if cands else None

    def kept_col(p: str, e: int | None) -> dict[str, Any] | None:
        """A kept policy's figures in a column (before QAT: from its first kept job)."""
        if e is not None:
            f = old.get((p, e))
            return f["after"] if f is not None else None
        f = next((old[(p, ee)] for ee in epochs if (p, ee) in old), None)
        return f["before"] if f is not None else None

    refs = {col: best(e, "before" if e is None else "after") for col, e in cols}
    ref_key: dict[str, tuple[str, str] | None] = {}
    for col, e in cols:  # the reference a kept interval must have been paired with to stay
        if refs[col] is not None:
            ref_key[col] = (refs[col][0], f"{refs[col][1]:.2f}")
        else:
            cands = [(f["top1"], q) for q in UNIFORM if q in keep and (f := kept_col(q, e)) is not None]
            ref_key[col] = (max(cands)[1], f"{max(cands)[0]:.2f}") if cands else None
    verdicts: dict[str, list[str]] = {c: [] for c, _ in cols}
    stripped = False
    figures: dict[tuple[str, int], dict[str, Any]] = {}
    for p in names:
        cells = []
        for col, e in cols:
            key, ref = "before" if e is None else "after", refs[col]
            if p in keep:
                f = kept_col(p, e)
                if f is not None and f.get("interval") is not None:
                    if f.get("reference") is not None and tuple(f["reference"]) == ref_key[col]:
                        verdicts[col].append(f"{p} {_verdict(tuple(f['interval']))}")
                    else:
                        f, stripped = {"top1": f["top1"]}, True
                cells.append(_figure(f))
                continue
            d = loaded.get((p, e if e is not None else epochs[0]))
            if d is None:
                cells.append("not run")
                continue
            y = d["pred"]["labels"]
            fig: dict[str, Any] = {"top1": _top1(d["pred"][key], y), "interval": None, "reference": None}
            if ref is not None and p not in UNIFORM:
                fig["interval"] = list(paired_interval(d["pred"][key], ref[2], y))
                fig["reference"] = [ref[0], f"{ref[1]:.2f}"]
                verdicts[col].append(f"{p} {_verdict(tuple(fig['interval']))}")
            cells.append(_figure(fig))
        lines.append(f"| {p}{KEPT_MARK if p in keep else ''} | " + " | ".join(cells) + " |")
    for (p, e), d in loaded.items():  # every finished job's own figures, for `render --record`
        if d is not None:
            figures[(p, e)] = _table5_figures(d, p, refs["before QAT"], refs[_after(e)])
            recorded[("table5", job[(p, e)].name)] = _record(job[(p, e)], root, figures[(p, e)])
    said = [f"{col}: " + ", ".join(v) for col, v in verdicts.items() if v]
    if said:
        lines += ["", "Against the best uniform method (the paper's claim: the mixed policy is better): "
                  + "; ".join(said) + "."]
    above = sorted({q for col, e in cols if refs[col] is not None for q in keep & set(UNIFORM)
                    if (f := kept_col(q, e)) is not None and f["top1"] > round(refs[col][1], 2)})
    if above:  # the intervals pair with the best uniform method whose predictions are here
        lines += ["", f"Note: the intervals are against the best uniform method whose job is here; kept "
                  f"{', '.join(above)} scored higher, so re-run {'them' if len(above) > 1 else 'it'} to compare "
                  "against the best."]
    absent = {e: [q for q in UNIFORM if loaded[(q, e)] is None and q not in keep] for e in epochs}
    partial = [f"{_after(e)} ({', '.join(absent[e])} not run)" for e in epochs if refs[_after(e)] is not None
               and absent[e]]
    if partial:
        lines += ["", "Note: where a uniform method is not run, the intervals are against the best one that is: "
                  + "; ".join(partial) + "."]
    if keep:
        lines += ["", f"{KEPT_MARK} Kept: the job folder is not in this checkout, its figures are in the kept records"
                  + (" (intervals dropped where the reference changed since)." if stripped else ".")
                  + " Re-run to restore it:", ""] + [f"    {job[(p, e)].command(root)}" for p in names if p in keep
                                                     for e in epochs]
    if missing:
        lines += ["", "Missing rows; fill them with:", ""] + [f"    {c}" for c in missing]
    return lines


def _table5_figures(d: dict[str, Any], policy: str, ref_before: tuple[str, float, Any] | None,
                    ref_after: tuple[str, float, Any] | None) -> dict[str, Any]:
    """A finished Table 5 job's figures as a kept record holds them."""
    y = d["pred"]["labels"]
    out: dict[str, Any] = {"float": _top1(d["pred"]["float"], y)}
    for key, ref in (("before", ref_before), ("after", ref_after)):
        fig: dict[str, Any] = {"top1": _top1(d["pred"][key], y), "interval": None, "reference": None}
        if ref is not None and policy not in UNIFORM:
            fig["interval"] = list(paired_interval(d["pred"][key], ref[2], y))
            fig["reference"] = [ref[0], f"{ref[1]:.2f}"]
        out[key] = fig
    return out


STE_POLICY = "fmnist_swin-ivit-w6a6.json"
STE_COMMAND = ("policysearch finetune --policy results/finetune/ste/{policy} --data fmnist --eval-size 2000 "
               "--steps 150 --batch-size 64 --ste {ste} --out results/finetune/ste/{ste}")


def _render_ste(root: Path, kept: dict[tuple[str, str], Kept], recorded: dict[tuple[str, str], Kept]) -> list[str]:
    """The STE comparison (the issue: the references' STE against the alternative, on one case)."""
    lines = ["## Straight-through estimators: the references' against the float operator's gradient", "",
             "One case: fmnist_swin under uniform ivit at W6A6 (`paper` wiring), 150 QAT steps at batch 64 on the "
             "Fashion-MNIST training set, lr 1e-4, distillation from the float model, ranges tracked (EMA); top-1 "
             f"on 2,000 test images. The policy file is written by `{MODULE} "
             "ste-policy`; the commands:", ""]
    lines += [f"    {STE_COMMAND.format(policy=STE_POLICY, ste=ste)}" for ste in ("reference", "float")]
    lines += ["", "| STE | top-1 before | top-1 after | after - before | agreement with its float model | "
              "top-1 with the trained ranges | QAT seconds |", "|---|---|---|---|---|---|---|"]
    for ste in ("reference", "float"):
        rec = root / "ste" / ste / "finetune.json"
        if rec.is_file():
            d = json.loads(rec.read_text())
            f = {"before": 100 * d["before"]["top1"], "after": 100 * d["after"]["top1"],
                 "agreement": 100 * d["after"].get("agreement", math.nan),
                 "trained_ranges": 100 * d["trained_ranges"]["top1"], "qat_seconds": (d.get("qat") or {}).get("wall_seconds")}
            recorded[("ste", ste)] = Kept(part="ste", job=ste, command=STE_COMMAND.format(policy=STE_POLICY, ste=ste),
                                          numerics=NUMERICS_VERSION, figures=f)
        elif ("ste", ste) in kept:
            f = kept[("ste", ste)].figures
        else:
            lines.append(f"| {ste} | not run | | | | | |")
            continue
        lines.append(f"| {ste} | {f['before']:.2f} | {f['after']:.2f} | {f['after'] - f['before']:+.2f} | "
                     f"{f['agreement']:.2f} | {f['trained_ranges']:.2f} | {f['qat_seconds']} |")
    return lines


def write_ste_policy(root: Path = ROOT) -> Path:
    """The policy file of the STE comparison case."""
    import policysearch as ps
    from policysearch.models.loading import load_model
    from policysearch.policy import Policy, PolicyDocument, write_policy

    m = load_model("fmnist_swin")
    ps.prepare(m, wiring="paper")
    policy = Policy.uniform(ps.find_sites(m), "ivit", weight_bits=6, act_bits=6)
    path = root / "ste" / STE_POLICY
    path.parent.mkdir(parents=True, exist_ok=True)
    write_policy(path, PolicyDocument(policy=policy, model={"name": "fmnist_swin"}, wiring="paper",
                                      provenance={"data": "fmnist", "note": "uniform ivit W6A6: the STE comparison"}))
    return path


MARK = "<!-- section: {} -->"


def render(root: Path = ROOT, out: Path = Path("results/finetune.md"), *, models: Sequence[str] = MODELS,
           bits: Sequence[int] = (8, 6), epochs: Sequence[int] | None = None, notes: Sequence[str] = (),
           kept: Path | None = None, record: bool = False) -> Path:
    """Write ``out`` from the finished jobs under ``root`` and the kept records ``kept``
    (default ``root/kept.json``): a job whose folder is not here shows its kept figures.

    ``epochs``: the numbers of QAT epochs to show (a column each). Default: 1, and in each table
    every other number that has a finished or kept job, so the longer runs that time allowed
    (``run ... --epochs N``) appear where they were run and nowhere else.

    ``record``: also write the figures of every job rendered from its folder into ``kept``, so that
    a checkout without those folders renders them too."""
    import platform

    import torch

    kept_path = kept if kept is not None else root / "kept.json"
    records = read_kept(kept_path)
    recorded: dict[tuple[str, str], Kept] = {}

    def shown(part: str, prefix: str) -> list[int]:
        return list(epochs) if epochs is not None else _found_epochs(root, part, prefix, records)

    gelu_epochs = sorted({e for m in models for e in shown("geluless", f"{m}-w8a8-geluless")})
    parts: list[tuple[str, list[str]]] = [
        ("geluless", _render_geluless(root, models, gelu_epochs, records, recorded)),
        ("table5", _table5_intro(models, bits, [1] if epochs is None else epochs))]
    for m in models:
        for b in bits:
            parts.append((f"table5 {m} w{b}", _render_table5_column(
                root, m, b, shown("table5", f"{m}-w{b}a{b}-"), records, recorded, per_column=epochs is None)))
    parts.append(("ste", _render_ste(root, records, recorded)))
    if notes:
        parts.append(("notes", ["## Notes", ""] + [f"- {n}" for n in notes]))
    lines = ["# Fine-tuning: QAT with distillation and GELU-less distillation on the zoo", "",
             f"Rendered by `{MODULE} render` from the jobs under `{root}/` (torch {torch.__version__}, "
             f"Python {platform.python_version()}). Each table names the command that produces it; a job "
             "that is not there is listed with its command. A job whose folder is not in this checkout shows "
             f"the figures recorded in `{kept_path}` (a Table 5 row marked *).", "",
             _numerics_line(root, records), ""]
    for key, body in parts:
        lines += [MARK.format(key), *body, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    if record and recorded:
        write_kept(kept_path, {**records, **recorded})
    return out


def _numerics_line(root: Path, records: dict[tuple[str, str], Kept]) -> str:
    """Which numerics versions made the kept records and the job records under ``root``."""
    jobs = [json.loads(p.read_text()) for p in sorted(root.rglob("finetune.json"))] if root.is_dir() else []
    versions = sorted({r.numerics for r in records.values()} | {j["numerics"] for j in jobs if j.get("numerics")})
    line = "Numerics: made with numerics " + (", ".join(versions) or "(none recorded)")
    if any(v != NUMERICS_VERSION for v in versions):
        line += f"; the current code's is {NUMERICS_VERSION}: rows of the other versions were not regenerated"
    unstated = sorted(str(j.get("finished", "?"))[:10] for j in jobs if not j.get("numerics"))
    if unstated:
        line += (f"; {len(unstated)} job records (finished {unstated[0]} to {unstated[-1]}) were written before "
                 "`finetune.json` recorded its numerics version")
    return line + "."


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the jobs of a table")
    r.add_argument("part", choices=["geluless", "table5"])
    r.add_argument("--only", default=None, help="comma-separated policies of the part (default: all)")
    for p in (r, sub.add_parser("render", help="write results/finetune.md from the finished jobs")):
        p.add_argument("--root", type=Path, default=ROOT)
        p.add_argument("--models", default=",".join(MODELS))
        p.add_argument("--bits", default="8,6")
        p.add_argument("--epochs", default=None, help="numbers of QAT epochs (default: run 1; render 1 and any found)")
    r.add_argument("--device", default="auto")
    r.add_argument("--no-progress", action="store_true")
    sub.choices["render"].add_argument("--out", type=Path, default=Path("results/finetune.md"))
    sub.choices["render"].add_argument("--note", action="append", default=[], help="a note line (repeat)")
    sub.choices["render"].add_argument("--kept", type=Path, default=None, help="kept records (default ROOT/kept.json)")
    sub.choices["render"].add_argument("--record", action="store_true",
                                       help="also record the figures of the jobs found here into the kept records")
    sub.add_parser("ste-policy", help="write the policy file of the STE comparison case").add_argument(
        "--root", type=Path, default=ROOT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "ste-policy":
        print(write_ste_policy(args.root))
        return 0
    models = [m for m in args.models.split(",") if m]
    if args.cmd == "render":
        print(render(args.root, args.out, models=models, bits=_ints(args.bits), epochs=_ints(args.epochs) if args.epochs else None,
                     notes=args.note, kept=args.kept, record=args.record))
        return 0
    only = set(args.only.split(",")) if args.only else None
    for job in jobs(args.part, models=models, bits=_ints(args.bits), epochs=_ints(args.epochs or "1")):
        if only is not None and job.policy not in only:
            continue
        t0 = time.perf_counter()
        out = run_job(job, args.root, device=args.device, progress=not args.no_progress)
        print(f"{job.name}: {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

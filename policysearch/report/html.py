"""``policysearch report RUN``: ``results/<run>/report.html``, one self-contained page.

Every figure is a PNG inlined as base64 (and also written to ``results/<run>/figures/``); the page
has no script, stylesheet, font or image from elsewhere, so it reads offline and can be mailed.

It reads what the stages wrote, never objects in memory: ``run.json`` (config, baselines, the
answer and its per-site metrics, ``stages.finetune`` and ``stages.latency`` where those stages
ran), ``sensitivity.csv`` and the run's Optuna study (per-site metrics of every uniform baseline,
latency metrics of the trials). One forward is made for the histograms: the run's evaluator is
rebuilt from its config (same model, wiring and calibration) and a few calibration images are
run in float, under the chosen policy and under each uniform policy.

The report then publishes the run's answer again (:func:`policysearch.study.publish_answer`) with
the page, its figures and the policy JSON as artifacts, so optuna-dashboard shows them on the
answer's trial; a report whose figures and tables did not change reuses the earlier copy.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from policysearch.data import load_data
from policysearch.models.wiring import apply_policy, float_mode, record_sites
from policysearch.policy import Policy
from policysearch.report import figures as F
from policysearch.report.dashboard import annotate
from policysearch.report.page import FIGURES_DIR, _batch_key, render, tables
from policysearch.report.reading import KINDS, Figure, ReportData, _f, gather
from policysearch.report.record import ReportStage
from policysearch.run import RunRecord, lock_run, resolve_run_dir
from policysearch.rundoc import RunDocument
from policysearch.spaces import SearchSpace
from policysearch.spec import EvaluatorSpec, get_evaluator
from policysearch.study import open_storage, publish_answer

#: Figure, ReportData and gather live in policysearch.report.reading, render and tables in
#: policysearch.report.page; imported from here as before
__all__ = ["REPORT_FILE", "Figure", "ReportData", "build_report", "gather", "render", "tables"]

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"


# -- the latency stage ---------------------------------------------------------------------------

def _runtime_points(stage: Mapping[str, Any] | None) -> tuple[list[tuple[float, float, str]], str | None]:
    if not stage:
        return [], None
    median, top1 = stage.get("median_ms"), stage.get("top1") or {}
    if not isinstance(median, Mapping):
        return [], None
    batches = sorted({str(b) for per in median.values() if isinstance(per, Mapping) for b in per}, key=_batch_key)
    if not batches:
        return [], None
    b = batches[-1]
    pts = [(_f(per.get(b)), _f(top1.get(name)), name) for name, per in median.items() if isinstance(per, Mapping)]
    return [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])], b


# -- histograms: one small forward ----------------------------------------------------------------

def _hist_sites(data: ReportData) -> list[str]:
    """Per kind, the site where the chosen policy loses the most output SQNR (lowest beta)."""
    chosen = []
    for kind in KINDS:
        sites = [s for s in data.order if data.kinds.get(s) == kind and s in data.answer_sites]
        finite = [s for s in sites if math.isfinite(data.answer_sites[s]["beta"])]
        if finite:
            chosen.append(min(finite, key=lambda s: data.answer_sites[s]["beta"]))
        elif sites:
            chosen.append(sites[0])
    return chosen


def site_outputs(data: ReportData, sites: Sequence[str], *, images: int = 16, device: str | None = None,
                 ) -> dict[str, dict[str, Any]]:
    """Outputs at ``sites`` on the first ``images`` calibration images: float, the chosen policy
    and each uniform policy of the run's space, from the run's rebuilt (calibrated) evaluator."""
    import inspect

    import torch


    cfg = data.run.get("config", {})
    eval_size = cfg.get("eval_size")
    spec = EvaluatorSpec.from_run(
        RunDocument.from_json(data.run), device=device or cfg.get("device", "auto"), relu_repair=False,
        eval_size=min(int(eval_size), images) if eval_size else images,  # the float reference is not needed
        batch_size=int(cfg.get("batch_size") or 64),
    )
    ev = get_evaluator(spec)
    model = ev.model
    batches = getattr(ev, "batches", None)  # batch 0: the calibration images the SQNR is measured on
    if batches:
        x = batches[0][:images]
    else:
        x = load_data(spec.data, model=model, calib_size=spec.calib_size, eval_size=spec.eval_size,
                      seed=spec.seed).calib_images()[:images]
    x = x.to(next(model.parameters()).device)
    wanted = set(sites)
    masks = "masks" in inspect.signature(record_sites).parameters

    def run(policy: Policy | None) -> dict[str, Any]:
        store: dict[str, Any] = {}

        def rec(name: str, _x: Any, y: Any, *rest: Any) -> None:
            if name not in wanted:
                return
            y = y.detach()
            valid = rest[0] if rest else None
            if valid is not None:
                try:
                    y = y[valid.expand_as(y)]
                except RuntimeError:
                    pass
            store[name] = y.flatten().float().cpu().numpy()

        with torch.no_grad():
            if policy is None:
                with float_mode(model), record_sites(model, rec, **({"masks": True} if masks else {})):
                    model(x)
            else:
                apply_policy(model, policy)
                with record_sites(model, rec, **({"masks": True} if masks else {})):
                    model(x)
        return store

    answer = Policy.from_dict(data.run["answer"]["policy"])
    uniform = _uniform_policies(data, answer, SearchSpace)
    ref = run(None)
    quantized = [("chosen", run(answer))] + [(m, run(p)) for m, p in uniform.items()]
    out: dict[str, dict[str, Any]] = {}
    for s in sites:
        if s not in ref:
            continue
        m = data.answer_sites.get(s, {})
        title = f"{s} ({data.kinds[s]}): chosen {data.choices[s]}, β {m.get('beta', math.nan):.1f} dB"
        series = [(f"chosen policy ({data.choices[s]})" if label == "chosen" else f"uniform {label}",
                   data.choices[s].split("@")[0] if label == "chosen" else label, got[s], label == "chosen")
                  for label, got in quantized if s in got]
        out[s] = {"title": title, "float": ref[s], "quantized": series}
    return out


def _uniform_policies(data: ReportData, answer: Any, space_cls: Any) -> dict[str, Any]:
    """The run's uniform policies, rebuilt from its config.yaml space (else from the catalogue)."""
    import yaml

    path = data.run_dir / data.run.get("outputs", {}).get("config", "config.yaml")
    try:
        space = yaml.safe_load(path.read_text()).get("space")
        return space_cls.from_dict(space).uniform_policies()
    except (OSError, AttributeError, TypeError, ValueError, KeyError) as exc:
        log.warning("report: cannot rebuild the run's space from %s (%s); uniform histograms left out", path, exc)
        return {}


# -- figures --------------------------------------------------------------------------------------

def make_figures(data: ReportData, *, histograms: bool = True, images: int = 16,
                 device: str | None = None) -> tuple[list[Figure], list[str]]:
    """The figures the run's data allows, and a note for each one left out."""
    F.require_matplotlib()
    figs: list[Figure] = []
    missing: list[str] = []
    if data.sensitivity:
        figs.append(Figure("fig1_sensitivity.png", "Figure 1. Per-site SQNR diff and output SQNR per method",
                           "Bars: SQNR diff β-γ of each site under the uniform policy of each method (left "
                           "axis); lines: the site's output SQNR β (right axis). Sites along depth, one panel "
                           "per kind. The SQNR rules pick per site from these values.",
                           F.sensitivity_figure(data.sensitivity, data.order)))
    else:
        missing.append("Figure 1: the run has no sensitivity.csv")
    if histograms:
        sites = _hist_sites(data)
        try:
            samples = site_outputs(data, sites, images=images, device=device)
        except Exception as exc:  # noqa: BLE001 - the rest of the report stands without it
            log.warning("report: histograms left out: %s: %s", type(exc).__name__, exc)
            missing.append(f"Figure 2: the forward failed ({type(exc).__name__}: {str(exc)[:200]})")
            samples = {}
        if samples:
            figs.append(Figure("fig2_histograms.png", "Figure 2. Float against quantized outputs",
                               f"Output values on {images} calibration images at the site of each kind where "
                               "the chosen policy's output SQNR is lowest: float (grey), the chosen policy "
                               "(black) and each uniform policy. Log density.",
                               F.histogram_figure(samples)))
    else:
        missing.append("Figure 2: left out (--no-histograms)")
    after = data.trained_sites()
    if data.answer_sites:
        figs.append(Figure("fig3_site_sqnr.png", "Figure 3. Per-site SQNR of the chosen policy and of each uniform one",
                           "Output SQNR β (top) and input SQNR γ (bottom) per site along depth. Markers: the "
                           "method the chosen policy runs there." + (" Dashed: the chosen policy after "
                           "training." if after else " After training: not run."),
                           F.site_sqnr_figure(data.order, data.answer_sites,
                                              {s: c.split("@")[0] for s, c in data.choices.items()},
                                              data.uniform_sites, after or None)))
    panels: dict[str, Any] = {}
    if data.latency_points:
        panels["search: every evaluated policy"] = {"points": data.latency_points, "xlabel": data.latency_metric}
    runtime, batch = _runtime_points(data.stages.get("latency"))
    if runtime:
        panels[f"int8 runtime (latency stage), batch {batch}"] = {"points": runtime,
                                                                  "xlabel": f"median latency, batch {batch} (ms)"}
    if panels:
        figs.append(Figure("fig4_pareto.png", "Figure 4. Accuracy against latency",
                           "Every policy with a latency measurement; the red line joins the non-dominated "
                           "ones (no other is both faster and more accurate).", F.pareto_figure(panels)))
    return figs, missing


def _digest(figs: Sequence[Figure], tabs: Mapping[str, Any], policy_key: str) -> str:
    h = hashlib.sha256(policy_key.encode())
    for f in figs:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.png).digest())
    h.update(json.dumps(tabs, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def build_report(run: str, *, results_dir: str | Path = "results", storage: str | None = None,
                 out: str | Path | None = None, device: str | None = None, histograms: bool = True,
                 images: int = 16, publish: bool = True) -> Path:
    """Write ``results/<run>/report.html`` (or ``out``) and its figures; returns the page's path.

    ``storage``: the study's URL when run.json's is not usable (a hidden password). ``publish``:
    attach the page, figures and policy JSON to the answer's trial in the study.
    """

    run_dir = resolve_run_dir(run, results_dir)
    data = gather(run_dir, storage=storage)
    figs, missing = make_figures(data, histograms=histograms, images=images, device=device)
    tabs = tables(data)
    fig_dir = run_dir / FIGURES_DIR
    fig_dir.mkdir(exist_ok=True)
    for f in figs:
        (fig_dir / f.name).write_bytes(f.png)
    page = Path(out) if out is not None else run_dir / REPORT_FILE
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    policy_file = run_dir / data.run.get("outputs", {}).get("policy", "policy.json")

    def write(answer_trial: int | None) -> list[Path]:
        page.write_text(render(data, figs, missing, tabs, answer_trial=answer_trial, generated=generated))
        return [page, policy_file, *(fig_dir / f.name for f in figs)]

    with lock_run(run_dir):
        answer_trial = data.answer_trial
        if publish and data.study_error is None and data.storage:
            key = Policy.from_dict(data.run["answer"]["policy"]).key()
            artifact_dir = Path(data.run.get("artifacts") or Path(results_dir) / "artifacts")
            rdb = open_storage(str(data.storage))
            pub = publish_answer(rdb, str(data.study_name), key, stage="report", artifacts=write,
                                 artifact_dir=artifact_dir, digest=_digest(figs, tabs, key))
            answer_trial = pub.number
            if not pub.created:
                write(answer_trial)
            import optuna

            annotate(optuna.load_study(study_name=str(data.study_name), storage=rdb))
        else:
            write(answer_trial)
        record = RunRecord.load(run_dir)
        record.set_stage(ReportStage(file=str(page if out is not None else REPORT_FILE),
                                     figures=[f"{FIGURES_DIR}/{f.name}" for f in figs],
                                     answer_trial=answer_trial, missing=list(missing)))
        record.data.setdefault("outputs", {})["report"] = str(page if out is not None else REPORT_FILE)
        record.save()
    log.info("report written: %s (%d figures)", page, len(figs))
    return page

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

import base64
import csv
import datetime as _dt
import hashlib
import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import policysearch.methods as _catalogue
from policysearch.data import load_data
from policysearch.errors import ConfigError
from policysearch.finetune.record import FinetuneStage
from policysearch.models.wiring import apply_policy, float_mode, record_sites
from policysearch.policy import Policy
from policysearch.report import figures as F
from policysearch.report.dashboard import annotate
from policysearch.report.record import ReportStage
from policysearch.report.verdict import headroom_rows, report_lines
from policysearch.run import RunRecord, lock_run, policy_document, resolve_run_dir
from policysearch.rundoc import RunDocument
from policysearch.spaces import SearchSpace
from policysearch.spec import EvaluatorSpec, get_evaluator
from policysearch.study import KIND_UNIFORM, open_storage, publish_answer

__all__ = ["REPORT_FILE", "Figure", "ReportData", "build_report", "gather"]

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
KINDS = tuple(_catalogue.kinds())
NOT_RUN = "not run"


@dataclass
class Figure:
    name: str  # file name under results/<run>/figures/
    title: str
    caption: str
    png: bytes


@dataclass
class ReportData:
    """Everything the page shows, read from the run's files and its study."""

    run_dir: Path
    run: dict[str, Any]
    order: list[str]  # site names in forward order
    kinds: dict[str, str]  # site -> kind
    choices: dict[str, str]  # site -> the answer's choice
    answer_sites: dict[str, dict[str, float]]
    sensitivity: list[dict[str, Any]]
    uniform_sites: dict[str, dict[str, dict[str, float]]]  # method -> site -> {gamma, beta}
    study_name: str | None = None
    storage: str | None = None
    study_error: str | None = None
    study_id: int | None = None
    trial_kinds: dict[str, int] = field(default_factory=dict)
    trial_count: int = 0
    answer_trial: int | None = None
    evaluation_trial: int | None = None
    latency_points: list[tuple[float, float, str]] = field(default_factory=list)
    latency_metric: str | None = None

    @property
    def name(self) -> str:
        return str(self.run.get("name", self.run_dir.name))

    @property
    def stages(self) -> dict[str, Any]:
        return dict(self.run.get("stages") or {})

    @property
    def finetune(self) -> FinetuneStage | None:
        """The training stage, typed (None when it has not run)."""
        raw = self.stages.get("finetune")
        return FinetuneStage.from_json(raw) if raw else None

    def trained_sites(self) -> dict[str, dict[str, float]]:
        """Per-site gamma/beta after training ({} without a training stage)."""
        return _sites_dict(self.finetune.after_sites()) if self.finetune else {}


# -- reading ------------------------------------------------------------------------------------

def _sites_dict(raw: Any) -> dict[str, dict[str, float]]:
    out = {}
    for name, m in (raw or {}).items():
        if isinstance(m, Mapping) and "gamma" in m and "beta" in m:
            out[str(name)] = {"gamma": _f(m["gamma"]), "beta": _f(m["beta"])}
    return out


def _f(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _read_sensitivity(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{**r, "gamma": _f(r["gamma"]), "beta": _f(r["beta"]), "sqnr_diff": _f(r["sqnr_diff"])}
                for r in csv.DictReader(f)]


def gather(run_dir: Path, *, storage: str | None = None) -> ReportData:
    """Read a finished run's record, sensitivity table and study."""

    record = RunRecord.load(run_dir)
    policy_document(record)  # refuses an unfinished run, naming the command that finishes it
    run = record.data
    policy = Policy.from_dict(run["answer"]["policy"])
    data = ReportData(
        run_dir=Path(run_dir), run=run, order=[s.name for s in policy.sites],
        kinds={s.name: s.kind for s in policy.sites}, choices={s.name: str(c) for s, c in policy.items()},
        answer_sites=_sites_dict(run["answer"].get("metrics", {}).get("sites")),
        sensitivity=_read_sensitivity(Path(run_dir) / run.get("outputs", {}).get("sensitivity", "sensitivity.csv")),
        uniform_sites={}, answer_trial=run["answer"].get("trial"),
        evaluation_trial=run["answer"].get("evaluation_trial"),
    )
    _read_study(data, storage)
    if not data.uniform_sites:  # no study: the uniform runs' own sites from sensitivity.csv
        for r in data.sensitivity:
            data.uniform_sites.setdefault(r["method"], {})[r["site"]] = {"gamma": r["gamma"], "beta": r["beta"]}
    return data


def _read_study(data: ReportData, storage: str | None) -> None:
    import optuna
    from optuna.trial import TrialState

    data.study_name = str(data.run.get("study") or data.name)
    url = storage or data.run.get("storage")
    data.storage = url
    if not url or "***" in str(url):
        data.study_error = (f"the run records its storage without the password ({url}); "
                            "pass --storage URL to include the study")
        log.warning("report: %s", data.study_error)
        return
    try:
        rdb = open_storage(str(url))
        study = optuna.load_study(study_name=data.study_name, storage=rdb)
        data.study_id = rdb.get_study_id_from_name(data.study_name)
    except (ConfigError, KeyError) as exc:
        data.study_error = f"study {data.study_name!r} cannot be read from {url}: {exc}"
        log.warning("report: %s", data.study_error)
        return
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
    data.trial_count = len(trials)
    for t in trials:
        kind = str(t.user_attrs.get("kind", "unmarked"))
        data.trial_kinds[kind] = data.trial_kinds.get(kind, 0) + 1
        method = t.user_attrs.get("uniform_method")
        raw = t.user_attrs.get("result")
        if kind == KIND_UNIFORM and method and isinstance(raw, Mapping) and method not in data.uniform_sites:
            data.uniform_sites[str(method)] = _sites_dict(raw.get("sites"))
    current = study.user_attrs.get("answer_trial")
    if isinstance(current, int):
        data.answer_trial = current
    # accuracy against latency, when the objective measured one (the latency stage's presets)
    metric_keys = {k[2:] for t in trials for k in t.user_attrs if k.startswith("m.") and "latency" in k}
    if metric_keys:
        key = sorted(metric_keys, key=lambda k: (k != "latency", k))[0]
        data.latency_metric = key
        for t in trials:
            if t.state != TrialState.COMPLETE or t.user_attrs.get("kind") == "answer":
                continue
            lat, top1 = _f(t.user_attrs.get(f"m.{key}")), _f(t.user_attrs.get("m.top1"))
            if math.isfinite(lat) and math.isfinite(top1):
                data.latency_points.append((lat, top1, f"#{t.number}"))


# -- the training and latency stages ------------------------------------------------------------

def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, Mapping):
        out = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(d, list) and len(d) > 12:
        return [(prefix[:-1], f"[{len(d)} entries]")]
    return [(prefix[:-1], d)]


def _latency_rows(stage: Mapping[str, Any], run_dir: Path) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(batch sizes, variant rows, ratio rows) from ``stages.latency`` (or its latency.json)."""
    median = stage.get("median_ms")
    top1 = dict(stage.get("top1") or {})
    ratios = stage.get("ratios") or {}
    if not isinstance(median, Mapping) and stage.get("file"):
        try:
            doc = json.loads((run_dir / str(stage["file"])).read_text())
            median = {n: {b: v.get("median_ms") for b, v in per.items()} for n, per in doc.get("results", {}).items()}
            top1 = top1 or dict(doc.get("top1") or {})
        except (OSError, ValueError, AttributeError):
            median = None
    if not isinstance(median, Mapping):
        return [], [], []
    batches = sorted({str(b) for per in median.values() if isinstance(per, Mapping) for b in per}, key=_batch_key)
    rows = [[name] + [_ms(per.get(b)) for b in batches] + [_pct(top1.get(name))]
            for name, per in median.items() if isinstance(per, Mapping)]
    ratio_rows = []
    for b in sorted(ratios, key=_batch_key):
        for k, v in (ratios[b] if isinstance(ratios[b], Mapping) else {}).items():
            if isinstance(v, Mapping):
                ratio_rows += [[str(b), f"{k} ({kk})", _num(vv, ".3f")] for kk, vv in v.items()]
            else:
                ratio_rows.append([str(b), str(k), _num(v, ".3f")])
    return batches, rows, ratio_rows


def _batch_key(b: str) -> tuple[int, str]:
    return (int(b), b) if str(b).isdigit() else (10**9, str(b))


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


# -- the page -------------------------------------------------------------------------------------

def _pct(v: Any) -> str:
    f = _f(v)
    return "n/a" if not math.isfinite(f) else f"{100 * f:.2f}%"


def _num(v: Any, spec: str = ".2f") -> str:
    f = _f(v)
    return "n/a" if not math.isfinite(f) else format(f, spec)


def _ms(v: Any) -> str:
    return _num(v, ".2f")


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _table(head: Sequence[str] | None, rows: Sequence[Sequence[Any]], *, cls: str = "",
           bold: Sequence[int] = ()) -> str:
    out = [f'<table class="{cls}">' if cls else "<table>"]
    if head:
        out += ["<thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead>"]
    out.append("<tbody>")
    for i, r in enumerate(rows):
        out.append('<tr class="hl">' if i in bold else "<tr>")
        out += [f"<td>{_e(c)}</td>" for c in r]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def tables(data: ReportData) -> dict[str, Any]:
    """The report's tables as plain rows (they go into the page and into its digest)."""
    run = data.run
    metrics = run["answer"].get("metrics", {})
    acc_head = ["policy", "top-1", "agreement with float", "KL(float || q)", "logit SQNR (dB)", "mean β-γ (dB)"]

    def row(name: str, m: Mapping[str, Any]) -> list[str]:
        return [name, _pct(m.get("top1")), _pct(m.get("agreement")), _num(m.get("kl"), ".3g"),
                _num(m.get("logit_sqnr")), _num(m.get("mean_sqnr_diff"))]

    acc = [["float", _pct(run.get("float_metrics", {}).get("top1")), "", "", "", ""]]
    for method, b in (run.get("baselines") or {}).items():
        acc.append(row(f"uniform {method}", b) if not b.get("error") else [f"uniform {method}", f"failed: {b['error']}",
                                                                            "", "", "", ""])
    bold = len(acc)
    acc.append(row(f"result ({run.get('config', {}).get('strategy')})", metrics))
    ft = data.finetune
    after = ft.after if ft is not None else None
    on = f" ({ft.eval_images} images)" if ft is not None and ft.eval_images else ""  # the stage's evaluation
    if after and ft is not None and isinstance(ft.before, Mapping):
        acc.append(row(f"result before training{on}", ft.before))
    acc.append(row(f"result after training{on}", after) if after else ["result after training", NOT_RUN, "", "", "", ""])
    counts: dict[str, dict[str, int]] = {}
    for s, c in data.choices.items():
        k = data.kinds[s]
        counts.setdefault(k, {})
        counts[k][c] = counts[k].get(c, 0) + 1
    order = _catalogue.ordered()
    methods = sorted({m for c in counts.values() for m in c},
                     key=lambda m: (order.index(m.split("@")[0]) if m.split("@")[0] in order else len(order), m))
    count_rows = [[k] + [str(counts[k].get(m, 0)) for m in methods] + [str(sum(counts[k].values()))]
                  for k in KINDS if k in counts]
    uni = list(data.uniform_sites)
    trained = data.trained_sites()
    site_rows = []
    for s in data.order:
        m = data.answer_sites.get(s, {})
        site_rows.append([s, data.kinds[s], data.choices[s], _num(m.get("gamma")), _num(m.get("beta")),
                          _num(_f(m.get("beta")) - _f(m.get("gamma")))]
                         + ([_num(trained.get(s, {}).get("beta"))] if trained else [])
                         + [_num(data.uniform_sites[u].get(s, {}).get("beta")) for u in uni])
    lat = data.stages.get("latency")
    batches, lat_rows, ratio_rows = _latency_rows(lat, data.run_dir) if lat else ([], [], [])
    return {
        "accuracy": {"head": acc_head, "rows": acc, "bold": [bold]},
        "counts": {"head": ["kind", *methods, "sites"], "rows": count_rows},
        "sites": {"head": ["site", "kind", "chosen", "γ (dB)", "β (dB)", "β-γ (dB)"]
                  + (["β after training"] if trained else []) + [f"β uniform {u}" for u in uni], "rows": site_rows},
        "latency": {"head": ["variant", *[f"batch {b} (ms, median)" for b in batches], "top-1 (runtime)"],
                    "rows": lat_rows, "ratios": ratio_rows},
    }


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#555;margin:0 0 16px}
table{border-collapse:collapse;margin:10px 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:4px 9px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}tr.hl td{font-weight:bold;background:#fff8e0}
table.kv td{text-align:left}
figure{margin:18px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:4px}figcaption b{color:#222}
.missing{color:#8a4b00}.notrun{color:#777;font-style:italic}code{background:#f3f3f3;padding:1px 4px}
details{margin:8px 0}
"""


def render(data: ReportData, figs: Sequence[Figure], missing: Sequence[str], tabs: Mapping[str, Any], *,
           answer_trial: int | None, generated: str) -> str:
    """The HTML page (figures inlined as base64 PNG)."""
    run, cfg = data.run, data.run.get("config", {})
    fp = run.get("fingerprint", {})
    name = data.name
    p: list[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>policysearch report: {_e(name)}</title>", f"<style>{_CSS}</style></head><body><main>",
        f'<h1>policysearch report: <span id="run-name">{_e(name)}</span></h1>',
        f'<p class="sub">study <b id="study-name">{_e(data.study_name or name)}</b> · strategy '
        f"<b>{_e(cfg.get('strategy'))}</b> · objective <b>{_e(run.get('objective', {}).get('name'))}</b> · model "
        f"<b>{_e(cfg.get('model'))}</b> · generated {_e(generated)}</p>",
    ]
    kv = [("model", f"{cfg.get('model')} (weights {fp.get('weights')})"), ("data", cfg.get("data")),
          ("evaluation images", cfg.get("eval_size") or "all"), ("calibration images", cfg.get("calib_size") or "the data's"),
          ("bits", f"W{cfg.get('weight_bits')}A{cfg.get('act_bits')}"), ("wiring", cfg.get("wiring")),
          ("space", cfg.get("space")), ("strategy", cfg.get("strategy")),
          ("objective", run.get("objective", {}).get("name")), ("sites", len(data.order)),
          ("evaluations", f"{run.get('evaluated', 0)} evaluated, {run.get('reused', 0)} reused"),
          ("search time", f"{run.get('timings', {}).get('total_s', 'n/a')} s"), ("finished", run.get("finished")),
          ("study", f"{data.study_name} in {data.storage}")]
    if answer_trial is not None:
        kv.append(("answer trial", f"#{answer_trial} (a copy of evaluation #{data.evaluation_trial}, with this "
                                   "page, its figures and the policy JSON as artifacts)"))
    evaluations = {k: n for k, n in data.trial_kinds.items() if k != "answer"}
    if evaluations:
        kv.append(("evaluations in the study", f"{sum(evaluations.values())}: "
                   + ", ".join(f"{n} {k}" for k, n in sorted(evaluations.items()))))
    if data.study_error:
        kv.append(("study", f"not read: {data.study_error}"))
    kv.append(("look at the study", f"policysearch dashboard {name}"))
    p += ["<h2>Run</h2>", _table(None, [[k, v] for k, v in kv], cls="kv")]

    acc = tabs["accuracy"]
    p += ["<h2>Accuracy</h2>",
          f"<p>On the run's {_e(cfg.get('eval_size') or 'all')} evaluation images. KL and agreement against the "
          "float model; SQNR in dB, 20·log10.</p>", _table(acc["head"], acc["rows"], bold=acc["bold"])]
    if run.get("headroom"):  # the ceiling (every non-linear site in float) and how the answer compares
        p += ['<h2 id="headroom">Headroom and verdict</h2>', _table(*headroom_rows(run["headroom"])),
              *(f"<p>{_e(line)}</p>" for line in report_lines(run))]
    cnt = tabs["counts"]
    p += ["<h2>Methods chosen per kind (Table 3)</h2>", _table(cnt["head"], cnt["rows"])]

    by_name = {f.name: f for f in figs}
    p.append("<h2>Figures</h2>")
    for f in figs:
        b64 = base64.b64encode(f.png).decode("ascii")
        p.append(f'<figure id="{_e(f.name.split(".")[0])}"><img data-file="{FIGURES_DIR}/{_e(f.name)}" '
                 f'alt="{_e(f.title)}" src="data:image/png;base64,{b64}">'
                 f"<figcaption><b>{_e(f.title)}.</b> {_e(f.caption)}</figcaption></figure>")
    for m in missing:
        p.append(f'<p class="missing">{_e(m)}</p>')
    if "fig4_pareto.png" not in by_name:
        p.append('<p class="notrun">Accuracy against latency: not run (no latency metric in the study and no '
                 "latency stage).</p>")

    p.append("<h2>Training stage</h2>")
    ft = data.stages.get("finetune")
    if ft:  # per-site values are in Figure 3 and the per-site table
        p.append(_table(None, [[k, v] for k, v in _flatten(ft) if ".sites." not in f".{k}"], cls="kv"))
    else:
        p.append(f'<p class="notrun" id="finetune-status">{NOT_RUN} (<code>policysearch finetune {_e(name)}</code>)</p>')

    p.append("<h2>Latency stage</h2>")
    lat = data.stages.get("latency")
    lt = tabs["latency"]
    if lat:
        if lt["rows"]:
            p.append(_table(lt["head"], lt["rows"]))
        if lt["ratios"]:
            p.append(_table(["batch", "ratio", "value"], lt["ratios"]))
        p.append("<details><summary>every recorded field</summary>"
                 + _table(None, [[k, v] for k, v in _flatten(lat)], cls="kv") + "</details>")
    else:
        p.append(f'<p class="notrun" id="latency-status">{NOT_RUN} (<code>policysearch latency {_e(name)}</code>)</p>')

    st = tabs["sites"]
    p += ["<h2>Per-site SQNR of the chosen policy</h2>",
          "<details open><summary>every site, in forward order</summary>", _table(st["head"], st["rows"]), "</details>",
          f"<p class=\"sub\">policysearch {_e(run.get('versions', {}).get('policysearch', ''))}, "
          f"data digest {_e(fp.get('data_digest', ''))}, run folder {_e(data.run_dir)}</p>",
          "</main></body></html>"]
    return "\n".join(p) + "\n"


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

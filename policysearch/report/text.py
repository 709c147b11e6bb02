"""Plain-text summaries (the CLI prints what these return).

SQNR values are stored in the 20·log10 convention (:func:`policysearch.objectives.sqnr.asqnr`);
``db=10`` prints them in 10·log10 (exactly half), ``db=20`` (default) as stored.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from policysearch.artifact import artifact_reference, save_artifact, sidecar_path
from policysearch.deploy.onnx_export import load_run_model
from policysearch.errors import ConfigError
from policysearch.identity import IN_MEMORY, data_digest
from policysearch.objectives.headroom import Comparison
from policysearch.objectives.sqnr import convert_db
from policysearch.policy import PolicyDocument, read_policy, write_policy
from policysearch.report.inspect import RunSummary, Totals, load_summary
from policysearch.report.verdict import headroom_lines, verdict_lines
from policysearch.run import RUN_FILE, RunRecord, policy_document, resolve_run_dir
from policysearch.sites import KIND_METHODS
from policysearch.spec import EvaluatorSpec, get_evaluator

__all__ = ["PICKS", "check_policy_file", "evaluate_policy_file", "export_run", "show_text", "site_sqnr_table",
           "summary_text"]

log = logging.getLogger(__name__)


def _pct(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}%"


def _dbs(value: float | None, db: int) -> str:
    """A stored (20·log10) dB value printed in the ``db``·log10 convention."""
    return "n/a" if value is None else f"{convert_db(float(value), 20, db):.2f}"


def site_sqnr_table(policy: Any, result: Any, *, db: int = 20) -> str:
    """Per site of ``policy``: its choice, gamma (input ASQNR), beta (output ASQNR) and
    beta - gamma as measured in ``result``, in dB in the ``db``·log10 convention (10 or 20)."""
    _dbs(0.0, db)  # validates db even for an empty policy
    width = max([len(s.name) for s in policy.sites] + [4])
    rows = [f"{'site':{width}s} {'choice':>10s}{'gamma':>10s}{'beta':>10s}{'beta-gamma':>12s}"]
    for site, choice in policy.items():
        m = result.sites.get(site.name)
        cells = (m.gamma, m.beta, m.diff) if m is not None else (None, None, None)
        rows.append(f"{site.name:{width}s} {str(choice):>10s}"
                    + "".join(f"{_dbs(v, db):>{w}s}" for v, w in zip(cells, (10, 10, 12))))
    return "\n".join(rows)


def method_table(counts: dict[str, dict[str, int]]) -> str:
    """Method counts per kind, like the paper's Table 3."""
    methods = sorted({m for c in counts.values() for m in c})
    head = f"{'kind':10s}" + "".join(f"{m:>8s}" for m in methods)
    rows = [head]
    for kind in KIND_METHODS:
        if kind in counts:
            rows.append(f"{kind:10s}" + "".join(f"{counts[kind].get(m, 0):>8d}" for m in methods))
    return "\n".join(rows)


def summary_text(res: Any, *, db: int = 20) -> str:
    """The run summary, for the whole search (every invocation of a resumed run); SQNR columns in
    dB in the ``db``·log10 convention (10 or 20). ``res``: a :class:`RunSummary`, or a search
    result (read back from its run.json when it has one, so ``run`` and ``show`` print the same)."""
    _dbs(0.0, db)  # a bad db fails before anything is formatted
    summary = res if isinstance(res, RunSummary) else _summary_of(res)
    lines = [f"run {summary.run_name}: {summary.totals.text()}"]
    cfg = summary.config
    if cfg.get("model"):
        lines.append(f"model {cfg.get('model')}, data {cfg.get('data')}, strategy {cfg.get('strategy')}, "
                     f"objective {_objective_name(cfg)}, {cfg.get('weight_bits')}-bit weights, "
                     f"{cfg.get('act_bits')}-bit activations, {cfg.get('wiring')} wiring")
    lines += ["", "method counts per kind:", method_table(summary.policy.method_counts()), ""]
    lines += _metrics_table(summary, db)
    if summary.result.ok and summary.result.sites:
        lines += ["", f"per-site ASQNR of the result (dB, {db}·log10):",
                  site_sqnr_table(summary.policy, summary.result, db=db)]
    if summary.headroom:
        on = f", top-1 on {summary.images} images" if summary.images else ""
        lines += ["", f"headroom (ceiling: every non-linear site in float, same linear layers and bits{on}):",
                  *headroom_lines(summary.headroom)]
    if summary.verdict:
        lines += ["", "verdict:", *verdict_lines(summary.verdict)]
    lines += ["", f"written: {summary.run_dir}/policy.json, config.yaml, sensitivity.csv"]
    return "\n".join(lines)


def show_text(run: str, *, results_dir: str = "results", db: int = 20) -> str:
    """The summary a finished run printed at its end, rebuilt from its run.json (``policysearch show``)."""
    return summary_text(load_summary(run, results_dir=results_dir), db=db)


def _objective_name(cfg: Any) -> str:
    obj = cfg.get("objective")
    return str(obj.get("name")) if isinstance(obj, dict) else str(obj)


def _summary_of(res: Any) -> RunSummary:
    """A search result as a :class:`RunSummary`: from its run.json when it has one (the whole
    search), else from the object alone (this invocation's figures)."""
    run_dir = Path(getattr(res, "run_dir", "") or "")
    if (run_dir / RUN_FILE).is_file():
        try:
            return load_summary(str(run_dir))
        except ConfigError:
            pass  # not finished on disk: the object's own figures
    images = getattr(res.result, "images", None)
    return RunSummary(
        run_name=res.run_name, run_dir=run_dir, status="finished", config={}, policy=res.policy, result=res.result,
        baselines=res.baselines, float_metrics=res.float_metrics,
        totals=Totals(evaluated=res.evaluated, lent=None, invocations=1, finished_invocations=1, seconds=None,
                      eval_seconds=0.0, last={"evaluated": res.evaluated, "reused": res.reused}),
        images=images.n if images is not None else None, headroom=getattr(res, "headroom", None),
        verdict=getattr(res, "verdict", None), feasibility=getattr(res, "feasibility", None))


def _versus(summary: RunSummary) -> tuple[str | None, dict[str, Comparison]]:
    """The best uniform method, and each row's paired comparison with it (top-1 in points)."""
    room, judged = summary.headroom or {}, summary.verdict or {}
    best = room.get("best_uniform")
    out = {name: Comparison.from_dict(c) for name, c in (room.get("vs_best_uniform") or {}).items()}
    if judged.get("answer_vs_best_uniform"):
        out["result"] = Comparison.from_dict(judged["answer_vs_best_uniform"])
    return best, out


def _delta(comp: Comparison | None) -> str:
    iv = comp.top1 if comp is not None else None
    if iv is None:
        return "n/a"
    return iv.text("+.2f") + ("*" if iv.measurable else "")


def _metrics_table(summary: RunSummary, db: int) -> list[str]:
    """float, every uniform baseline and the result: top-1 (with its difference from the best
    uniform method and the paired 95% interval), agreement, KL, logit SQNR, mean beta - gamma."""
    best, versus = _versus(summary)
    on = f"top-1 on {summary.images} evaluation images" if summary.images else "top-1"
    head = [f"{on}; SQNR in dB, {db}·log10"]
    if best:
        head.append(f"d top-1: points against uniform {best} (the best uniform method), paired 95% interval "
                    "over the same images; * where it excludes 0 (a real difference)")
    lines = [*head, f"{'policy':24s}{'top-1':>9s}  {'d top-1 [95%]':24s}{'agree':>9s}{'KL':>10s}"
                    f"{'logit SQNR':>12s}{'mean b-g':>10s}",
             f"{'float':24s}{_pct(summary.float_metrics.get('top1')):>9s}"]
    rows = [(f"uniform {m}", r) for m, r in summary.baselines.items()] + [("result", summary.result)]
    for name, r in rows:
        m = r.metrics
        if not r.ok:
            lines.append(f"{name:24s}  failed: {r.error}")
            continue
        delta = "(best uniform)" if name == f"uniform {best}" else _delta(versus.get(name)) if best else ""
        lines.append(f"{name:24s}{_pct(m.get('top1')):>9s}  {delta:24s}{_pct(m.get('agreement')):>9s}"
                     f"{m.get('kl', math.nan):>10.4f}{_dbs(m.get('logit_sqnr'), db):>12s}"
                     f"{_dbs(m.get('mean_sqnr_diff'), db):>10s}")
    return lines


#: what ``export --pick`` may export
PICKS = ("answer", "best")


def export_run(run: str, *, out: str | None = None, results_dir: str = "results", pick: str = "answer",
               integer_model: bool = True) -> Path:
    """The policy JSON of a finished run, built from its run record; written to ``out`` if given.

    ``integer_model``: also write the integer artifact beside it (``<stem>.integer.safetensors``,
    ``policysearch.artifact``): the run's model rebuilt, calibrated as the search calibrated it,
    under the exported policy; the JSON names it in ``integer_model``.

    ``pick``: ``answer`` (the strategy's own answer, written to the run's policy.json by default)
    or ``best`` (the best evaluated policy by the run's objective, uniform baselines included, from
    the record's verdict; written to the run's ``policy-best.json`` by default)."""

    if pick not in PICKS:
        raise ConfigError(f"--pick {pick[:40]!r} is unknown; valid: {', '.join(PICKS)}")
    run_dir = resolve_run_dir(run, results_dir)
    record = RunRecord.load(run_dir)
    if pick == "best":
        record = _best_record(record)
    doc = policy_document(record)
    default = "policy-best.json" if pick == "best" else record.data.get("outputs", {}).get("policy", "policy.json")
    dst = Path(out) if out is not None else run_dir / default
    if integer_model and record.data.get("config", {}).get("data") == IN_MEMORY:
        log.info("no integer artifact for run %s: its model and images were given in memory "
                 "(search_policy); PolicyResult.apply() rebuilds its integer model", record.name)
    elif integer_model:
        doc = dataclasses.replace(doc, integer_model=_write_artifact(record, dst))
    write_policy(dst, doc)
    read_policy(dst)
    return dst


#: how a data source picks its calibration images (recorded in the artifact)
CALIB_SELECTION = ("load_data(data, calib_size=images, seed=seed).calib_images(): the data source's calibration "
                   "split, a seeded class-balanced subset of it when calib_size is smaller; in that order")


def _write_artifact(record: Any, policy_path: Path) -> dict[str, Any]:
    """The run's integer model under its answer, saved beside ``policy_path``; its reference."""
    model, data = load_run_model(record, integer=True)
    config = record.data.get("config", {})
    calib = {"data": config.get("data", "fmnist-sample"), "seed": int(config.get("seed") or 0),
             "selection": CALIB_SELECTION, "digest": data_digest(data.calib_images())}
    ref = save_artifact(model, sidecar_path(policy_path), calibration=calib)
    ref["file"] = sidecar_path(policy_path).name
    return ref


def _best_record(record: Any) -> Any:
    """A copy of ``record`` whose answer is the verdict's best evaluated policy by the objective."""
    judged = record.data.get("verdict")
    if record.data.get("status") == "finished" and not judged:
        raise ConfigError(f"run {record.name!r} records no verdict (made by an older policysearch); run the same "
                          "`policysearch run` command again to add it, or export without --pick best")
    best = (judged or {}).get("best")
    if judged and not best:
        raise ConfigError(f"run {record.name!r} has an objective with several values ({judged.get('objective')}): "
                          "there is no single best policy; export the answer, or pick from the study's trials")
    data = copy.deepcopy(record.data)
    if best:
        keep = {k: v for k, v in data.get("answer", {}).items() if k in ("feasible", "shortfall")}
        data["answer"] = {"policy": best["policy"], "values": best["values"], "metrics": best["metrics"], **keep}
        data["picked"] = {"pick": "best", "label": best["label"], "objective": judged.get("objective"),
                          "is_answer": bool(judged.get("best_is_answer"))}
    return type(record)(record.run_dir, data)


def evaluate_policy_file(policy: str | None, *, model: str | None, checkpoint: str | None, data: str,
                         device: str = "auto", eval_size: int | None = None,
                         model_args: dict[str, int] | None = None, wiring: str | None = None) -> str:
    """Evaluate a policy file (or the float model) and compare with the metrics it records."""
    return check_policy_file(policy, model=model, checkpoint=checkpoint, data=data, device=device,
                             eval_size=eval_size, model_args=model_args, wiring=wiring)[0]


def _finetuned_weights(doc: Any, policy_path: str) -> Path | None:
    """The fine-tuned weights a policy file names (``model.finetuned``, relative to the file)."""
    name = doc.model.get("finetuned")
    if not name:
        return None
    path = Path(name)
    if not path.is_absolute():
        path = Path(policy_path).parent / path
    if not path.is_file():
        raise ConfigError(f"the policy file names fine-tuned weights {name!r} but {path} does not exist; "
                          "run `policysearch finetune` again, or pass --checkpoint to use other weights")
    return path


def _recorded(doc: PolicyDocument, finetuned: Path | None,
              given: dict[str, Any]) -> tuple[EvaluatorSpec, dict[str, Any]]:
    """The spec that evaluates as the policy file did (the images the run used, calibrated the same
    way, with its seed), ``given`` on top, and the metrics to compare with."""
    given = {**given}
    given.setdefault("wiring", doc.wiring or "native")
    if finetuned is None:
        return EvaluatorSpec.from_policy(doc, **given), dict(doc.metrics)
    given["checkpoint"] = str(finetuned)  # the training stage's weights, and the figures measured on them
    ft = dict(doc.provenance.get("finetune") or {})
    if ft:
        given.setdefault("eval_size", ft.get("eval_size"))
        if "calib_size" in ft:
            given["calib_size"] = ft["calib_size"]
    return EvaluatorSpec.from_policy(doc, **given), dict((doc.metrics.get("finetune") or {}).get("after") or {})


def _artifact_of(doc: PolicyDocument, policy_path: str) -> str | None:
    """The integer artifact a policy file names (``integer_model.file``, relative to the file),
    checked against the sha256 it records; None when the file names none."""
    ref = doc.integer_model
    if not ref:
        return None
    path = Path(ref["file"])
    if not path.is_absolute():
        path = Path(policy_path).parent / path
    if not path.is_file():
        raise ConfigError(f"the policy file names the integer artifact {ref['file']!r} but {path} does not exist; "
                          "export the run again (`policysearch export RUN`)")
    if ref.get("sha256") and artifact_reference(path)["sha256"] != ref["sha256"]:
        raise ConfigError(f"{path} is not the artifact the policy file was exported with (sha256 differs); "
                          "export the run again")
    return str(path)


def check_policy_file(policy: str | None, *, model: str | None, checkpoint: str | None, data: str,
                      device: str = "auto", eval_size: int | None = None,
                      model_args: dict[str, int] | None = None,
                      wiring: str | None = None) -> tuple[str, bool]:
    """``(report, reproduced)``: the policy's metrics now, against those its file records.

    A policy file from the training stage (``model.finetuned``) is evaluated on its fine-tuned
    weights, on the images the stage evaluated, against the figures measured after training
    (``metrics.finetune.after``); ``checkpoint`` overrides the weights (and compares against the
    search's figures)."""
    doc = read_policy(policy) if policy else None
    finetuned = _finetuned_weights(doc, policy) if doc is not None and checkpoint is None else None
    given: dict[str, Any] = {"data": data, "device": device, "progress": True}
    if model is not None:  # another model than the file's: none of its weights or architecture either
        given.update(model=model, checkpoint=None, model_args=())
    given.update({k: v for k, v in (("checkpoint", checkpoint), ("wiring", wiring), ("eval_size", eval_size))
                  if v is not None})
    if model_args is not None:
        given["model_args"] = tuple(sorted(model_args.items()))
    if doc is not None and finetuned is None and not ({"model", "checkpoint", "wiring"} & set(given)) \
            and model_args is None:
        given["artifact"] = _artifact_of(doc, policy)
    spec, recorded_metrics = (EvaluatorSpec(**given), {}) if doc is None else _recorded(doc, finetuned, given)
    ev = get_evaluator(spec)
    n_eval = ev.labels.numel() if ev.labels is not None else 0
    lines = [f"model {spec.model}, data {data}: float top-1 {_pct(ev.float_metrics.get('top1'))} "
             f"on {n_eval} evaluation images"]
    if doc is None:
        return "\n".join(lines), True
    if finetuned is not None:
        trained_on = (doc.provenance.get("finetune") or {}).get("data")
        lines.append(f"weights: fine-tuned, {finetuned}" + (f" (recorded on data {trained_on}; pass --data "
                                                             f"{trained_on} to compare)" if trained_on and
                                                             trained_on != data else ""))
    if spec.artifact is not None:
        if ev.model._policysearch.policy != doc.policy:
            raise ConfigError(f"{spec.artifact} holds another policy than {policy}; export the run again")
        lines.append(f"integer model: {spec.artifact} (loaded, not recalibrated)")
    res = ev.evaluate(doc.policy, strict=True)  # NaN logits: an error naming the site, not a 10% top-1
    lines.append(f"policy {policy}: top-1 {_pct(res.metrics.get('top1'))} on {n_eval} images, "
                 f"agreement {_pct(res.metrics.get('agreement'))}, KL {res.metrics.get('kl', math.nan):.5f}")
    recorded = recorded_metrics
    ok = True
    for key in ("top1", "agreement", "kl", "logit_sqnr"):
        if key in recorded and recorded[key] is not None:
            a, b = float(recorded[key]), float(res.metrics[key])
            same = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)
            ok = ok and same
            lines.append(f"  {key:11s} recorded {a:.6g}  now {b:.6g}  {'match' if same else 'DIFFERS'}")
    return "\n".join(lines), ok

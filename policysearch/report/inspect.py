"""Inspecting finished runs without re-running them (``policysearch list runs / show / trials``).

Everything here reads ``results/<run>/run.json`` (and, for the trials, the run's Optuna study);
nothing evaluates. A :class:`RunSummary` is a run's summary as the run printed it at its end, for
the whole search: every invocation of a resumed run (evaluations made, those taken from other
runs of the same work, time) rather than the last invocation only.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from policysearch.errors import ConfigError
from policysearch.objectives.objective import load_objective
from policysearch.policy import Policy
from policysearch.result import EvalResult, SiteMetrics
from policysearch.run import RUN_FILE, RunRecord, resolve_run_dir
from policysearch.study import KIND_ANSWER, open_storage

__all__ = ["TRIAL_FORMATS", "RunRow", "RunSummary", "Totals", "format_runs", "format_trials", "images_of", "list_runs",
           "load_summary", "next_steps", "read_run_config", "trial_rows"]

#: what ``policysearch trials --format`` writes
TRIAL_FORMATS = ("table", "json", "csv")
_METRICS = ("top1", "agreement", "kl", "logit_sqnr", "latency")


@dataclass(frozen=True, kw_only=True)
class Totals:
    """The whole search over every invocation of a run.

    ``evaluated``: evaluations this run made (all invocations); ``lent``: results taken from other
    runs of the same work; ``invocations``: how often the run was started; ``finished_invocations``
    and ``seconds``: those that reached the end and their wall time together; ``eval_seconds``: the
    evaluations' own time; ``last``: the last invocation's ``evaluated`` / ``reused`` (read back)."""

    evaluated: int
    lent: int | None
    invocations: int
    finished_invocations: int
    seconds: float | None
    eval_seconds: float
    last: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of_record(cls, data: Mapping[str, Any]) -> "Totals":
        history = [h for h in data.get("invocations") or [] if isinstance(h, Mapping)]
        if not history and data.get("status") == "finished":  # a run recorded before the history existed
            history = [{**dict(data.get("timings") or {}), "evaluated": data.get("evaluated"),
                        "reused": data.get("reused")}]
        evaluations = [e for e in data.get("evaluations") or [] if isinstance(e, Mapping)]
        times = [h.get("total_s") for h in history]
        lent = [h.get("lent") for h in history]
        return cls(evaluated=len(evaluations),
                   lent=sum(int(x) for x in lent) if lent and all(isinstance(x, int) for x in lent) else None,
                   invocations=int(data.get("resumed") or 0) + 1, finished_invocations=len(history),
                   seconds=sum(float(t) for t in times) if times and all(_is_num(t) for t in times) else None,
                   eval_seconds=sum(float(e.get("seconds") or 0.0) for e in evaluations),
                   last={k: int(data[k]) for k in ("evaluated", "reused") if isinstance(data.get(k), int)})

    def text(self) -> str:
        """``12 evaluations made over 2 invocations (3 taken from other runs), 1m 04s in all (evaluations
        58.3 s); the last invocation: 0 evaluated, 15 read back``."""
        taken = f", {self.lent} taken from other runs of the same work" if self.lent else ""
        time = f"{_duration(self.seconds)} in all" if self.seconds is not None else "time not recorded"
        if self.finished_invocations < self.invocations and self.seconds is not None:
            time += f" over the {self.finished_invocations} finished invocation(s)"
        out = (f"{self.evaluated} evaluations made over {_plural(self.invocations, 'invocation')}{taken}, {time} "
               f"(the evaluations {_duration(self.eval_seconds)})")
        if self.invocations > 1 and self.last:
            out += (f"; the last invocation: {self.last.get('evaluated', 0)} evaluated, "
                    f"{self.last.get('reused', 0)} read back")
        return out


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """What the summary of a run shows, rebuilt from ``run.json`` (:func:`load_summary`)."""

    run_name: str
    run_dir: Path
    status: str
    config: Mapping[str, Any]
    policy: Policy
    result: EvalResult
    baselines: Mapping[str, EvalResult]
    float_metrics: Mapping[str, float]
    totals: Totals
    #: evaluation images every top-1 is measured on (None: not recorded)
    images: int | None
    headroom: Mapping[str, Any] | None = None
    verdict: Mapping[str, Any] | None = None
    feasibility: Mapping[str, Any] | None = None

    @property
    def evaluated(self) -> int:
        return self.totals.evaluated

    @property
    def reused(self) -> int:
        return self.totals.last.get("reused", 0)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m {sec:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _metrics(raw: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in raw.items():
        try:
            out[k] = float(v)  # run.json keeps non-finite values as strings ("nan")
        except (TypeError, ValueError):
            continue
    return out


def _result(raw: Mapping[str, Any], *, sites: Mapping[str, Any] | None = None) -> EvalResult:
    metrics = _metrics({k: v for k, v in raw.items() if k not in ("values", "error", "sites", "policy")})
    values = tuple(float(v) for v in raw.get("values") or ())
    return EvalResult(values=values, metrics=metrics, error=raw.get("error"),
                      sites={k: SiteMetrics(gamma=float(v["gamma"]), beta=float(v["beta"]))
                             for k, v in (sites or {}).items()})


def images_of(data: Mapping[str, Any]) -> int | None:
    """The number of evaluation images the run's top-1 figures are measured on."""
    for comp in ((data.get("verdict") or {}).get("answer_vs_best_uniform"),
                 (data.get("headroom") or {}).get("headroom")):
        if isinstance(comp, Mapping) and int(comp.get("images") or 0) > 0:
            return int(comp["images"])
    size = (data.get("fingerprint") or {}).get("eval_size")
    return int(size) if isinstance(size, int) else None


def load_summary(run: str, *, results_dir: str | Path = "results") -> RunSummary:
    """The summary of run ``run`` (a name under ``results_dir`` or a run folder), from its run.json."""
    run_dir = resolve_run_dir(run, results_dir)
    data = RunRecord.load(run_dir).data
    if data.get("status") != "finished" or "answer" not in data:
        raise ConfigError(f"run {data.get('name', run)!r} has not finished (status {data.get('status')!r}"
                          + (f": {data['error']}" if data.get("error") else "")
                          + "); run the same `policysearch run` command again to finish it")
    answer = data["answer"]
    metrics = dict(answer.get("metrics") or {})
    result = _result({**metrics, "values": answer.get("values")}, sites=metrics.get("sites"))
    return RunSummary(
        run_name=str(data.get("name", run_dir.name)), run_dir=run_dir, status=str(data.get("status")),
        config=dict(data.get("config") or {}), policy=Policy.from_dict(answer["policy"]), result=result,
        baselines={m: _result(r) for m, r in (data.get("baselines") or {}).items()},
        float_metrics=_metrics(data.get("float_metrics") or {}), totals=Totals.of_record(data),
        images=images_of(data), headroom=data.get("headroom"), verdict=data.get("verdict"),
        feasibility=data.get("constraints"))


# -- list runs -------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class RunRow:
    """One run of a results folder, as ``policysearch list runs`` shows it."""

    name: str
    model: str | None
    strategy: str | None
    objective: str | None
    status: str
    evaluations: int
    top1: float | None
    images: int | None
    updated: str | None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "model", "strategy", "objective", "status", "evaluations",
                                              "top1", "images", "updated")}


def list_runs(results_dir: str | Path = "results") -> list[RunRow]:
    """Every run folder under ``results_dir`` (oldest first); unreadable records are skipped."""
    root = Path(results_dir)
    if not root.is_dir():
        raise ConfigError(f"no results folder {root}; run `policysearch run` first, or pass --results-dir")
    rows = []
    for path in sorted(root.glob(f"*/{RUN_FILE}")):
        try:
            data = RunRecord.load(path.parent).data
        except ConfigError:
            continue
        config, answer = data.get("config") or {}, data.get("answer") or {}
        top1 = (answer.get("metrics") or {}).get("top1") if data.get("status") == "finished" else None
        rows.append(RunRow(name=str(data.get("name", path.parent.name)), model=config.get("model"),
                           strategy=config.get("strategy"), objective=(data.get("objective") or {}).get("name"),
                           status=str(data.get("status")), evaluations=len(data.get("evaluations") or []),
                           top1=float(top1) if _is_num(top1) else None, images=images_of(data),
                           updated=data.get("updated") or data.get("created")))
    return sorted(rows, key=lambda r: (r.updated or "", r.name))


def format_runs(rows: Sequence[RunRow]) -> str:
    """The runs as a table: name, model, strategy, objective, status, evaluations, answer top-1."""
    head = ["name", "model", "strategy", "objective", "status", "evaluations", "answer top-1"]
    body = [[r.name, r.model or "?", r.strategy or "?", r.objective or "?", r.status, str(r.evaluations),
             "-" if r.top1 is None else f"{100 * r.top1:.2f}%" + (f" ({r.images} images)" if r.images else "")]
            for r in rows]
    return _table(head, body, right={5})


def _table(head: Sequence[str], body: Sequence[Sequence[str]], *, right: set[int] = frozenset()) -> str:
    widths = [max([len(head[i]), *(len(r[i]) for r in body)]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), *(line(r) for r in body)]).rstrip()


# -- trials ----------------------------------------------------------------------------------------

def trial_rows(run: str, *, results_dir: str | Path = "results", storage: str | None = None) -> list[dict[str, Any]]:
    """Every trial of the run's study: number, state, kind, values, metrics, method counts, the
    choice per site (params), start, end and duration; the answer copies included (kind answer)."""
    run_dir = resolve_run_dir(run, results_dir)
    data = RunRecord.load(run_dir).data
    url = storage or data.get("storage")
    if not url:
        raise ConfigError(f"run {data.get('name', run)!r} records no storage; pass --storage")
    if "***" in url:
        raise ConfigError(f"run.json hides the password of its storage ({url}); pass --storage with the full URL")
    name = str(data.get("study") or data.get("name"))
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise ConfigError(f"no study {name!r} in {url}; pass the run's --storage") from None
    return [_trial_row(t) for t in study.get_trials(deepcopy=False)]


def _trial_row(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    attrs = t.user_attrs
    metrics = {k: _num(attrs.get(f"m.{k}")) for k in _METRICS if f"m.{k}" in attrs}
    duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
        else None
    return {"number": t.number, "state": t.state.name, "kind": attrs.get("kind"),
            "values": list(t.values) if t.values is not None else None, **metrics,
            "method_counts": attrs.get("method_counts"), "answer_of": attrs.get("answer_of"),
            "reused_from": attrs.get("reused_from"), "error": attrs.get("error"),
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            "duration_s": duration, "params": dict(t.params)}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def format_trials(rows: Sequence[Mapping[str, Any]], fmt: str = "table") -> str:
    """The trials as a table, JSON (a list of objects) or CSV (one column per site's choice)."""
    if fmt not in TRIAL_FORMATS:
        raise ConfigError(f"--format {fmt[:20]!r} is unknown; valid: {', '.join(TRIAL_FORMATS)}")
    if fmt == "json":
        return json.dumps(list(rows), indent=1)
    if fmt == "csv":
        sites = list(dict.fromkeys(s for r in rows for s in r["params"]))
        flat = [{**{k: _cell(v) for k, v in r.items() if k != "params"}, **r["params"]} for r in rows]
        keys = list(dict.fromkeys(k for r in flat for k in r if k not in sites)) + sites
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return buf.getvalue().rstrip("\n")
    head = ["#", "state", "kind", "values", "top-1", "agree", "KL", "seconds", "methods"]
    body = [[str(r["number"]), r["state"], str(r.get("kind") or "")
             + (f" of #{r['answer_of']}" if r.get("kind") == KIND_ANSWER and r.get("answer_of") is not None else ""),
             ", ".join(f"{v:.5g}" for v in r["values"]) if r.get("values") else "-",
             _fmt(r.get("top1"), pct=True), _fmt(r.get("agreement"), pct=True), _fmt(r.get("kl")),
             "-" if r.get("duration_s") is None else f"{r['duration_s']:.1f}", _counts(r.get("method_counts"))]
            for r in rows]
    return _table(head, body, right={0, 3, 4, 5, 6, 7})


def _cell(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v


def _fmt(v: Any, *, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.5f}"


def _counts(counts: Any) -> str:
    """``softmax fqvit 6; gelu ibert 3, ivit 3`` from ``{"softmax": {"fqvit": 6}, ...}``."""
    if not isinstance(counts, Mapping):
        return ""
    return "; ".join(f"{kind} " + ", ".join(f"{m} {n}" for m, n in per.items())
                     for kind, per in counts.items() if isinstance(per, Mapping))


def next_steps(run_name: str, *, results_dir: str | Path = "results") -> list[str]:
    """What to do with a finished run: the report, the dashboard and the export commands."""
    where = "" if str(results_dir) == "results" else f" --results-dir {shlex.quote(str(results_dir))}"
    run_name = shlex.quote(run_name)
    return [f"next: policysearch report {run_name}{where}    (report.html: figures and tables)",
            f"      policysearch dashboard {run_name}{where} (every trial in optuna-dashboard)",
            f"      policysearch export {run_name}{where}    (the policy JSON; --onnx FILE for ONNX)"]



def read_run_config(path: str | Path) -> dict[str, Any]:
    """The search settings of a run's ``config.yaml`` (or any YAML of SearchConfig fields), as
    keyword arguments of :class:`policysearch.search.SearchConfig`.

    The run writes its objective and space resolved (mappings); they are read back by name: the
    objective when the preset of that name is the same objective (else it stays a mapping, and
    the caller asks for ``--objective``), the space by its name."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file; give a run's config.yaml, e.g. "
                          "results/RUN/config.yaml") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path} is not a readable YAML file ({type(exc).__name__})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config {path} must be a mapping of run settings (as results/RUN/config.yaml)")
    out = dict(data)
    objective = out.get("objective")
    if isinstance(objective, Mapping) and isinstance(objective.get("name"), str):
        try:
            same = load_objective(objective["name"]).to_dict() == dict(objective)
        except ConfigError:
            same = False
        if same:
            out["objective"] = objective["name"]
    space = out.get("space")
    if isinstance(space, Mapping):
        out["space"] = str(space.get("name") or "paper")
    return out

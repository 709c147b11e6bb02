"""The report's data: what the run's stages wrote (``run.json``, ``sensitivity.csv``) and its
Optuna study, read into one :class:`ReportData` (:func:`gather`); the figures and the page
(:mod:`policysearch.report.html`, :mod:`policysearch.report.page`) are drawn from it."""
from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import policysearch.methods as _catalogue
from policysearch.errors import ConfigError
from policysearch.finetune.record import FinetuneStage
from policysearch.policy import Policy
from policysearch.run import RunRecord, policy_document
from policysearch.study import KIND_UNIFORM, open_storage

__all__ = ["KINDS", "NOT_RUN", "Figure", "ReportData", "gather"]

log = logging.getLogger(__name__)

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


"""optuna-dashboard for a run's study: notes that mark the answer, and the launcher.

``policysearch dashboard [RUN]`` serves optuna-dashboard (extra ``dashboard``) on the run's
storage, on the loopback address only, with the artifact store the run's answer trial uses, and
prints the URL of the run's study page. Before serving it writes the notes (:func:`annotate`),
so a study recorded while optuna-dashboard was not installed is marked all the same.

Notes are Markdown that optuna-dashboard keeps in the study's system attributes, so unlike user
attributes they can be written on finished trials. :func:`annotate` derives every note from the
trials' user attributes (``kind``, ``answer_of``) and the study's (``answer_trial``) and rewrites
only the notes whose text changed.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
from optuna.artifacts import FileSystemArtifactStore

from policysearch.errors import ConfigError
from policysearch.report.verdict import headroom_sentence, verdict_sentence
from policysearch.run import RunRecord, resolve_run_dir
from policysearch.study import default_storage, open_storage

__all__ = ["DashboardTarget", "annotate", "dashboard_target", "require_dashboard", "serve", "serving",
           "verdict_attrs"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


def require_dashboard() -> Any:
    """The ``optuna_dashboard`` module, or one actionable error."""
    try:
        import optuna_dashboard
    except ImportError:
        raise ConfigError('optuna-dashboard is not installed; pip install "policysearch[dashboard]" '
                          "(or pip install optuna-dashboard==0.21.0)") from None
    return optuna_dashboard


# -- notes ------------------------------------------------------------------------------------

def verdict_attrs(data: Mapping[str, Any]) -> dict[str, str]:
    """User attributes for the answer trial from a run record: ``answer_name`` (what it is),
    ``verdict`` (how it compares with the best uniform method) and ``headroom`` (the sentence)."""
    strategy = (data.get("config") or {}).get("strategy", "?")
    out = {"answer_name": f"the answer of strategy {strategy}"}
    if data.get("verdict"):
        out["verdict"] = verdict_sentence(data["verdict"])
    if data.get("headroom"):
        out["headroom"] = headroom_sentence(data["headroom"])
    return out


def _fmt(v: Any, spec: str) -> str:
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return "n/a"


def _counts_table(counts: Any) -> str:
    """A trial's ``method_counts`` attribute (``{kind: {method: n}}``) as a Markdown table."""
    if not isinstance(counts, dict) or not counts:
        return "(not recorded)"
    methods = sorted({m for c in counts.values() for m in c})
    rows = ["| kind | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    rows += [f"| {k} | " + " | ".join(str(c.get(m, 0)) for m in methods) + " |" for k, c in counts.items()]
    return "\n".join(rows)


def _answer_note(t: Any, study: Any, current: int | None) -> str:
    """Short lines: optuna-dashboard lays a note out as wide as the trial's widest attribute."""
    a = t.user_attrs
    lines = []
    if current is not None and t.number != current:
        lines += [f"**Superseded** by trial #{current}, the current copy of the run's answer.", ""]
    lines += [
        "## The run's answer",
        "",
        f"- strategy `{study.user_attrs.get('strategy', '?')}`, objective `{study.user_attrs.get('objective', '?')}`",
        f"- a copy of evaluation **#{a.get('answer_of')}**: the same policy and values",
        f"- added by the `{a.get('answer_stage')}` stage to carry the files below",
        "  (optuna attaches artifacts only to a running trial)",
        f"- top-1 {_fmt(a.get('m.top1'), '.2%')}, agreement with float {_fmt(a.get('m.agreement'), '.2%')}",
        f"- KL {_fmt(a.get('m.kl'), '.3g')}, logit SQNR {_fmt(a.get('m.logit_sqnr'), '.1f')} dB",
        *([f"- {a['verdict']}"] if a.get("verdict") else []),
        "",
        "Method counts per kind:",
        "",
        _counts_table(a.get("method_counts")),
        "",
        "Per site: the user attributes `site.<name>`",
        "(gamma: input ASQNR, beta: output ASQNR).",
    ]
    return "\n".join(lines)


def _study_note(study: Any, trials: list[Any], current: int | None, source: int | None) -> str:
    kinds = Counter(str(t.user_attrs.get("kind", "unmarked")) for t in trials)
    strategy = study.user_attrs.get("strategy", "?")
    lines = [f"## Run {study.study_name}", ""]
    if current is not None:
        lines += [f"**The answer is trial #{current}** (user attribute `kind` = `answer`), a copy of "
                  f"evaluation #{source} carrying the policy JSON and the report's figures as artifacts.",
                  ""]
    lines += [
        f"Strategy `{strategy}`, objective `{study.user_attrs.get('objective', '?')}`, model "
        f"`{study.user_attrs.get('model', '?')}`, data `{study.user_attrs.get('data', '?')}`, wiring "
        f"`{study.user_attrs.get('wiring', '?')}`.",
        "",
        "*Best Trial* ranks trials by objective value alone: it can be a uniform baseline,",
        "which is not what an SQNR rule chooses, or the `ceiling` (every non-linear site in float,",
        "a reference outside the space). The strategy's choice is the `answer` trial.",
        "",
        *([f"**How the answer compares:** {study.user_attrs['verdict']}", ""]
          if study.user_attrs.get("verdict") else []),
        *([f"**Headroom** (trial of kind `ceiling`: every non-linear site in float): "
           f"{study.user_attrs['headroom']}", ""] if study.user_attrs.get("headroom") else []),
        "| kind (user attribute) | trials |",
        "|---|---|",
    ]
    lines += [f"| {k} | {n} |" for k, n in sorted(kinds.items())]
    return "\n".join(lines)


def annotate(study: Any) -> bool:
    """Write the notes that mark the run's answer (on the study, on each answer copy and on the
    evaluation it copies). Returns False, doing nothing, when optuna-dashboard is not installed."""
    try:
        from optuna_dashboard import get_note, save_note
    except ImportError:
        log.info("optuna-dashboard is not installed: no notes written (`policysearch dashboard` writes them)")
        return False
    trials = study.get_trials(deepcopy=False)
    current = study.user_attrs.get("answer_trial")
    source = study.user_attrs.get("answer_of")
    by_number = {t.number: t for t in trials}

    def put(target: Any, body: str) -> None:
        if get_note(target) != body:
            save_note(target, body)

    for t in trials:
        if t.user_attrs.get("kind") == "answer":
            put(optuna.trial.Trial(study, t._trial_id), _answer_note(t, study, current))
    if isinstance(source, int) and source in by_number and current is not None:
        put(optuna.trial.Trial(study, by_number[source]._trial_id),
            f"This evaluation is the run's answer. Trial #{current} is its copy with the policy JSON "
            "and the report's figures attached as artifacts.")
    put(study, _study_note(study, trials, current, source))
    return True


# -- the launcher -----------------------------------------------------------------------------

@dataclass(frozen=True)
class DashboardTarget:
    storage: str
    study: str | None
    artifact_dir: Path | None


def dashboard_target(run: str | None = None, *, results_dir: str | Path = "results", storage: str | None = None,
                     artifact_dir: str | Path | None = None) -> DashboardTarget:
    """What to serve: ``run``'s storage, study and artifact store (or the results folder's)."""
    study = None
    recorded_artifacts = None
    if run is not None:
        record = RunRecord.load(resolve_run_dir(run, results_dir))
        study = str(record.data.get("study") or record.name)
        recorded = record.data.get("storage")
        if storage is None:
            if recorded and "***" in str(recorded):
                raise ConfigError(f"run {record.name!r} records its storage without the password "
                                  f"({recorded}); pass it with --storage URL")
            storage = recorded
        recorded_artifacts = record.data.get("artifacts")
    storage = storage or default_storage(results_dir)
    folder = artifact_dir or recorded_artifacts or Path(results_dir) / "artifacts"
    return DashboardTarget(storage=str(storage), study=study, artifact_dir=Path(folder))


@contextmanager
def serving(target: DashboardTarget, *, port: int = 8080) -> Iterator[str]:
    """Serve optuna-dashboard for ``target`` on 127.0.0.1:``port`` (0: a free port) in a thread;
    yields the URL of the study page (or of the study list)."""
    dashboard = require_dashboard()

    storage = open_storage(target.storage)
    url_path = "/dashboard/"
    if target.study is not None:
        try:
            study_id = storage.get_study_id_from_name(target.study)
        except KeyError:
            raise ConfigError(f"study {target.study!r} is not in {target.storage}; "
                              "pass the run's --storage") from None
        annotate(optuna.load_study(study_name=target.study, storage=storage))
        url_path = f"/dashboard/studies/{study_id}"
    store = None
    if target.artifact_dir is not None:
        target.artifact_dir.mkdir(parents=True, exist_ok=True)
        store = FileSystemArtifactStore(str(target.artifact_dir))
    app = dashboard.wsgi(storage, artifact_store=store)

    class _Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
            log.debug("dashboard: " + format, *args)

    try:
        server = make_server(HOST, port, app, server_class=_Server, handler_class=_Quiet)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {HOST}:{port} ({exc.strerror or exc}); choose another --port") from None
    thread = threading.Thread(target=server.serve_forever, name="optuna-dashboard", daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_port}{url_path}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def serve(target: DashboardTarget, *, port: int = 8080, ready: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted; ``ready(url)`` is called once the server listens."""
    with serving(target, port=port) as url:
        if ready is not None:
            ready(url)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            log.info("dashboard stopped")

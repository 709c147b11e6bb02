"""Optuna study recording: every evaluated policy is one trial, whatever the strategy.

params = site choices (categorical over the site's allowed choices), values = objective value(s),
user attrs = metrics, per-site SQNR and the policy key. The study carries the run's fingerprint;
on resume its completed trials are read back with their values recomputed from the stored
metrics, and other studies in the same storage with an equal fingerprint lend theirs too (a run
that changes only the objective re-evaluates nothing).

For reading in optuna-dashboard every trial says what it is (user attribute ``kind``: ``uniform
baseline``, ``rule result``, ``search candidate`` or ``answer``) and carries one readable attribute
per site (``site.<name>``: choice, gamma, beta). Finished trials cannot change, and artifacts can
only be attached to a running trial, so the run's answer is published as one more trial,
:func:`publish_answer`: a copy of the answer's evaluation (same params and values, ``kind`` =
``answer``, ``answer_of`` = the evaluation's number) opened with ``study.ask``, given the policy JSON
(and, from ``policysearch report``, the report and its figures) as artifacts, then told. Copies are
never read back as evaluations.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc as sa_exc
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from policysearch.errors import ConfigError
from policysearch.identity import (
    diff_fingerprints,
    fingerprint_digest,
    refusal,
    setting_changes,
    settings_refusal,
)
from policysearch.policy import Policy
from policysearch.result import EvalResult

__all__ = [
    "KIND_ANSWER",
    "KIND_CANDIDATE",
    "KIND_CEILING",
    "KIND_RULE",
    "KIND_UNIFORM",
    "AnswerTrial",
    "StudyRecorder",
    "StudyWriteError",
    "default_storage",
    "open_storage",
    "publish_answer",
    "redact_url",
    "run_lock_path",
    "same_storage",
    "site_attrs",
    "sqlite_path",
    "storage_identity",
]

log = logging.getLogger(__name__)

#: what a trial is (its user attribute ``kind``)
KIND_UNIFORM = "uniform baseline"  # one method everywhere (``uniform_method`` names it)
KIND_RULE = "rule result"  # the policy an SQNR rule picked from the uniform runs
KIND_CANDIDATE = "search candidate"  # any other policy a strategy asked
KIND_ANSWER = "answer"  # a copy of the run's answer, with its artifacts (publish_answer)
KIND_CEILING = "ceiling"  # every site in float on the same quantized linears (never a strategy's candidate)
TRIAL_KINDS = (KIND_UNIFORM, KIND_RULE, KIND_CANDIDATE, KIND_ANSWER, KIND_CEILING)


def default_storage(results_dir: str | Path = "results") -> str:
    """``sqlite:///<results_dir>/studies.db`` (the folder is created by the run)."""
    return f"sqlite:///{Path(results_dir) / 'studies.db'}"


def redact_url(url: str) -> str:
    """The URL without its password (for messages and records)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is reported elsewhere
        return url if len(url) <= 80 else url[:77] + "..."


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for another database or an in-memory one)."""
    if not url.startswith("sqlite:///"):
        return None
    target = url[len("sqlite:///"):].split("?", 1)[0]
    if target.startswith("file:"):
        target = target[len("file:"):]
    return Path(target) if target and target != ":memory:" else None


@contextmanager
def _creation_lock(db: Path | None) -> Iterator[None]:
    """Serialise schema creation on one SQLite file: processes that open a new storage at the same
    moment would both create Optuna's tables (``UNIQUE constraint failed: alembic_version``); with
    ``<db>.lock`` held, the second waits and finds the schema made. ``flock`` dies with its process."""
    if db is None:
        yield
        return
    try:
        fd = os.open(db.with_name(db.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only folder: nothing can be created there, so nothing races
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


#: another process creating the same schema at the same moment (a server database, no file to lock)
_SCHEMA_RACE = ("alembic_version", "already exists", "duplicate key", "unique constraint")


def _new_rdb(url: str, *, tries: int = 5) -> optuna.storages.RDBStorage:
    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url)
        except (sa_exc.IntegrityError, sa_exc.OperationalError, sa_exc.ProgrammingError) as exc:
            if attempt == tries - 1 or not any(s in str(exc).lower() for s in _SCHEMA_RACE):
                raise
            log.debug("storage schema created by another process at the same moment; opening it again")
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def storage_identity(url: str) -> str:
    """A storage URL as compared between invocations: an SQLite file by its resolved path, another
    database by its URL without the password."""
    db = sqlite_path(url)
    if db is not None:
        return f"sqlite:{db.expanduser().resolve()}"
    return redact_url(url)


def same_storage(a: str, b: str) -> bool:
    """Whether two storage URLs (either possibly redacted) name the same database."""
    return a == b or storage_identity(a) == storage_identity(b)


def run_lock_path(storage: str, run_name: str) -> Path | None:
    """The lock file that makes ``run_name`` one writer per SQLite storage, whatever its results
    folder: ``<db>.locks/<run>.lock`` (None for a server database)."""
    db = sqlite_path(storage)
    if db is None or not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
        return None  # nothing can be written beside a read-only database (its run is refused later)
    return db.with_name(db.name + ".locks") / f"{run_name}.lock"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for ``url``; a malformed, unreachable or driverless URL is one line.

    Safe to call from several processes at once on a storage that does not exist yet."""
    shown = redact_url(url)
    db = sqlite_path(url)
    if db is not None and not url[len("sqlite:///"):].startswith("file:"):
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _creation_lock(db if db is not None and db.parent.is_dir() else None):
            return _new_rdb(url)
    except ImportError as exc:
        raise ConfigError(f"--storage {shown}: the database driver is not installed ({exc}); "
                          "for PostgreSQL: pip install \"policysearch[postgres]\" (psycopg 3 and psycopg2)") from None
    except sa_exc.ArgumentError as exc:
        raise ConfigError(f"--storage {shown!r} is not a valid database URL ({_first_line(exc)}); "
                          "use e.g. sqlite:///results/studies.db or postgresql://user@host/db") from None
    except sa_exc.SQLAlchemyError as exc:
        raise ConfigError(f"--storage {shown}: cannot open the database ({_first_line(exc)}); "
                          "check that it is reachable and writable") from None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


class StudyWriteError(ConfigError):
    """The storage refused a write (full disk, read-only or gone); ``__cause__`` is the storage's error."""


def _write_error(storage: str, exc: BaseException) -> StudyWriteError:
    return StudyWriteError(f"--storage {redact_url(storage)}: cannot write the study ({_first_line(exc)}); "
                       "use a writable database (or another --storage / --results-dir)")


class StudyRecorder:
    """One Optuna study per run in any RDB storage (SQLite by default).

    Opening checks, before any work, that an existing study of this name was made by the same
    work (fingerprint) and objective; a mismatch is one :class:`ConfigError`.
    """

    def __init__(
        self,
        *,
        storage: str,
        study_name: str,
        directions: Sequence[str],
        fingerprint: Mapping[str, Any],
        objective: Mapping[str, Any],
        attrs: Mapping[str, object] | None = None,
        run_dir: Path | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage_url = storage
        self.storage = open_storage(storage)
        self.study_name = study_name
        try:
            self.study = self._open(directions)
            attrs_now = self.study.user_attrs
            self._check_home(run_dir, attrs_now)
            if list(self.study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
                raise ConfigError(
                    f"study {study_name!r} in {redact_url(storage)} was created with other objective "
                    f"directions ({', '.join(d.name.lower() for d in self.study.directions)}); "
                    "choose another --run-name or the run's original --objective"
                )
            old_fp = attrs_now.get("fingerprint")
            if self.study.trials and old_fp is None:
                raise ConfigError(f"study {study_name!r} in {redact_url(storage)} has trials but no run "
                                  "fingerprint (made by an older policysearch); choose another --run-name")
            if old_fp is not None:
                stale = [k for k in diff_fingerprints(old_fp, fingerprint) if k != "data_digest"]
                if stale:
                    raise refusal(study_name, old_fp, fingerprint, stale)
            old_settings = {k: v for k, v in (("strategy", attrs_now.get("strategy")),
                                              ("space", attrs_now.get("space")),
                                              ("objective", attrs_now.get("objective_spec"))) if v is not None}
            changed = setting_changes(old_settings, dict(settings or {"objective": dict(objective)}))
            if changed:
                raise settings_refusal(study_name, old_settings, dict(settings or {"objective": dict(objective)}),
                                       changed)
            if "answer" not in attrs_now:  # first, so optuna-dashboard lists it first among the study's attributes
                self.study.set_user_attr("answer", "not chosen yet (the search has not finished)")
            self.study.set_user_attr("objective_spec", dict(objective))
            with warnings.catch_warnings():  # "experimental" since optuna 3.2; the dashboard reads these names
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.set_metric_names(objective_names(objective))
            self.study.set_user_attr("fingerprint", dict(fingerprint))
            if run_dir is not None:
                self.study.set_user_attr("run_dir", str(Path(run_dir).resolve()))
            for key, value in (attrs or {}).items():
                self.study.set_user_attr(key, value)
        except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            raise _write_error(storage, exc.__cause__ or exc) from None
        self.fingerprint = dict(fingerprint)
        self.distributions: dict[str, CategoricalDistribution] = {}
        self.n_values = len(directions)

    def _open(self, directions: Sequence[str]) -> optuna.Study:
        """The run's study; one without any trial (a run that stopped before its first evaluation)
        is made anew, so that a changed run starts afresh under its name."""
        study = optuna.create_study(storage=self.storage, study_name=self.study_name,
                                    directions=list(directions), load_if_exists=True)
        if study.user_attrs and not study.get_trials(deepcopy=False):
            optuna.delete_study(study_name=self.study_name, storage=self.storage)
            study = optuna.create_study(storage=self.storage, study_name=self.study_name,
                                        directions=list(directions))
        return study

    def _check_home(self, run_dir: Path | None, attrs_now: Mapping[str, Any]) -> None:
        """A run name is one run: refuse this study from another results folder while the folder
        that made it still holds the run (a folder that is gone is adopted)."""
        home = attrs_now.get("run_dir")
        if run_dir is None or not home or Path(home) == Path(run_dir).resolve():
            return
        if (Path(home) / "run.json").is_file():
            raise ConfigError(
                f"run {self.study_name!r} lives in {home} (its study in {redact_url(self.storage_url)}), "
                f"not in {Path(run_dir)}; resume it with --results-dir {Path(home).parent}, or choose "
                "another --run-name")
        log.warning("run %r was made in %s, which no longer holds it; continuing it in %s",
                    self.study_name, home, run_dir)

    def set_data_digest(self, digest: str) -> None:
        """Complete the fingerprint once the data is loaded (refusing a changed selection)."""
        old = self.study.user_attrs.get("fingerprint", {}).get("data_digest")
        if old is not None and old != digest:
            raise refusal(self.study_name, {"data_digest": old}, {"data_digest": digest}, ["data_digest"])
        self.fingerprint["data_digest"] = digest
        self.study.set_user_attr("fingerprint", self.fingerprint)
        self.study.set_user_attr("fingerprint_digest", fingerprint_digest(self.fingerprint))

    def set_choices(self, choices: Mapping[str, Sequence[str]], *, space: str = "") -> None:
        """The space's choices per site; a study that holds trials over other choices (the space's
        definition changed under the same name) is refused before any evaluation."""
        self.distributions = {
            name: CategoricalDistribution(list(dict.fromkeys(c))) for name, c in choices.items()
        }
        for t in self.study.get_trials(deepcopy=False):
            for name, dist in t.distributions.items():
                new = self.distributions.get(name)
                if new is not None and dist != new:
                    raise ConfigError(
                        f"run {self.study_name!r} was searched over other choices at site {name} "
                        f"({', '.join(map(str, dist.choices))}), not {', '.join(map(str, new.choices))}"
                        f"{f' (--space {space} changed)' if space else ''}; choose a new --run-name (it "
                        "reuses this run's evaluations of the same work), or resume with the original space")

    def completed(self, objective: Any) -> dict[str, EvalResult]:
        """Results already in the study, by policy key, values recomputed under ``objective``."""
        return _results(self.study, objective)

    def reusable(self, objective: Any) -> tuple[dict[str, EvalResult], list[str]]:
        """Results of other studies in this storage made by the same work (equal fingerprint)."""
        digest = fingerprint_digest(self.fingerprint)
        out: dict[str, EvalResult] = {}
        donors = []
        for summary in optuna.get_all_study_summaries(self.storage, include_best_trial=False):
            if summary.study_name == self.study_name or summary.user_attrs.get("fingerprint_digest") != digest:
                continue
            other = optuna.load_study(study_name=summary.study_name, storage=self.storage)
            found = _results(other, objective)
            for k, r in found.items():
                out.setdefault(k, r)
            if found:
                donors.append(summary.study_name)
        return out, donors

    def record(self, policy: Policy, result: EvalResult, *, tag: str = "", reused_from: str | None = None,
               started: _dt.datetime | None = None, finished: _dt.datetime | None = None,
               kind: str | None = None, uniform_method: str | None = None) -> None:
        """Add one finished evaluation as a trial (``started``/``finished``: its real times;
        ``kind``: one of :data:`TRIAL_KINDS`; ``uniform_method``: the method of a uniform baseline)."""
        params, dists = {}, {}
        for site, choice in policy.items():
            value = str(choice)
            dist = self.distributions.get(site.name)
            if dist is not None and value not in dist.choices:
                continue  # outside the space (the ceiling's fp32): optuna cannot widen a parameter; policy_key says it
            if dist is None:
                dist = CategoricalDistribution([value])
            params[site.name], dists[site.name] = value, dist
        attrs: dict[str, Any] = {"kind": kind} if kind else {}
        if uniform_method:
            attrs["uniform_method"] = uniform_method
        attrs.update({
            "tag": tag,
            "method_counts": policy.method_counts(),
            **{f"m.{k}": _num(v) for k, v in result.metrics.items()},
            **site_attrs(policy, result),
            "policy_key": policy.key(),
            "result": _jsonable(result.to_dict()),
        })
        if reused_from:
            attrs["reused_from"] = reused_from
        if result.ok:
            trial = optuna.trial.create_trial(
                params=params, distributions=dists, values=list(result.values), user_attrs=attrs
            )
        else:
            trial = optuna.trial.create_trial(
                params=params, distributions=dists, state=TrialState.FAIL, user_attrs={**attrs, "error": result.error}
            )
        if started is not None:
            trial.datetime_start = started
            trial.datetime_complete = finished or started
        try:
            self.study.add_trial(trial)
        except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            raise _write_error(self.storage_url, exc.__cause__ or exc) from exc

    def evaluation_trials(self) -> list[dict[str, Any]]:
        """What run.json lists of each evaluation in the study: ``key``, ``tag``, ``counts``,
        ``seconds`` (answer copies left out)."""
        out = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            attrs = t.user_attrs
            if attrs.get("policy_key") and attrs.get("kind") != KIND_ANSWER:
                took = (t.datetime_complete - t.datetime_start).total_seconds() \
                    if t.datetime_start and t.datetime_complete else 0.0
                out.append({"key": attrs["policy_key"], "tag": attrs.get("tag", ""),
                            "counts": attrs.get("method_counts", {}), "seconds": round(took, 3)})
        return out

    def publish_answer(self, policy: Policy, *, stage: str, artifacts: Sequence[Path],
                       artifact_dir: str | Path, attrs: Mapping[str, Any] | None = None) -> "AnswerTrial":
        """:func:`publish_answer` in this run's study (a storage error is one clear error)."""
        try:
            return publish_answer(self.storage, self.study_name, policy.key(), stage=stage,
                                  artifacts=artifacts, artifact_dir=artifact_dir, attrs=attrs)
        except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            raise _write_error(self.storage_url, exc.__cause__ or exc) from None


def site_attrs(policy: Policy, result: EvalResult) -> dict[str, str]:
    """One readable user attribute per measured site: ``site.<name>`` = ``"ivit: gamma 90.1 / beta
    88.2 dB (diff -1.9)"`` (dB in the stored 20·log10 convention)."""
    out = {}
    for site, choice in policy.items():
        m = result.sites.get(site.name)
        if m is not None:
            out[f"site.{site.name}"] = f"{choice}: gamma {m.gamma:.1f} / beta {m.beta:.1f} dB (diff {m.diff:+.1f})"
    return out


class AnswerTrial:
    """The trial that carries a run's answer: ``number``, ``source`` (the evaluation it copies),
    ``created`` (False when an equal copy already existed and was reused)."""

    def __init__(self, number: int, source: int, created: bool) -> None:
        self.number, self.source, self.created = number, source, created

    def __repr__(self) -> str:
        return f"AnswerTrial(number={self.number}, source={self.source}, created={self.created})"


def publish_answer(
    storage: str | optuna.storages.BaseStorage,
    study_name: str,
    policy_key: str,
    *,
    stage: str,
    artifacts: Sequence[Path] | Callable[[int], Sequence[Path]] = (),
    artifact_dir: str | Path | None = None,
    digest: str | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> AnswerTrial:
    """Add the run's answer to its study as a trial of kind ``answer`` with ``artifacts`` attached.

    Optuna attaches artifacts only to a running trial and never changes a finished one, so the
    answer's evaluation (the completed trial with ``policy_key``) is copied: a trial with the same
    params and values is opened with ``study.ask``, given the user attributes ``kind = "answer"``,
    ``answer_of`` (the evaluation's number) and ``answer_stage`` (``stage``), the files are uploaded
    into the :class:`optuna.artifacts.FileSystemArtifactStore` at ``artifact_dir``, and the trial is
    told. ``artifacts`` may be a function of the new trial's number (files that name it).

    Idempotent: with ``digest`` None, an existing answer copy of the same policy is reused; with a
    ``digest`` (a hash of the artifacts' content), one with the same digest is. The study's user
    attributes ``answer_trial`` and ``answer_of`` name the current copy and its evaluation.
    """
    if isinstance(storage, str):
        storage = open_storage(storage)
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=0))
    trials = study.get_trials(deepcopy=False)
    source = next((t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("policy_key") == policy_key
                   and t.user_attrs.get("kind") != KIND_ANSWER), None)
    if source is None:
        raise ConfigError(f"study {study_name!r} has no completed evaluation of the run's answer; "
                          "run the same `policysearch run` command again to record it")
    for t in reversed(trials):
        if (t.state == TrialState.COMPLETE and t.user_attrs.get("kind") == KIND_ANSWER
                and t.user_attrs.get("policy_key") == policy_key
                and (digest is None or t.user_attrs.get("answer_digest") == digest)):
            _set_current(study, t.number, source.number)
            return AnswerTrial(t.number, source.number, False)
    user_attrs: dict[str, Any] = {"kind": KIND_ANSWER, "answer_of": source.number, "answer_stage": stage}
    if digest is not None:
        user_attrs["answer_digest"] = digest
    user_attrs.update({k: v for k, v in source.user_attrs.items() if k not in ("kind", "tag", "uniform_method")})
    user_attrs.update(attrs or {})
    study.enqueue_trial(dict(source.params), user_attrs=user_attrs)
    trial = study.ask(fixed_distributions=dict(source.distributions))
    try:
        files = artifacts(trial.number) if callable(artifacts) else artifacts
        if files:
            if artifact_dir is None:
                raise ValueError("artifact_dir is needed to upload artifacts")
            Path(artifact_dir).mkdir(parents=True, exist_ok=True)
            store = FileSystemArtifactStore(str(artifact_dir))
            for path in files:
                upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
        study.tell(trial, list(source.values))
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    _set_current(study, trial.number, source.number)
    log.info("answer published as trial %d of study %s (a copy of evaluation %d, stage %s)",
             trial.number, study_name, source.number, stage)
    return AnswerTrial(trial.number, source.number, True)


def _set_current(study: optuna.Study, number: int, source: int) -> None:
    text = f"trial #{number} (kind answer): a copy of evaluation #{source} with the artifacts"
    if study.user_attrs.get("answer") != text:
        study.set_user_attr("answer", text)
    if study.user_attrs.get("answer_trial") != number:
        study.set_user_attr("answer_trial", number)
    if study.user_attrs.get("answer_of") != source:
        study.set_user_attr("answer_of", source)


def objective_names(objective: Mapping[str, Any]) -> list[str]:
    """Readable names for the objective values (the dashboard's axis labels)."""
    terms = list(objective.get("values", ()))
    names = []
    for i, t in enumerate(terms):
        items = list(t.items()) if isinstance(t, Mapping) else [tuple(x) for x in t]
        if len(items) == 1 and abs(float(items[0][1])) == 1.0:
            names.append(items[0][0] if float(items[0][1]) > 0 else f"-{items[0][0]}")
        else:
            names.append(objective.get("name", "objective") if len(terms) == 1 else f"{objective.get('name')}[{i}]")
    return names


def _results(study: optuna.Study, objective: Any) -> dict[str, EvalResult]:
    out: dict[str, EvalResult] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        key = t.user_attrs.get("policy_key")
        raw = t.user_attrs.get("result")
        if not key or not isinstance(raw, dict) or t.user_attrs.get("kind") == KIND_ANSWER:  # copies
            continue
        stored = EvalResult.from_dict(raw)
        if stored.error is not None and t.state == TrialState.FAIL:
            out[key] = EvalResult.failed(len(objective.directions), stored.error)
        else:
            out[key] = EvalResult(values=objective.compute(stored.metrics), metrics=stored.metrics,
                                  sites=stored.sites, images=stored.images)
    return out


def _num(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _jsonable(d: object) -> object:
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return _num(d)

"""Optuna study recording: every evaluated policy is one trial, whatever the strategy.

params = site choices (categorical over the site's allowed choices), values = objective value(s),
user attrs = metrics, per-site SQNR and the policy key. The study carries the run's fingerprint;
on resume its completed trials are read back with their values recomputed from the stored
metrics, and other studies in the same storage with an equal fingerprint lend theirs too (a run
that changes only the objective re-evaluates nothing).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from policysearch.errors import ConfigError
from policysearch.policy import Policy
from policysearch.result import EvalResult

__all__ = ["StudyRecorder", "default_storage", "open_storage", "redact_url"]

log = logging.getLogger(__name__)


def default_storage(results_dir: str | Path = "results") -> str:
    """``sqlite:///<results_dir>/studies.db`` (the folder is created by the run)."""
    return f"sqlite:///{Path(results_dir) / 'studies.db'}"


def redact_url(url: str) -> str:
    """The URL without its password (for messages and records)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a malformed URL is reported elsewhere
        return url if len(url) <= 80 else url[:77] + "..."


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for ``url``; a malformed, unreachable or driverless URL is one line."""
    import sqlalchemy.exc as sa_exc

    shown = redact_url(url)
    if url.startswith("sqlite:///"):
        target = url[len("sqlite:///"):].split("?", 1)[0]
        if target and not target.startswith("file:") and target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except ImportError as exc:
        raise ConfigError(f"--storage {shown}: the database driver is not installed ({exc}); "
                          "for PostgreSQL: pip install psycopg2-binary") from None
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


def _write_error(storage: str, exc: BaseException) -> ConfigError:
    return ConfigError(f"--storage {redact_url(storage)}: cannot write the study ({_first_line(exc)}); "
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
    ) -> None:
        import sqlalchemy.exc as sa_exc

        from policysearch.run import diff_fingerprints, refusal

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage_url = storage
        self.storage = open_storage(storage)
        self.study_name = study_name
        try:
            self.study = optuna.create_study(
                storage=self.storage, study_name=study_name, directions=list(directions), load_if_exists=True
            )
            attrs_now = self.study.user_attrs
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
            old_obj = attrs_now.get("objective_spec")
            if old_obj is not None and old_obj != dict(objective):
                raise ConfigError(
                    f"run {study_name!r} was searched with objective {old_obj.get('name')!r}, not "
                    f"{objective.get('name')!r}; choose a new --run-name: a new run reuses this run's "
                    "evaluations and recomputes them under the new objective"
                )
            self.study.set_user_attr("objective_spec", dict(objective))
            self.study.set_user_attr("fingerprint", dict(fingerprint))
            for key, value in (attrs or {}).items():
                self.study.set_user_attr(key, value)
        except (sa_exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            raise _write_error(storage, exc.__cause__ or exc) from None
        self.fingerprint = dict(fingerprint)
        self.distributions: dict[str, CategoricalDistribution] = {}
        self.n_values = len(directions)

    def set_data_digest(self, digest: str) -> None:
        """Complete the fingerprint once the data is loaded (refusing a changed selection)."""
        from policysearch.run import refusal

        old = self.study.user_attrs.get("fingerprint", {}).get("data_digest")
        if old is not None and old != digest:
            raise refusal(self.study_name, {"data_digest": old}, {"data_digest": digest}, ["data_digest"])
        self.fingerprint["data_digest"] = digest
        self.study.set_user_attr("fingerprint", self.fingerprint)
        from policysearch.run import fingerprint_digest

        self.study.set_user_attr("fingerprint_digest", fingerprint_digest(self.fingerprint))

    def set_choices(self, choices: Mapping[str, Sequence[str]]) -> None:
        self.distributions = {
            name: CategoricalDistribution(list(dict.fromkeys(c))) for name, c in choices.items()
        }

    def completed(self, objective: Any) -> dict[str, EvalResult]:
        """Results already in the study, by policy key, values recomputed under ``objective``."""
        return _results(self.study, objective)

    def reusable(self, objective: Any) -> tuple[dict[str, EvalResult], list[str]]:
        """Results of other studies in this storage made by the same work (equal fingerprint)."""
        from policysearch.run import fingerprint_digest

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

    def record(self, policy: Policy, result: EvalResult, *, tag: str = "", reused_from: str | None = None) -> None:
        params, dists = {}, {}
        for site, choice in policy.items():
            value = str(choice)
            dist = self.distributions.get(site.name)
            if dist is None or value not in dist.choices:
                dist = CategoricalDistribution(list((dist.choices if dist else ()) + (value,)))
            params[site.name], dists[site.name] = value, dist
        attrs = {
            "policy_key": policy.key(),
            "result": _jsonable(result.to_dict()),
            "tag": tag,
            **{f"m.{k}": _num(v) for k, v in result.metrics.items()},
        }
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
        self.study.add_trial(trial)


def _results(study: optuna.Study, objective: Any) -> dict[str, EvalResult]:
    out: dict[str, EvalResult] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        key = t.user_attrs.get("policy_key")
        raw = t.user_attrs.get("result")
        if not key or not isinstance(raw, dict):
            continue
        stored = EvalResult.from_dict(raw)
        if stored.error is not None and t.state == TrialState.FAIL:
            out[key] = EvalResult.failed(len(objective.directions), stored.error)
        else:
            out[key] = EvalResult(values=objective.compute(stored.metrics), metrics=stored.metrics,
                                  sites=stored.sites)
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

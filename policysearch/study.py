"""Optuna study recording: every evaluated policy is one trial, whatever the strategy.

params = site choices (categorical over the site's allowed choices), values = objective value(s),
user attrs = metrics, per-site SQNR and the policy key. Completed trials are read back on resume,
so a run started again with the same name re-evaluates nothing it already has.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from policysearch.policy import Policy
from policysearch.result import EvalResult

__all__ = ["StudyRecorder", "default_storage"]

log = logging.getLogger(__name__)


def default_storage(results_dir: str | Path = "results") -> str:
    path = Path(results_dir)
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'studies.db'}"


class StudyRecorder:
    """One Optuna study per run in any RDB storage (SQLite by default)."""

    def __init__(
        self,
        *,
        storage: str,
        study_name: str,
        directions: Sequence[str],
        choices: Mapping[str, Sequence[str]],
        attrs: Mapping[str, object] | None = None,
    ) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(
            storage=storage, study_name=study_name, directions=list(directions), load_if_exists=True
        )
        if list(self.study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
            raise ValueError(
                f"study {study_name!r} in {storage} was created with other directions; "
                "choose another --run-name or the same objective"
            )
        self.distributions = {
            name: CategoricalDistribution(list(dict.fromkeys(c))) for name, c in choices.items()
        }
        for key, value in (attrs or {}).items():
            self.study.set_user_attr(key, value)
        self.n_values = len(directions)

    def completed(self) -> dict[str, EvalResult]:
        """Results already in the study, by policy key (finished and failed trials)."""
        out: dict[str, EvalResult] = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
            key = t.user_attrs.get("policy_key")
            raw = t.user_attrs.get("result")
            if key and isinstance(raw, dict):
                out[key] = EvalResult.from_dict(raw)
        return out

    def record(self, policy: Policy, result: EvalResult, *, tag: str = "") -> int:
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
        if result.ok:
            trial = optuna.trial.create_trial(
                params=params, distributions=dists, values=list(result.values), user_attrs=attrs
            )
        else:
            trial = optuna.trial.create_trial(
                params=params, distributions=dists, state=TrialState.FAIL, user_attrs={**attrs, "error": result.error}
            )
        self.study.add_trial(trial)
        return len(self.study.get_trials(deepcopy=False)) - 1


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

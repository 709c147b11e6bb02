"""Optuna-driven strategies over the joint policy: ``tpe``, ``nsga2``, ``random``.

Each keeps an in-memory Optuna study (one categorical parameter per site, values like ``ivit`` or
``ivit@6``). The sampler is re-seeded from ``seed`` and the number of trials before every
``study.ask()``, so sampling depends only on the history: replaying the told results into a fresh
strategy (``load_state_dict``) continues exactly like the original. A proposal that repeats an
evaluated policy is told its known result at once and counts against the budget.
"""
from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from policysearch.policy import Choice, Policy
from policysearch.result import EvalResult
from policysearch.strategies.base import Strategy
from policysearch.strategies.simple import SQNRDiff

__all__ = ["NSGA2", "RandomSearch", "TPE"]

log = logging.getLogger(__name__)

_MAX_DUPLICATE_RETRIES = 20


class _OptunaStrategy(Strategy):
    def __init__(self, space: Any, *, trials: int = 20, **kw: Any) -> None:
        super().__init__(space, **kw)
        if trials < 1:
            raise ValueError(f"trials must be positive, got {trials}")
        self.trials = min(trials, space.size())
        self.proposed = 0  # sampler proposals, duplicates included (the budget)
        self.distributions = {s.name: CategoricalDistribution([str(c) for c in space.choices(s.name)])
                              for s in space.sites}
        self.study = optuna.create_study(directions=list(self.directions), sampler=self._sampler(0))
        self._trial_of: dict[str, int] = {}
        self._replaying = False

    def _sampler(self, salt: int) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def _policy(self, params: dict[str, str]) -> Policy:
        return self.space.policy([Choice.parse(params[s.name]) for s in self.space.sites])

    def _record(self, policy: Policy, result: EvalResult) -> None:
        params = {s.name: str(c) for s, c in policy.items()}
        if any(v not in self.distributions[k].choices for k, v in params.items()):
            return  # told a policy outside the space (a replayed trial): keep it out of the sampler
        number = self._trial_of.pop(policy.key(), None)
        values = list(result.values) if result.ok else None
        state = TrialState.COMPLETE if result.ok else TrialState.FAIL
        if number is not None:
            self.study.tell(number, values, state=state)
        else:
            self.study.add_trial(optuna.trial.create_trial(
                params=params, distributions=self.distributions, values=values, state=state))

    def _told(self, policy: Policy, result: EvalResult) -> None:
        if not self._replaying:
            self._record(policy, result)

    def _propose(self) -> Policy | None:
        for _ in range(_MAX_DUPLICATE_RETRIES):
            if self.proposed >= self.trials:
                return None
            self.study.sampler = self._sampler(len(self.study.trials))
            trial = self.study.ask(self.distributions)
            self.proposed += 1
            policy = self._policy(trial.params)
            known = self.results.get(policy.key())
            if known is None and policy.key() not in self.pending:
                self._trial_of[policy.key()] = trial.number
                return policy
            if known is not None:
                r = known[1]
                self.study.tell(trial.number, list(r.values) if r.ok else None,
                                state=TrialState.COMPLETE if r.ok else TrialState.FAIL)
            else:
                self.study.tell(trial.number, state=TrialState.FAIL)
        return None

    def _next(self, n: int) -> list[Policy]:
        out = []
        while len(out) < n:
            p = self._propose()
            if p is None:
                break
            out.append(p)
        return out

    def _has_more(self) -> bool:
        return self.proposed < self.trials

    def state_dict(self) -> dict[str, Any]:
        """Told history plus the whole finished Optuna history (duplicates and the samplers'
        system attributes included), so the rebuilt study is identical."""
        trials = [{"params": t.params, "values": t.values, "state": t.state.name,
                   "system_attrs": t.system_attrs}
                  for t in self.study.get_trials(deepcopy=False)
                  if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
        storage = self.study._storage
        study_attrs = storage.get_study_system_attrs(self.study._study_id)
        return {**super().state_dict(), "proposed": self.proposed, "trials": trials,
                "study_system_attrs": study_attrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._replaying = True
        try:
            super().load_state_dict(state)
        finally:
            self._replaying = False
        for t in state.get("trials", []):
            self.study.add_trial(optuna.trial.create_trial(
                params=t["params"], distributions={k: self.distributions[k] for k in t["params"]},
                values=t["values"], state=TrialState[t["state"]], system_attrs=t["system_attrs"]))
        for key, value in state.get("study_system_attrs", {}).items():
            self.study._storage.set_study_system_attr(self.study._study_id, key, value)
        self.proposed = state.get("proposed", self.proposed)

    def pareto(self) -> list[tuple[Policy, EvalResult]]:
        """Non-dominated successful results (all objective values)."""
        ok = [self.results[k] for k in self.order if self.results[k][1].ok]
        signs = [(-1.0 if d == "maximize" else 1.0) for d in self.directions]

        def dominated(a: EvalResult, b: EvalResult) -> bool:
            av = [s * v for s, v in zip(signs, a.values)]
            bv = [s * v for s, v in zip(signs, b.values)]
            return all(y <= x for x, y in zip(av, bv)) and any(y < x for x, y in zip(av, bv))

        return [(p, r) for p, r in ok if not any(dominated(r, q) for _, q in ok if q is not r)]


class TPE(_OptunaStrategy):
    """Optuna TPE, warm-started with the sqnr_diff procedure (its uniform and mixed evaluations)."""

    def __init__(self, space: Any, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.warm = SQNRDiff(space, directions=self.directions, seed=self.seed)

    def _sampler(self, salt: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=self.seed + salt, n_startup_trials=5)

    def _next(self, n: int) -> list[Policy]:
        if not self.warm.finished:
            return self.warm.ask(n)
        return super()._next(n)

    def _told(self, policy: Policy, result: EvalResult) -> None:
        if policy.key() in self.warm.pending or not self.warm.finished:
            self.warm.tell(policy, result)
        super()._told(policy, result)

    def _has_more(self) -> bool:
        return not self.warm.finished or super()._has_more()


class NSGA2(_OptunaStrategy):
    """Optuna NSGA-II over one or several objectives; ``best()`` is the best by the first value."""

    def __init__(self, space: Any, *, population_size: int = 8, **kw: Any) -> None:
        self.population_size = population_size
        super().__init__(space, **kw)

    def _sampler(self, salt: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIISampler(seed=self.seed + salt, population_size=self.population_size)


class RandomSearch(_OptunaStrategy):
    """Uniformly random policies from the space, de-duplicated."""

    def _sampler(self, salt: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=self.seed + salt)


"""Optuna-driven strategies over the joint policy: ``tpe``, ``nsga2``, ``random``.

Each keeps an in-memory Optuna study with one categorical parameter per site (values are choice
strings such as ``ivit`` or ``ivit@6``), driven by ``study.ask()`` / ``study.tell()``; every told
result in the space is a trial (results told without being asked are added with
``study.add_trial``). Optuna's INFO logging is silenced around these calls only.

Budget: ``trials`` counts the *new* policies the sampler hands to the driver. A proposal that
repeats an evaluated policy is told its known result in the study at once (the sampler learns
from it) and does not count; one that repeats a pending policy is told as failed. After
``max_duplicates`` repeats in a row with nothing pending, or once every policy of the space has
been asked, the search ends early (logged).

Batches: ``ask(n)`` proposes up to ``n`` policies at once (a runner's ``capacity``), each a RUNNING
trial until told; TPE uses a constant liar for them (``TPESampler(constant_liar=True)``), so a
batch depends only on the seed, the history and ``n``, never on the order results come back.

Determinism and exact resume: the sampler is rebuilt before every ``study.ask()`` with a seed
derived from ``seed`` and the number of trials in the study, so a proposal depends only on the
study's history. ``state_dict`` stores that history (params, values, state and system
attributes of every trial, pending ones as RUNNING, and the study's system attributes), the
trial number of each pending policy and the budget counters; ``load_state_dict`` rebuilds the
study trial by trial.
"""
from __future__ import annotations

import contextlib
import logging
import random
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from policysearch.policy import Choice, Policy
from policysearch.result import EvalResult
from policysearch.spaces.space import SearchSpace
from policysearch.strategies.base import Strategy, decode_policy, encode_policy, register
from policysearch.strategies.sqnr import SQNRDiff

__all__ = ["NSGA2", "NSGA2Options", "OptunaOptions", "OptunaStrategy", "RandomSearch", "TPE", "TPEOptions"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna logs at WARNING inside the block; the previous verbosity is restored after."""
    old = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(old, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(old)


def _derived_seed(seed: int, n: int) -> int:
    return random.Random(f"policysearch/{seed}/{n}").getrandbits(31)


@dataclass(frozen=True, kw_only=True)
class OptunaOptions:
    """``trials``: new policies to ask (the budget); ``max_duplicates``: repeated proposals in a
    row that end the search."""

    trials: int = 20
    max_duplicates: int = 50

    def __post_init__(self) -> None:
        if self.trials < 1 or self.max_duplicates < 1:
            raise ValueError(f"trials and max_duplicates must be >= 1, got {self.trials}, {self.max_duplicates}")


class OptunaStrategy(Strategy):
    """Base of the Optuna strategies; subclasses give the sampler."""

    Options = OptunaOptions

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.distributions = {s.name: CategoricalDistribution([str(c) for c in opts])
                              for s, opts in zip(space.sites, space.options)}
        with quiet_optuna():
            self.study = optuna.create_study(directions=list(self.directions), sampler=self._sampler(self.seed))
        self.asked = 0  # new policies proposed by the sampler (the budget)
        self.stalled = False  # too many repeated proposals in a row: finished
        self._trial_of: dict[str, int] = {}  # pending proposal -> its RUNNING trial number
        self._in_space: set[str] = set()  # told keys that lie in the space

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    # -- study bookkeeping -------------------------------------------------------------------------
    def _params(self, policy: Policy) -> dict[str, str]:
        return {s.name: str(c) for s, c in policy.items()}

    def _told(self, policy: Policy, result: EvalResult) -> None:
        if not self.space.contains(policy):
            return  # a replayed trial from outside the space: recorded by the base, not sampled from
        self._in_space.add(policy.key())
        if not self._loading:
            self._record(policy, result)

    def _record(self, policy: Policy, result: EvalResult) -> None:
        values = list(result.values) if result.ok else None
        state = TrialState.COMPLETE if result.ok else TrialState.FAIL
        number = self._trial_of.pop(policy.key(), None)
        with quiet_optuna():
            if number is not None:
                self.study.tell(number, values, state=state)
            else:
                self.study.add_trial(optuna.trial.create_trial(
                    params=self._params(policy), distributions=self.distributions, values=values, state=state))

    # -- proposing ---------------------------------------------------------------------------------
    def _exhausted(self, batch: int = 0) -> bool:
        """Every policy of the space is told or pending (``batch``: proposed in this call)."""
        return len(self._in_space | set(self.pending)) + batch >= self.space.size()

    def _propose(self, n: int) -> list[Policy]:
        out: dict[str, Policy] = {}
        repeats = 0
        while len(out) < n and self.asked < self.options.trials and not self._exhausted(len(out)):
            if repeats >= self.options.max_duplicates:
                if not self.pending and not out:
                    log.info("%s: %d repeated proposals in a row; stopping after %d new policies",
                             self.name, repeats, self.asked)
                    self.stalled = True
                break
            policy, number = self._ask_study()
            key = policy.key()
            known = self.result_of(policy)
            if known is None and key not in self.pending and key not in out:
                self._trial_of[key] = number
                self.asked += 1
                out[key] = policy
                continue
            repeats += 1  # an evaluated policy: its known result; a pending one: failed
            with quiet_optuna():
                if known is not None and known.ok:
                    self.study.tell(number, list(known.values))
                else:
                    self.study.tell(number, state=TrialState.FAIL)
        return list(out.values())

    def _ask_study(self) -> tuple[Policy, int]:
        with quiet_optuna():
            self.study.sampler = self._sampler(_derived_seed(self.seed, len(self.study.get_trials(deepcopy=False))))
            trial = self.study.ask(self.distributions)
        return self.space.policy([Choice.parse(trial.params[s.name]) for s in self.space.sites]), trial.number

    def _next(self, n: int) -> list[Policy]:
        return self._propose(n)

    def _has_more(self) -> bool:
        return not self.stalled and self.asked < self.options.trials and not self._exhausted()

    # -- state -------------------------------------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        trials = [{"params": t.params, "values": t.values, "state": t.state.name, "system_attrs": t.system_attrs}
                  for t in self.study.get_trials(deepcopy=False)]
        return {"asked": self.asked, "stalled": self.stalled,
                "trial_of": [[encode_policy(self.space, self.pending.get(k) or self._pending_policy(k)), n]
                             for k, n in self._trial_of.items()],
                "trials": trials,
                "study_system_attrs": self.study._storage.get_study_system_attrs(self.study._study_id)}

    def _pending_policy(self, key: str) -> Policy:
        return next(p for p in self._redo if p.key() == key)

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        with quiet_optuna():
            for t in state["trials"]:
                self.study.add_trial(optuna.trial.create_trial(
                    params=t["params"], distributions={k: self.distributions[k] for k in t["params"]},
                    values=t["values"], state=TrialState[t["state"]], system_attrs=t["system_attrs"]))
            for key, value in state["study_system_attrs"].items():
                self.study._storage.set_study_system_attr(self.study._study_id, key, value)
        self._trial_of = {decode_policy(self.space, p).key(): int(n) for p, n in state["trial_of"]}
        self.asked = int(state["asked"])
        self.stalled = bool(state["stalled"])


@dataclass(frozen=True, kw_only=True)
class TPEOptions(OptunaOptions):
    """``n_startup_trials``: complete trials (warm start included) before TPE models the history."""

    n_startup_trials: int = 5


@register
class TPE(OptunaStrategy):
    """Optuna TPE over the joint policy, warm-started with the sqnr_diff procedure.

    It first runs ``sqnr_diff`` (an internal :class:`SQNRDiff`: the uniform policies, then the
    mixed one), whose evaluations become trials of the TPE study, then samples ``trials`` new
    policies.
    """

    name = "tpe"
    Options = TPEOptions

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.warm = SQNRDiff(space, directions=self.directions, seed=self.seed)

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        # constant liar: while policies of a batch are pending (RUNNING trials), TPE counts them as
        # bad results, so one ask(n) spreads its n proposals instead of repeating the same region
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # experimental in Optuna 4
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.options.n_startup_trials,
                                              constant_liar=True)

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


@dataclass(frozen=True, kw_only=True)
class NSGA2Options(OptunaOptions):
    """``population_size``: NSGA-II's generation size (>= 2)."""

    population_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {self.population_size}")


@register
class NSGA2(OptunaStrategy):
    """Optuna NSGA-II over one or several objectives. ``best()`` is the lexicographic best
    (first objective first, so it lies on the front); ``pareto()`` gives the whole front."""

    name = "nsga2"
    Options = NSGA2Options

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=self.options.population_size)


@register
class RandomSearch(OptunaStrategy):
    """Uniformly random policies of the space (Optuna's RandomSampler), de-duplicated."""

    name = "random"

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=seed)

"""Strategy base class: Optuna-like ``ask``/``tell`` over policies of a :class:`SearchSpace`.

A strategy never touches the model or the data. Its state is the list of told results (plus a
few counters); ``load_state_dict`` replays that history into a fresh strategy, so a resumed search
asks exactly what an uninterrupted one would. A failed result (``EvalResult.error``) ranks below
every successful one and never raises.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

from policysearch.policy import Choice, Policy
from policysearch.result import EvalResult
from policysearch.spaces.space import SearchSpace

__all__ = ["Strategy", "better", "score"]


def score(result: EvalResult, direction: str) -> float:
    """A value to *minimise*: failed or NaN results are +inf."""
    if not result.ok or not math.isfinite(result.values[0]):
        return math.inf
    return -result.values[0] if direction == "maximize" else result.values[0]


def better(a: EvalResult, b: EvalResult | None, direction: str) -> bool:
    return b is None or score(a, direction) < score(b, direction)


class Strategy(abc.ABC):
    """Base class. Subclasses implement :meth:`_next` (policies to ask now) and may extend tell."""

    def __init__(self, space: SearchSpace, *, directions: Sequence[str] = ("maximize",), seed: int = 0,
                 **options: Any) -> None:
        if options:
            raise TypeError(f"{type(self).__name__} got unknown option(s): {', '.join(options)}")
        self.space = space
        self.directions = tuple(directions)
        self.seed = seed
        self.results: dict[str, tuple[Policy, EvalResult]] = {}  # told, by policy key
        self.order: list[str] = []  # told keys in order
        self.pending: dict[str, Policy] = {}

    # -- contract --------------------------------------------------------------------------------
    def ask(self, n: int = 1) -> list[Policy]:
        out: list[Policy] = []
        for p in self._next(n):
            k = p.key()
            if k in self.pending or k in self.results or any(q.key() == k for q in out):
                continue
            out.append(p)
            if len(out) >= n:
                break
        for p in out:
            self.pending[p.key()] = p
        return out

    def tell(self, policy: Policy, result: EvalResult) -> None:
        k = policy.key()
        self.pending.pop(k, None)
        if k not in self.results:
            self.order.append(k)
        self.results[k] = (policy, result)
        self._told(policy, result)

    @property
    def finished(self) -> bool:
        return not self.pending and not self._has_more()

    def best(self) -> tuple[Policy, EvalResult] | None:
        """The best successful evaluation by the first objective value."""
        best: tuple[Policy, EvalResult] | None = None
        for k in self.order:
            p, r = self.results[k]
            if r.ok and (best is None or better(r, best[1], self.directions[0])):
                best = (p, r)
        return best

    def state_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "seed": self.seed,
                "told": [[_policy_json(self.results[k][0]), self.results[k][1].to_dict()] for k in self.order]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p, r in state["told"]:
            self.tell(_policy_from(self.space, p), EvalResult.from_dict(r))

    # -- hooks -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def _next(self, n: int) -> list[Policy]:
        """Candidate policies to ask now (duplicates and pending ones are filtered out)."""

    @abc.abstractmethod
    def _has_more(self) -> bool:
        """Whether anything remains to be asked (now or after pending results)."""

    def _told(self, policy: Policy, result: EvalResult) -> None:  # noqa: B027 - optional hook
        pass

    def result_of(self, policy: Policy) -> EvalResult | None:
        hit = self.results.get(policy.key())
        return hit[1] if hit else None


def _policy_json(p: Policy) -> list[str]:
    return [str(c) for c in p.choices]


def _policy_from(space: SearchSpace, choices: list[str]) -> Policy:
    return space.policy([Choice.parse(c) for c in choices])

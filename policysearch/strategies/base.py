"""Strategy base class: Optuna-like ``ask``/``tell`` over the policies of a :class:`SearchSpace`.

A strategy never touches the model or the data: it sees policies and :class:`EvalResult`s only.

* ``ask(n)`` returns up to ``n`` new policies, fewer when it must wait for results, ``[]`` when
  finished (or waiting: check ``finished``). A policy is never asked twice while pending, nor
  once told.
* ``tell(policy, result)`` accepts any policy, asked or not (the driver replays cached trials on
  resume); a second result for a policy already told is ignored. A failed result (``error`` set,
  or the wrong number of values) ranks below every successful one and never raises.
* ``best()``: the best successful result in the space, lexicographically by the objectives in
  ``directions`` (so with several objectives the pick lies on the Pareto front); ``pareto()``:
  the non-dominated successful results. Subclasses may document another pick.
* ``state_dict()`` is JSON-serialisable (non-finite floats become strings); ``load_state_dict``
  on a fresh strategy built with the same name, space, directions, seed and options replays the
  told history and re-asks the policies that were pending first, then continues exactly as the
  original would.
"""
from __future__ import annotations

import abc
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

from policysearch.errors import ConfigError
from policysearch.identity import rank_key
from policysearch.policy import Choice, Policy
from policysearch.registry import Registry
from policysearch.result import EvalResult, SiteMetrics
from policysearch.spaces.space import SearchSpace

__all__ = [
    "DIRECTIONS",
    "STATE_FORMAT",
    "STRATEGIES",
    "NoOptions",
    "Strategy",
    "decode_policy",
    "decode_result",
    "dominates",
    "encode_policy",
    "encode_result",
    "rank_key",
    "register",
]

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
STATE_FORMAT = "policysearch.strategy/v1"

#: name -> Strategy subclass; filled by :func:`register` when the strategy modules are imported.
STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: register ``cls`` under its ``name``."""
    STRATEGIES.register(cls.name, cls)
    return cls


# -- ranking ------------------------------------------------------------------------------------
def dominates(a: EvalResult, b: EvalResult, directions: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one."""
    ka, kb = rank_key(a, directions), rank_key(b, directions)
    return all(x <= y for x, y in zip(ka, kb)) and ka != kb


# -- JSON encoding --------------------------------------------------------------------------------
def encode_policy(space: SearchSpace, policy: Policy) -> list[str] | dict[str, Any]:
    """Choice strings for a policy over the space's sites and bits, else the full policy dict."""
    if policy.sites == space.sites and (policy.weight_bits, policy.act_bits) == (space.weight_bits, space.act_bits):
        return [str(c) for c in policy.choices]
    return policy.to_dict()


def decode_policy(space: SearchSpace, data: list[str] | Mapping[str, Any]) -> Policy:
    if isinstance(data, Mapping):
        return Policy.from_dict(data)
    return space.policy([Choice.parse(c) for c in data])


def _f(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def encode_result(result: EvalResult) -> dict[str, Any]:
    """``EvalResult.to_dict`` with non-finite floats as strings ('nan', 'inf'): strict JSON."""
    return {"values": [_f(v) for v in result.values],
            "metrics": {k: _f(float(v)) for k, v in result.metrics.items()},
            "sites": {k: [_f(m.gamma), _f(m.beta)] for k, m in result.sites.items()},
            "error": result.error}


def decode_result(data: Mapping[str, Any]) -> EvalResult:
    return EvalResult(values=tuple(float(v) for v in data["values"]),
                      metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
                      sites={k: SiteMetrics(gamma=float(g), beta=float(b)) for k, (g, b) in data.get("sites", {}).items()},
                      error=data.get("error"))


# -- options --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class NoOptions:
    """Options of a strategy that takes none."""


def _make_options(cls: type[Any], options: Mapping[str, Any], owner: str) -> Any:
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"strategy {owner!r}: unknown option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(valid) or '(none)'}")
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {owner!r}: {exc}") from None


# -- the base class -------------------------------------------------------------------------------
class Strategy(abc.ABC):
    """Base class. Subclasses implement :meth:`_next` and :meth:`_has_more`; they may hook tells
    (:meth:`_told`) and extend the state (:meth:`_extra_state` / :meth:`_load_extra`)."""

    #: The registered name.
    name: ClassVar[str] = ""
    #: Keyword-only dataclass of the strategy's options (``self.options``).
    Options: ClassVar[type[Any]] = NoOptions

    def __init__(self, space: SearchSpace, *, directions: Sequence[str] = ("maximize",), seed: int = 0,
                 **options: Any) -> None:
        self.options = _make_options(self.Options, options, self.name or type(self).__name__)
        directions = (directions,) if isinstance(directions, str) else tuple(directions)
        if not directions or any(d not in DIRECTIONS for d in directions):
            raise ConfigError(f"directions must be a non-empty list of {' / '.join(DIRECTIONS)}, got {directions!r}")
        self.space = space
        self.directions: tuple[str, ...] = directions
        self.seed = int(seed)
        self.results: dict[str, tuple[Policy, EvalResult]] = {}  # told, by policy key, in tell order
        self.pending: dict[str, Policy] = {}  # asked and not told, in ask order
        self._redo: list[Policy] = []  # pending when the state was saved: asked again first
        self._loading = False

    # -- contract --------------------------------------------------------------------------------
    def ask(self, n: int = 1) -> list[Policy]:
        """Up to ``n`` new policies; ``[]`` when finished or waiting for pending results."""
        if n < 1:
            raise ValueError(f"ask(n) needs n >= 1, got {n}")
        out: list[Policy] = []
        while self._redo and len(out) < n:
            self._take(self._redo.pop(0), out)
        if len(out) < n:
            for p in self._next(n - len(out)):
                self._take(p, out)
                if len(out) >= n:
                    break
        return out

    def _take(self, policy: Policy, out: list[Policy]) -> None:
        k = policy.key()
        if k not in self.pending and k not in self.results:
            self.pending[k] = policy
            out.append(policy)

    def tell(self, policy: Policy, result: EvalResult) -> None:
        """Record the result of ``policy`` (asked or not); a repeated tell is ignored."""
        k = policy.key()
        self.pending.pop(k, None)
        self._redo = [p for p in self._redo if p.key() != k]
        if k in self.results:
            log.debug("%s: %s already told; ignoring the repeated result", self.name, k)
            return
        if result.ok and len(result.values) != len(self.directions):
            result = replace(result, error=f"{len(result.values)} objective value(s) for "
                                           f"{len(self.directions)} direction(s)")
        self.results[k] = (policy, result)
        self._told(policy, result)

    @property
    def finished(self) -> bool:
        """Nothing pending and nothing left to ask."""
        return not self.pending and not self._redo and not self._has_more()

    def best(self) -> tuple[Policy, EvalResult] | None:
        """The best successful result in the space (lexicographic by objective); ties: first told."""
        ok = self._successes()
        return min(ok, key=lambda pr: rank_key(pr[1], self.directions)) if ok else None

    def pareto(self) -> list[tuple[Policy, EvalResult]]:
        """The non-dominated successful results in the space, in tell order."""
        ok = self._successes()
        return [(p, r) for p, r in ok if not any(dominates(q, r, self.directions) for _, q in ok)]

    def result_of(self, policy: Policy) -> EvalResult | None:
        hit = self.results.get(policy.key())
        return hit[1] if hit else None

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: told history, pending policies, plus the subclass's extras."""
        return {"format": STATE_FORMAT, "strategy": self.name, "seed": self.seed,
                "directions": list(self.directions),
                "told": [[encode_policy(self.space, p), encode_result(r)] for p, r in self.results.values()],
                "pending": [encode_policy(self.space, p) for p in [*self._redo, *self.pending.values()]],
                **self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` into this fresh strategy."""
        if self.results or self.pending:
            raise ValueError("load_state_dict needs a fresh strategy (nothing asked or told yet)")
        if state.get("format") != STATE_FORMAT or state.get("strategy") != self.name:
            raise ConfigError(f"state is not a {self.name!r} strategy state ({STATE_FORMAT}): "
                              f"got {state.get('strategy')!r} / {state.get('format')!r}")
        if state.get("seed") != self.seed or tuple(state.get("directions", ())) != self.directions:
            raise ConfigError(f"state was saved with seed {state.get('seed')} and directions "
                              f"{state.get('directions')}; this strategy has {self.seed} and {list(self.directions)}")
        self._loading = True
        try:
            for p, r in state["told"]:
                self.tell(decode_policy(self.space, p), decode_result(r))
        finally:
            self._loading = False
        self._redo = [decode_policy(self.space, p) for p in state.get("pending", [])]
        self._load_extra(state)

    # -- hooks -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def _next(self, n: int) -> list[Policy]:
        """Candidates to ask now, in order (pending and told ones are filtered out by ``ask``)."""

    @abc.abstractmethod
    def _has_more(self) -> bool:
        """Whether anything remains to be asked, now or once the pending results are told."""

    def _told(self, policy: Policy, result: EvalResult) -> None:  # noqa: B027 - optional hook
        """Called once per new result (also while ``load_state_dict`` replays, ``_loading``)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    # -- helpers ---------------------------------------------------------------------------------
    def _successes(self) -> list[tuple[Policy, EvalResult]]:
        return [(p, r) for p, r in self.results.values() if r.ok and self.space.contains(p)]

    def _told_key(self, policy: Policy) -> bool:
        return policy.key() in self.results

    def _best_of(self, policies: Sequence[Policy]) -> Policy | None:
        """The best told policy among ``policies`` (first objective first); ``None`` if none told."""
        told = [self.results[p.key()] for p in policies if p.key() in self.results]
        return min(told, key=lambda pr: rank_key(pr[1], self.directions))[0] if told else None

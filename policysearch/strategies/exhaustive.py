"""``exhaustive``: per-site independent search around a base policy.

1. The base: the ``base`` option, else the best uniform policy (so the uniform policies are
   evaluated first).
2. Every single-site change of the base (each other choice at each site), asked site by site in
   forward order with one site's changes together: the evaluator reuses the base run's
   activations up to the first changed site.
3. Each site keeps the choice whose single-site change beat the base by the objective (first
   objective first; ties keep the base), and the combined policy is evaluated.

``best()`` is the best of everything evaluated.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policysearch.errors import ConfigError
from policysearch.identity import rank_key
from policysearch.policy import Choice, Policy, PolicyError
from policysearch.spaces.space import SearchSpace
from policysearch.strategies.base import Strategy, register

__all__ = ["Exhaustive", "ExhaustiveOptions"]

BaseSpec = Policy | str | Sequence[str] | Mapping[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class ExhaustiveOptions:
    """``base``: a Policy, a method name (its uniform policy), a list of choice strings (one per
    site), a policy dict (``Policy.to_dict``), or ``None`` for the best uniform policy."""

    base: BaseSpec = None


@register
class Exhaustive(Strategy):
    """Per-site independent search from a base policy; see the module docstring."""

    name = "exhaustive"
    Options = ExhaustiveOptions

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.uniform: dict[str, Policy] = space.uniform_policies()
        self._given = _resolve_base(space, self.options.base, self.uniform)
        self._changes_of: dict[str, list[Policy]] = {}

    def base(self) -> Policy | None:
        """The base policy (``None`` while the uniform policies it is chosen from are untold)."""
        if self._given is not None:
            return self._given
        if not all(self._told_key(p) for p in self.uniform.values()):
            return None
        return self._best_of(list(self.uniform.values()))

    def changes(self, base: Policy) -> list[Policy]:
        """The single-site changes of ``base``, site by site in forward order."""
        key = base.key()
        if key not in self._changes_of:
            self._changes_of[key] = [base.replace({site.name: c})
                                     for site, opts in zip(self.space.sites, self.space.options)
                                     for c in opts if c != base[site.name]]
        return self._changes_of[key]

    def combined(self, base: Policy) -> Policy:
        """Per site, the choice whose told single-site change beats ``base`` most (else base's)."""
        base_result = self.result_of(base)
        if base_result is None:
            return base
        choices: list[Choice] = list(base.choices)
        best = {i: rank_key(base_result, self.directions) for i in range(len(choices))}
        for change in self.changes(base):
            i = next(j for j, (a, b) in enumerate(zip(change.choices, base.choices)) if a != b)
            result = self.result_of(change)
            if result is not None and rank_key(result, self.directions) < best[i]:
                best[i], choices[i] = rank_key(result, self.directions), change.choices[i]
        return self.space.policy(choices)

    def _next(self, n: int) -> list[Policy]:
        base = self.base()
        if base is None:
            return [p for p in self.uniform.values() if not self._told_key(p)]
        if not self._told_key(base):
            return [base]
        todo = [p for p in self.changes(base) if not self._told_key(p)]
        if todo:
            return todo
        return [] if self.pending else [self.combined(base)]

    def _has_more(self) -> bool:
        base = self.base()
        if base is None or not self._told_key(base):
            return True
        if any(not self._told_key(p) for p in self.changes(base)):
            return True
        return not self._told_key(self.combined(base))


def _resolve_base(space: SearchSpace, spec: BaseSpec, uniform: Mapping[str, Policy]) -> Policy | None:
    if spec is None:
        return None
    try:
        policy = _base_policy(space, spec, uniform)
    except PolicyError as exc:
        raise ConfigError(f"exhaustive: invalid base policy: {exc}") from None
    if not space.contains(policy):
        raise ConfigError(f"exhaustive: the base policy is not in the space {space.name!r}")
    return policy


def _base_policy(space: SearchSpace, spec: BaseSpec, uniform: Mapping[str, Policy]) -> Policy:
    if isinstance(spec, Policy):
        policy = spec
    elif isinstance(spec, str):
        if spec not in uniform:
            raise ConfigError(f"exhaustive: base {spec!r} is not a method of the space; valid: {', '.join(uniform)}")
        policy = uniform[spec]
    elif isinstance(spec, Mapping):
        policy = Policy.from_dict(spec)
    else:
        if len(spec) != len(space.sites):
            raise ConfigError(f"exhaustive: base has {len(spec)} choices for {len(space.sites)} sites")
        policy = space.policy([Choice.parse(c) for c in spec])
    return policy

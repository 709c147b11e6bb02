"""``uniform``: each method of the space everywhere it applies (the paper's baselines)."""
from __future__ import annotations

from typing import Any

from policysearch.policy import Policy
from policysearch.spaces.space import SearchSpace
from policysearch.strategies.base import Strategy, register

__all__ = ["Uniform"]


@register
class Uniform(Strategy):
    """Evaluates ``space.uniform_policies()`` (one per method of the space, in the catalogue's
    order: ``policysearch.methods.ordered``); ``best()`` is the best of them by the objective."""

    name = "uniform"

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.uniform: dict[str, Policy] = space.uniform_policies()

    def _next(self, n: int) -> list[Policy]:
        return [p for p in self.uniform.values() if not self._told_key(p)]

    def _has_more(self) -> bool:
        return any(not self._told_key(p) for p in self.uniform.values())

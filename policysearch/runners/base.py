"""The runner contract.

A runner evaluates policies somewhere and yields ``(policy, result)`` as each finishes; only the
driver records. Two ways to hand it work:

* ``map(spec, policies)``: a fixed list.
* ``stream(spec, feed)``: the runner pulls work as it has room for it. ``feed(n)`` returns up to
  ``n`` (>= 1) policies to evaluate now, ``[]`` meaning "nothing right now"; the runner calls it
  once at the start and again after each result it yields (the consumer has handled that result,
  e.g. told the strategy, before the runner resumes). The stream ends when ``feed`` gave nothing
  and no evaluation is left in flight. The default is batch-synchronous (``feed(capacity)`` ->
  ``map`` -> again); a runner with several workers overrides it to keep every worker busy.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence

from policysearch.policy import Policy
from policysearch.result import EvalResult

__all__ = ["Feed", "Runner", "feed_list"]

#: ``feed(n) -> up to n policies to evaluate now`` (``[]``: nothing right now)
Feed = Callable[[int], list[Policy]]


class Runner(abc.ABC):
    """Evaluates policies somewhere; yields ``(policy, result)`` as they finish."""

    #: how many evaluations the runner runs at once (how many policies to ask for)
    capacity: int = 1

    @abc.abstractmethod
    def map(self, spec: object, policies: Sequence[Policy]) -> Iterator[tuple[Policy, EvalResult]]:
        """Evaluate ``policies`` with ``spec.evaluator()`` (an :class:`~policysearch.spec.EvaluatorSpec`
        builds it once per process; runners never import the spec module, which needs torch);
        never raise for one policy."""

    def stream(self, spec: object, feed: Feed) -> Iterator[tuple[Policy, EvalResult]]:
        """Evaluate what ``feed`` hands out (see the module docstring) until it has nothing and
        nothing is in flight. This default runs batch after batch: ``feed(capacity)`` -> ``map``."""
        while batch := feed(self.capacity):
            yield from self.map(spec, batch)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers."""


def feed_list(policies: Sequence[Policy]) -> Feed:
    """A feed that hands out ``policies`` in order, ``n`` at a time."""
    todo = list(policies)

    def feed(n: int) -> list[Policy]:
        out = todo[:n]
        del todo[:n]
        return out

    return feed

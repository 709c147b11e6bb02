"""The runner contract."""
from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence

from policysearch.policy import Policy
from policysearch.result import EvalResult

__all__ = ["Runner"]


class Runner(abc.ABC):
    """Evaluates policies somewhere; yields ``(policy, result)`` as they finish."""

    capacity: int = 1

    @abc.abstractmethod
    def map(self, spec: object, policies: Sequence[Policy]) -> Iterator[tuple[Policy, EvalResult]]:
        """Evaluate ``policies`` with the evaluator ``spec`` builds; never raise for one policy."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers."""

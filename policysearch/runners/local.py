"""Evaluate in this process, one policy at a time (the default runner)."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from policysearch.policy import Policy
from policysearch.result import EvalResult
from policysearch.runners.base import Runner

__all__ = ["LocalRunner"]

log = logging.getLogger(__name__)


class LocalRunner(Runner):
    capacity = 1

    def __init__(self) -> None:  # no options: evaluates in this process, one policy at a time
        pass

    def map(self, spec: object, policies: Sequence[Policy]) -> Iterator[tuple[Policy, EvalResult]]:
        evaluator = spec.evaluator()
        for policy in policies:
            yield policy, safe_evaluate(evaluator, policy)


def safe_evaluate(evaluator: object, policy: Policy) -> EvalResult:
    """``evaluator.evaluate(policy)``; an arithmetic failure becomes a failed result, not a crash."""
    try:
        return evaluator.evaluate(policy)
    except (RuntimeError, FloatingPointError, ValueError) as exc:
        log.warning("evaluation failed for %s: %s", policy.key()[:80], exc)
        n = len(evaluator.objective.directions)
        return EvalResult.failed(n, f"{type(exc).__name__}: {exc}")

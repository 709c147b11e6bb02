"""Search strategies (torch-free), registered by name; all pass one conformance suite."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from policysearch.registry import Registry
from policysearch.spaces.space import SearchSpace
from policysearch.strategies.base import Strategy
from policysearch.strategies.optuna_based import NSGA2, TPE, RandomSearch
from policysearch.strategies.simple import (
    Exhaustive,
    SQNRDiff,
    SQNRDrop,
    SQNROutput,
    SQNRRule,
    Uniform,
    rule_sqnr_diff,
    rule_sqnr_drop,
    rule_sqnr_output,
)

__all__ = [
    "STRATEGIES",
    "Exhaustive",
    "NSGA2",
    "RandomSearch",
    "SQNRDiff",
    "SQNRDrop",
    "SQNROutput",
    "SQNRRule",
    "Strategy",
    "TPE",
    "Uniform",
    "create_strategy",
    "list_strategies",
    "rule_sqnr_diff",
    "rule_sqnr_drop",
    "rule_sqnr_output",
]

STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
for _name, _cls in (("uniform", Uniform), ("sqnr_diff", SQNRDiff), ("sqnr_drop", SQNRDrop),
                    ("sqnr_output", SQNROutput), ("exhaustive", Exhaustive), ("tpe", TPE),
                    ("nsga2", NSGA2), ("random", RandomSearch)):
    STRATEGIES.register(_name, _cls)

#: Options that only budgeted strategies take; others ignore them with a log line.
_BUDGET_OPTIONS = ("trials",)


def create_strategy(name: str, space: SearchSpace, *, directions: Sequence[str] = ("maximize",),
                    seed: int = 0, **options: Any) -> Strategy:
    cls = STRATEGIES.get(name)
    if not issubclass(cls, (TPE, NSGA2, RandomSearch)):
        for opt in _BUDGET_OPTIONS:
            options.pop(opt, None)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return cls(space, directions=tuple(directions), seed=seed, **options)


def list_strategies() -> list[str]:
    return STRATEGIES.names()

"""Search strategies (torch-free), registered by name; all pass one conformance suite.

``create_strategy(name, space, directions=..., seed=..., **options)`` builds one; see
:mod:`policysearch.strategies.base` for the ask/tell contract.

The strategies built on a heavy library (Optuna: ``tpe``, ``nsga2``, ``random``; SciPy's MILP:
``ilp``) are registered lazily (``"module:attr"``) and their public names resolve on first use
(PEP 562), so importing this package loads neither; their modules import the library at the top.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from policysearch.registry import lazy_exports
from policysearch.spaces.space import SearchSpace
from policysearch.strategies.base import STRATEGIES, Strategy, dominates, rank_key, register
from policysearch.strategies.exhaustive import Exhaustive, ExhaustiveOptions
from policysearch.strategies.sqnr import (
    SiteSelection,
    SQNRAbsDiff,
    SQNRDiff,
    SQNRDrop,
    SQNROutput,
    SQNRRule,
    rule_sqnr_absdiff,
    rule_sqnr_diff,
    rule_sqnr_drop,
    rule_sqnr_output,
)
from policysearch.strategies.unified import Unified, UnifiedOptions, UnifiedScore, harmonic_score
from policysearch.strategies.uniform import Uniform

if TYPE_CHECKING:
    from policysearch.strategies.ilp import ILP, ILPOptions, ILPSolution
    from policysearch.strategies.optuna_based import (
        NSGA2,
        TPE,
        NSGA2Options,
        OptunaOptions,
        OptunaStrategy,
        RandomSearch,
        TPEOptions,
    )

__all__ = [
    "ILP",
    "NSGA2",
    "STRATEGIES",
    "TPE",
    "Exhaustive",
    "ExhaustiveOptions",
    "ILPOptions",
    "ILPSolution",
    "NSGA2Options",
    "OptunaOptions",
    "OptunaStrategy",
    "RandomSearch",
    "SQNRAbsDiff",
    "SQNRDiff",
    "SQNRDrop",
    "SQNROutput",
    "SQNRRule",
    "SiteSelection",
    "Strategy",
    "TPEOptions",
    "Unified",
    "UnifiedOptions",
    "UnifiedScore",
    "Uniform",
    "create_strategy",
    "dominates",
    "harmonic_score",
    "list_strategies",
    "rank_key",
    "register",
    "rule_sqnr_absdiff",
    "rule_sqnr_diff",
    "rule_sqnr_drop",
    "rule_sqnr_output",
]

log = logging.getLogger(__name__)

_OPTUNA = "policysearch.strategies.optuna_based"
_ILP = "policysearch.strategies.ilp"
#: strategy name -> "module:attr" (the module registers the class itself when it is imported)
_LAZY_STRATEGIES = {"tpe": f"{_OPTUNA}:TPE", "nsga2": f"{_OPTUNA}:NSGA2", "random": f"{_OPTUNA}:RandomSearch",
                    "ilp": f"{_ILP}:ILP"}
for _name, _target in _LAZY_STRATEGIES.items():
    STRATEGIES.register_lazy(_name, _target)

#: public name -> the module that defines it, imported on first attribute access
_LAZY: dict[str, str] = {
    **dict.fromkeys(("ILP", "ILPOptions", "ILPSolution"), _ILP),
    **dict.fromkeys(("NSGA2", "TPE", "NSGA2Options", "OptunaOptions", "OptunaStrategy", "RandomSearch",
                     "TPEOptions"), _OPTUNA),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)

#: Options a driver may pass to any strategy; one that does not take it ignores it (logged).
BUDGET_OPTIONS = ("trials",)
#: The run's constraints and latency profile, passed to every strategy; one that does not take
#: them ignores them silently (the driver applies the constraints to the answer itself).
CONSTRAINT_OPTIONS = ("max_latency", "min_top1", "profile")


def create_strategy(name: str, space: SearchSpace, *, directions: Sequence[str] = ("maximize",),
                    seed: int = 0, **options: Any) -> Strategy:
    """The strategy registered as ``name`` (unknown names list the valid ones)."""
    cls = STRATEGIES.get(name)
    accepted = {f.name for f in fields(cls.Options)}
    for opt in BUDGET_OPTIONS:
        if opt in options and opt not in accepted:
            log.warning("strategy %s has no %r option; ignoring %s=%r", name, opt, opt, options.pop(opt))
    for opt in CONSTRAINT_OPTIONS:
        if opt in options and opt not in accepted:
            options.pop(opt)
    return cls(space, directions=directions, seed=seed, **options)


def list_strategies() -> list[str]:
    """The registered strategy names, sorted."""
    return STRATEGIES.names()

"""Evaluators and objectives: per-site ASQNR / SQNR diff, output metrics, weighted objectives,
latency-aware objectives and constraints.

The objective and latency modules are torch-free and load with the package (strategies read
them); the evaluator and the SQNR functions need torch and load on first use.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from policysearch.objectives.latency import (
    DEFAULT_LAMBDA,
    Constraints,
    LatencyModel,
    latency_weighted,
    relative_latency,
)
from policysearch.objectives.objective import METRICS, OBJECTIVES, Objective, list_objectives, load_objective

__all__ = [
    "DEFAULT_LAMBDA",
    "MAX_DB",
    "METRICS",
    "OBJECTIVES",
    "Constraints",
    "Evaluator",
    "LatencyModel",
    "Objective",
    "ReluRepair",
    "RepairSettings",
    "asqnr",
    "kl_divergence",
    "latency_weighted",
    "list_objectives",
    "load_objective",
    "logit_metrics",
    "relative_latency",
    "top1_agreement",
]

#: names that load torch: resolved on first access
_LAZY = {
    "Evaluator": "policysearch.objectives.evaluator",
    "MAX_DB": "policysearch.objectives.sqnr",
    "ReluRepair": "policysearch.objectives.repair",
    "RepairSettings": "policysearch.objectives.repair",
    "asqnr": "policysearch.objectives.sqnr",
    "kl_divergence": "policysearch.objectives.sqnr",
    "logit_metrics": "policysearch.objectives.sqnr",
    "top1_agreement": "policysearch.objectives.sqnr",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

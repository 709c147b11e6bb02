"""Evaluators and objectives: per-site ASQNR / SQNR diff, output metrics, weighted objectives."""
from policysearch.objectives.evaluator import Evaluator
from policysearch.objectives.objective import METRICS, OBJECTIVES, Objective, list_objectives, load_objective
from policysearch.objectives.sqnr import MAX_DB, asqnr, kl_divergence, logit_metrics, top1_agreement

__all__ = [
    "MAX_DB",
    "METRICS",
    "OBJECTIVES",
    "Evaluator",
    "Objective",
    "asqnr",
    "kl_divergence",
    "list_objectives",
    "load_objective",
    "logit_metrics",
    "top1_agreement",
]

"""The per-site SQNR rules of Kim et al. 2024: ``sqnr_diff``, ``sqnr_drop``, ``sqnr_absdiff``,
``sqnr_output``.

Procedure (one strategy per rule): evaluate each uniform policy of the space once; then, per
site, take the choice whose rule key is lowest, where a choice's key is measured at that site in
the uniform run of the choice's own method (``result.sites[site]``: gamma = input ASQNR, beta =
output ASQNR). Only choices a uniform run actually ran at the site are candidates (the uniform
``fqvit`` run's I-BERT GELU is not a candidate, and with bit options only the uniform bits are
measured); ties go to the earlier choice in the space's order. Finally the mixed policy is
evaluated once. ``best()`` is that mixed policy: it is the rule's answer whatever its objective.
See DESIGN.md, "SQNR and SQNR diff", for why eq. 11 has three readings (plus ``sqnr_output``).
The keys are differences of dB values, so the picks do not depend on the 20·log10 / 10·log10
convention (a 10·log10 key is exactly half the stored 20·log10 one).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from policysearch.policy import Choice, Policy
from policysearch.result import EvalResult, SiteMetrics
from policysearch.spaces.space import SearchSpace
from policysearch.strategies.base import Strategy, register

__all__ = [
    "SQNRAbsDiff",
    "SQNRDiff",
    "SQNRDrop",
    "SQNROutput",
    "SQNRRule",
    "SiteSelection",
    "rule_sqnr_absdiff",
    "rule_sqnr_diff",
    "rule_sqnr_drop",
    "rule_sqnr_output",
]


def rule_sqnr_diff(metrics: SiteMetrics) -> float:
    """Eq. 11 read literally: minimise ``SQNR diff = beta - gamma`` (output minus input ASQNR)."""
    return metrics.beta - metrics.gamma


def rule_sqnr_drop(metrics: SiteMetrics) -> float:
    """The other reading of eq. 11: minimise the SQNR lost across the site, ``gamma - beta``."""
    return metrics.gamma - metrics.beta


def rule_sqnr_absdiff(metrics: SiteMetrics) -> float:
    """The third reading of eq. 11: the SQNR changes least across the site, either way:
    minimise ``|beta - gamma|``."""
    return metrics.absdiff


def rule_sqnr_output(metrics: SiteMetrics) -> float:
    """The paper's Table 2 comparison: maximise the output ASQNR ``beta`` (minimise ``-beta``)."""
    return -metrics.beta


@dataclass(frozen=True, kw_only=True)
class SiteSelection:
    """One row of the rule's table: the candidates measured at a site and the pick."""

    site: str
    kind: str
    choice: Choice
    #: The rule key of ``choice``; ``None`` when no candidate was measured (then ``choice`` is the
    #: site's choice in the best successful uniform run, else the site's first choice).
    key: float | None
    #: choice string -> (metrics, rule key), in the space's order.
    candidates: dict[str, tuple[SiteMetrics, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "kind": self.kind, "choice": str(self.choice), "key": self.key,
                "candidates": {c: {**m.to_dict(), "key": k} for c, (m, k) in self.candidates.items()}}


class SQNRRule(Strategy):
    """Base of the rule strategies; ``rule`` maps a site's metrics to a key to minimise."""

    rule: ClassVar[Callable[[SiteMetrics], float]]

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.uniform: dict[str, Policy] = space.uniform_policies()

    # -- the rule --------------------------------------------------------------------------------
    def uniform_done(self) -> bool:
        return all(self._told_key(p) for p in self.uniform.values())

    def selection(self) -> dict[str, SiteSelection]:
        """Per site (in order), the rule's table over the uniform runs told so far."""
        fallback = self._best_of(list(self.uniform.values()))
        return {site.name: self._select(i, fallback) for i, site in enumerate(self.space.sites)}

    def _select(self, i: int, fallback: Policy | None) -> SiteSelection:
        site = self.space.sites[i]
        measured: dict[Choice, tuple[SiteMetrics, float]] = {}
        for method, policy in self.uniform.items():
            choice = policy.choices[i]
            result = self.result_of(policy)
            metrics = result.sites.get(site.name) if result is not None and result.ok else None
            if choice.method != method or metrics is None:
                continue
            key = type(self).rule(metrics)
            if math.isfinite(key):
                measured[choice] = (metrics, key)
        candidates = {c: measured[c] for c in self.space.options[i] if c in measured}
        if candidates:
            choice = min(candidates, key=lambda c: candidates[c][1])  # first of equal keys
            key: float | None = candidates[choice][1]
        else:
            choice = fallback.choices[i] if fallback is not None else self.space.options[i][0]
            key = None
        return SiteSelection(site=site.name, kind=site.kind, choice=choice, key=key,
                             candidates={str(c): v for c, v in candidates.items()})

    def mixed(self) -> Policy:
        """The policy the rule picks (meaningful once every uniform run is told)."""
        return self.space.policy([s.choice for s in self.selection().values()])

    # -- strategy hooks --------------------------------------------------------------------------
    def _next(self, n: int) -> list[Policy]:
        if not self.uniform_done():
            return [p for p in self.uniform.values() if not self._told_key(p)]
        return [self.mixed()]

    def _has_more(self) -> bool:
        return not self.uniform_done() or not self._told_key(self.mixed())

    def best(self) -> tuple[Policy, EvalResult] | None:
        """The mixed policy and its result; if its evaluation failed (or is not told yet), the
        best successful evaluation instead."""
        if self.uniform_done():
            mixed = self.mixed()
            result = self.result_of(mixed)
            if result is not None and result.ok:
                return mixed, result
        return super().best()


@register
class SQNRDiff(SQNRRule):
    """Per site, the lowest ``beta - gamma`` (:func:`rule_sqnr_diff`)."""

    name = "sqnr_diff"
    rule = staticmethod(rule_sqnr_diff)


@register
class SQNRDrop(SQNRRule):
    """Per site, the lowest ``gamma - beta`` (:func:`rule_sqnr_drop`)."""

    name = "sqnr_drop"
    rule = staticmethod(rule_sqnr_drop)


@register
class SQNRAbsDiff(SQNRRule):
    """Per site, the lowest ``|beta - gamma|`` (:func:`rule_sqnr_absdiff`)."""

    name = "sqnr_absdiff"
    rule = staticmethod(rule_sqnr_absdiff)


@register
class SQNROutput(SQNRRule):
    """Per site, the highest ``beta`` (:func:`rule_sqnr_output`)."""

    name = "sqnr_output"
    rule = staticmethod(rule_sqnr_output)

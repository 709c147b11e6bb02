"""Deterministic strategies: ``uniform``, the SQNR rules and ``exhaustive``."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from policysearch.policy import Choice, Policy
from policysearch.result import EvalResult, SiteMetrics
from policysearch.strategies.base import Strategy, better

__all__ = ["Exhaustive", "SQNRRule", "Uniform", "rule_sqnr_diff", "rule_sqnr_drop", "rule_sqnr_output"]


class Uniform(Strategy):
    """Each method everywhere it applies (the paper's baselines); best by the objective."""

    def _next(self, n: int) -> list[Policy]:
        return [p for p in self.space.uniform_policies().values() if p.key() not in self.results]

    def _has_more(self) -> bool:
        return any(p.key() not in self.results for p in self.space.uniform_policies().values())


# The three readings of "the method with the lowest SQNR diff" (DESIGN.md, "SQNR and SQNR diff").
# Each returns a key to MINIMISE over the candidate methods of one site.
def rule_sqnr_diff(m: SiteMetrics) -> float:
    """Eq. 11 read literally: lowest ``SQNR diff = beta - gamma`` (output SQNR minus input SQNR)."""
    return m.beta - m.gamma


def rule_sqnr_drop(m: SiteMetrics) -> float:
    """The other reading: least SQNR lost across the site, lowest ``gamma - beta``."""
    return m.gamma - m.beta


def rule_sqnr_output(m: SiteMetrics) -> float:
    """The paper's Table 2 comparison: highest output SQNR ``beta``."""
    return -m.beta


class SQNRRule(Strategy):
    """One uniform evaluation per method, then per site the method the rule prefers, measured in
    that method's uniform run; then one evaluation of the mixed policy, which is the answer."""

    rule: Callable[[SiteMetrics], float] = staticmethod(rule_sqnr_diff)

    def _uniform(self) -> dict[str, Policy]:
        return self.space.uniform_policies()

    def _uniform_done(self) -> bool:
        return all(p.key() in self.results for p in self._uniform().values())

    def selection(self) -> dict[str, tuple[Choice, float | None]]:
        """Per site: the chosen choice and its rule key (None where nothing was measured)."""
        runs = [self.results[p.key()] for p in self._uniform().values() if p.key() in self.results]
        out: dict[str, tuple[Choice, float | None]] = {}
        for i, site in enumerate(self.space.sites):
            best: tuple[Choice, float | None] = (self.space.options[i][0], None)
            for choice in self.space.options[i]:
                for policy, result in runs:
                    m = result.sites.get(site.name) if result.ok else None
                    if policy.choices[i] != choice or m is None:
                        continue
                    key = type(self).rule(m)
                    if best[1] is None or key < best[1]:
                        best = (choice, key)
            out[site.name] = best
        return out

    def mixed(self) -> Policy:
        return self.space.policy([c for c, _ in self.selection().values()])

    def _next(self, n: int) -> list[Policy]:
        if not self._uniform_done():
            return [p for p in self._uniform().values() if p.key() not in self.results]
        return [self.mixed()]

    def _has_more(self) -> bool:
        return not self._uniform_done() or self.mixed().key() not in self.results

    def best(self) -> tuple[Policy, EvalResult] | None:
        """The rule's mixed policy; if its evaluation failed, the best successful one."""
        if self._uniform_done():
            hit = self.results.get(self.mixed().key())
            if hit is not None and hit[1].ok:
                return hit
        return super().best()


class SQNRDiff(SQNRRule):
    rule = staticmethod(rule_sqnr_diff)


class SQNRDrop(SQNRRule):
    rule = staticmethod(rule_sqnr_drop)


class SQNROutput(SQNRRule):
    rule = staticmethod(rule_sqnr_output)


class Exhaustive(Strategy):
    """Per-site independent search from a base policy (default: the best uniform policy).

    Every single-site change is evaluated, site by site in forward order (so the evaluator reuses
    the base run's activations up to the changed site); each site then keeps its best choice if it
    beats the base, and the combined policy is evaluated. ``best()`` is the best of everything.
    """

    def __init__(self, space: Any, *, base: Policy | None = None, **kw: Any) -> None:
        super().__init__(space, **kw)
        self._base_given = base

    def base(self) -> Policy | None:
        if self._base_given is not None:
            return self._base_given
        uniform = list(self.space.uniform_policies().values())
        if any(p.key() not in self.results for p in uniform):
            return None
        best = None
        for p in uniform:
            r = self.results[p.key()][1]
            if best is None or better(r, best[1], self.directions[0]):
                best = (p, r)
        return best[0]

    def _changes(self, base: Policy) -> list[Policy]:
        out = []
        for i, site in enumerate(self.space.sites):
            for c in self.space.options[i]:
                if c != base.choices[i]:
                    out.append(base.replace({site.name: c}))
        return out

    def combined(self, base: Policy) -> Policy:
        base_res = self.results[base.key()][1]
        choices = list(base.choices)
        for i, site in enumerate(self.space.sites):
            best = base_res
            for c in self.space.options[i]:
                hit = self.results.get(base.replace({site.name: c}).key()) if c != base.choices[i] else None
                if hit is not None and better(hit[1], best, self.directions[0]):
                    best, choices[i] = hit[1], c
        return self.space.policy(choices)

    def _next(self, n: int) -> list[Policy]:
        base = self.base()
        if base is None:
            return [p for p in self.space.uniform_policies().values() if p.key() not in self.results]
        if base.key() not in self.results:
            return [base]
        todo = [p for p in self._changes(base) if p.key() not in self.results]
        if todo:
            return todo
        if self.pending:
            return []
        return [self.combined(base)]

    def _has_more(self) -> bool:
        base = self.base()
        if base is None or base.key() not in self.results:
            return True
        if any(p.key() not in self.results for p in self._changes(base)):
            return True
        return self.combined(base).key() not in self.results

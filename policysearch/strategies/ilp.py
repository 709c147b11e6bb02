"""``ilp``: budgeted selection by integer linear programming over measured per-site effects.

As HAWQ-V3 and ModelOpt choose bit widths, ``ilp`` chooses a method per site:

1. It measures what ``exhaustive`` measures: the base (the ``base`` option, else the best uniform
   policy) and every single-site change of it, so each (site, choice) has a measured delta of the
   first objective value (and of ``top1``) against the base.
2. Assuming the deltas add up (sites independent), it picks one choice per site with
   ``scipy.optimize.milp``: one binary per (site, choice), exactly one per site, and the costs per
   (site, method) from the latency profile (:class:`policysearch.objectives.latency.LatencyModel`:
   the ``profile`` option, a profile path or document, else the catalogue's costs):

   * ``max_latency`` R: minimise the predicted objective delta subject to a predicted relative
     latency <= R (and top-1 >= ``min_top1`` when that is given too);
   * ``min_top1`` A alone: minimise the predicted latency subject to a predicted top-1 >= A;
   * no budget: minimise the predicted objective delta (per site the best measured change,
     which is what ``exhaustive`` combines).

   Ties go to fewer changes from the base. When no policy meets the budget by prediction, the
   one with the least predicted total shortfall is taken (latency and top-1 in their own units:
   fractions of float latency and of top-1).
3. It evaluates the chosen policy once (unless it was measured already) and logs the predicted
   against the measured metrics; :meth:`ILP.report` gives both to the run record
   (``predicted_<metric>`` beside the measured ones), so users see how far independence holds.

``best()``: with no budget, the best of everything evaluated; with one, the best evaluated policy
that meets it (for ``min_top1`` alone: the fastest such, ties by the objective), else the one that
misses it by least.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from policysearch.errors import ConfigError
from policysearch.identity import rank_key
from policysearch.objectives.latency import Constraints, LatencyModel, latency_model
from policysearch.policy import Policy
from policysearch.result import EvalResult
from policysearch.spaces.space import SearchSpace
from policysearch.strategies.base import register
from policysearch.strategies.exhaustive import BaseSpec, Exhaustive

__all__ = ["ILP", "ILPOptions", "ILPSolution"]

log = logging.getLogger(__name__)

ProfileSpec = str | Mapping[str, Any] | LatencyModel | None


@dataclass(frozen=True, kw_only=True)
class ILPOptions:
    """``base``: as ``exhaustive``'s; ``max_latency``: relative latency budget (e.g. 0.9);
    ``min_top1``: top-1 budget (a fraction); ``profile``: a cost profile path or document (or a
    :class:`LatencyModel`); without one the catalogue's costs, needed only under a budget."""

    base: BaseSpec = None
    max_latency: float | None = None
    min_top1: float | None = None
    profile: ProfileSpec = None

    def __post_init__(self) -> None:
        Constraints(max_latency=self.max_latency, min_top1=self.min_top1)  # validates both


@dataclass(frozen=True, kw_only=True)
class ILPSolution:
    """The chosen policy, how it was found, and what the additive model predicts for it."""

    policy: Policy
    status: str
    #: whether the budget is met by prediction (None without a budget)
    feasible: bool | None
    predicted: Mapping[str, float] = field(default_factory=dict)
    shortfall: Mapping[str, float] = field(default_factory=dict)


@register
class ILP(Exhaustive):
    """Per-site effects + a budget -> one policy by ILP; see the module docstring."""

    name = "ilp"
    Options = ILPOptions

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        try:
            super().__init__(space, **kw)
        except ConfigError as exc:  # the base is resolved as exhaustive resolves it
            raise ConfigError(str(exc).replace("exhaustive:", "ilp:", 1)) from None
        opts = self.options
        self.constraints = Constraints(max_latency=opts.max_latency, min_top1=opts.min_top1)
        self.latency: LatencyModel | None = None
        if self.constraints.active or opts.profile is not None:
            self.latency = latency_model(opts.profile)
            self.latency.check(space.sites)
        self._solutions: dict[str, ILPSolution] = {}
        self._reported: set[str] = set()

    @property
    def mode(self) -> str:
        """``"metric"`` (minimise the predicted objective) or ``"latency"`` (minimise latency)."""
        return "latency" if self.constraints.min_top1 is not None and self.constraints.max_latency is None else "metric"

    # -- the selection -----------------------------------------------------------------------------
    def combined(self, base: Policy) -> Policy:
        """The ILP's choice from ``base`` and its told single-site changes."""
        return self.solution(base).policy

    def solution(self, base: Policy) -> ILPSolution:
        key = base.key()
        if key not in self._solutions:
            self._solutions[key] = self._solve(base)
            chosen = self._solutions[key].policy
            if self._told_key(chosen) and not self._loading:
                self._report_once(chosen)
        return self._solutions[key]

    def _solve(self, base: Policy) -> ILPSolution:
        base_result = self.result_of(base)
        if base_result is None or not base_result.ok:
            return ILPSolution(policy=base, status="base failed: nothing to model", feasible=None)
        base_key = rank_key(base_result, self.directions)[0]
        base_top1 = _top1(base_result)
        want_top1 = self.constraints.min_top1 is not None
        if want_top1 and not math.isfinite(base_top1):
            log.warning("ilp: the results carry no top1; the min_top1 budget cannot be modelled and is left out")
            want_top1 = False
        results = {p.key(): self.result_of(p) for p in self.changes(base)}
        # one variable per usable (site, choice): the base's own, and every change that succeeded
        rows: list[tuple[int, Any, float, float, float, float]] = []  # (site, choice, d_rank, d_value, d_top1, cost)
        for i, (site, opts) in enumerate(zip(self.space.sites, self.space.options)):
            for c in opts:
                if c == base.choices[i]:
                    d_rank = d_value = d_top1 = 0.0
                else:
                    r = results.get(base.replace({site.name: c}).key())
                    if r is None or not r.ok:
                        continue  # failed (or unmeasured): never chosen
                    d_rank = rank_key(r, self.directions)[0] - base_key
                    d_value = r.value - base_result.value
                    d_top1 = _top1(r) - base_top1
                    if want_top1 and not math.isfinite(d_top1):
                        continue
                cost = self.latency.cost(site, c.method) if self.latency is not None else 0.0
                rows.append((i, c, d_rank, d_value, d_top1, cost))
        try:
            picked, status = self._milp(rows, base, want_top1=want_top1, base_top1=base_top1)
        except ImportError:
            raise ConfigError("the ilp strategy needs scipy (pip install scipy)") from None
        choices = list(base.choices)
        for j in picked:
            choices[rows[j][0]] = rows[j][1]
        policy = self.space.policy(choices)
        chosen = [rows[j] for j in picked]
        predicted = {"value": base_result.value + sum(r[3] for r in chosen)}
        if math.isfinite(base_top1):
            predicted["top1"] = base_top1 + sum(r[4] for r in chosen if math.isfinite(r[4]))
        if self.latency is not None:
            predicted["latency"] = self.latency.relative(policy)
        miss = self.constraints.shortfall(predicted) if self.constraints.active else {}
        if not want_top1:
            miss.pop("top1", None)
        feasible = (not miss) if self.constraints.active else None
        if feasible is False:
            log.warning("ilp: no policy meets %s by prediction; choosing the closest (short by %s)",
                        self.constraints.text(), ", ".join(f"{k} {v:.4g}" for k, v in miss.items()))
        log.info("ilp: chose %s from %d single-site measurements (%s); predicted %s",
                 _counts(policy), len(results), status, _fmt(predicted))
        return ILPSolution(policy=policy, status=status, feasible=feasible, predicted=predicted, shortfall=miss)

    def _milp(self, rows: list[tuple[int, Any, float, float, float, float]], base: Policy, *, want_top1: bool,
              base_top1: float) -> tuple[list[int], str]:
        """Indices of the chosen rows (one per site) and a status text; lexicographic stages:
        least total shortfall of the budget (slack variables), then the primary objective, then
        fewest changes from the base."""
        n_sites, n = len(self.space.sites), len(rows)
        budget: list[tuple[np.ndarray, float, str]] = []  # (row over x, upper bound, name): row @ x - slack <= ub
        if self.constraints.max_latency is not None and self.latency is not None:
            total = self.latency.float_ms(self.space.sites)
            lat = np.array([r[5] for r in rows]) / total
            budget.append((lat, self.constraints.max_latency - self.latency.fixed_ms / total, "latency"))
        if want_top1:  # base_top1 + sum(d_top1 x) >= A  <=>  -sum(d_top1 x) <= base_top1 - A
            budget.append((-np.array([r[4] for r in rows]), base_top1 - self.constraints.min_top1, "top1"))
        k = len(budget)
        size = n + k
        one_hot = np.zeros((n_sites, size))
        for j, r in enumerate(rows):
            one_hot[r[0], j] = 1.0
        constraints = [LinearConstraint(one_hot, 1.0, 1.0)]
        for b, (row, ub, _) in enumerate(budget):
            a = np.zeros(size)
            a[:n], a[n + b] = row, -1.0
            constraints.append(LinearConstraint(a[None, :], -np.inf, ub))
        integrality = np.r_[np.ones(n), np.zeros(k)]
        bounds = Bounds(np.zeros(size), np.r_[np.ones(n), np.full(k, np.inf)])
        primary = np.zeros(size)
        primary[:n] = [r[5] for r in rows] if self.mode == "latency" else [r[2] for r in rows]
        changes = np.zeros(size)
        changes[:n] = [0.0 if r[1] == base.choices[r[0]] else 1.0 for r in rows]
        slack = np.r_[np.zeros(n), np.ones(k)]
        stages = ([("shortfall", slack)] if k else []) + [("objective", primary), ("changes", changes)]
        x, solved = None, []
        for name, cost in stages:
            res = milp(cost, integrality=integrality, bounds=bounds, constraints=constraints,
                       options={"mip_rel_gap": 0.0})
            if res.status != 0 or res.x is None:
                log.warning("ilp: the %s stage did not solve (%s); keeping the previous stage's choice", name,
                            res.message)
                break
            x = res.x
            solved.append(name)
            tol = 1e-9 + 1e-7 * abs(res.fun)
            constraints.append(LinearConstraint(cost[None, :], -np.inf, res.fun + tol))  # keep this stage's optimum
        status = f"optimal by {', then '.join(solved)}" if solved else "not solved"
        if x is None:  # cannot happen with a one-hot that always admits the base: keep the base
            return [j for j, r in enumerate(rows) if r[1] == base.choices[r[0]]], status
        picked = []
        for i in range(n_sites):
            cands = [j for j, r in enumerate(rows) if r[0] == i]
            picked.append(max(cands, key=lambda j: x[j]))
        return picked, status

    # -- reporting ---------------------------------------------------------------------------------
    def _told(self, policy: Policy, result: EvalResult) -> None:
        if self._loading:
            return
        for sol in self._solutions.values():
            if sol.policy.key() == policy.key():
                self._report_once(policy)

    def _report_once(self, policy: Policy) -> None:
        if policy.key() in self._reported:
            return
        self._reported.add(policy.key())
        rep = self.report(policy)["provenance"]
        if rep.get("measured"):
            log.info("ilp: predicted %s, measured %s (the additive, independent-sites model)",
                     _fmt(rep["predicted"]), _fmt(rep["measured"]))

    def report(self, answer: Policy | None = None) -> dict[str, Any]:
        """``{"provenance": {...}, "metrics": {...}}`` for the run record: the budget, the solver's
        status, and the chosen policy's predicted and measured metrics; ``metrics`` holds
        ``predicted_<metric>`` when ``answer`` is the chosen policy (else it is empty)."""
        base = self.base()
        if base is None or not self._told_key(base) or any(not self._told_key(p) for p in self.changes(base)):
            return {"provenance": {"strategy": self.name, "status": "not solved yet"}, "metrics": {}}
        sol = self.solution(base)
        prov: dict[str, Any] = {
            "strategy": self.name, "mode": self.mode, "budget": self.constraints.to_dict(),
            "latency_source": self.latency.source if self.latency is not None else None,
            "status": sol.status, "predicted_feasible": sol.feasible, "predicted_shortfall": dict(sol.shortfall),
            "single_site_changes": len(self.changes(base)), "chosen": [str(c) for c in sol.policy.choices],
            "predicted": dict(sol.predicted),
        }
        measured = self.result_of(sol.policy)
        if measured is not None and measured.ok:
            got = {"value": measured.value}
            if "top1" in sol.predicted:
                got["top1"] = _top1(measured)
            if "latency" in sol.predicted:
                got["latency"] = float(measured.metrics.get("latency", sol.predicted["latency"]))
            prov["measured"] = got
            prov["error"] = {k: got[k] - v for k, v in sol.predicted.items() if k in got}
        elif measured is not None:
            prov["measured"] = {"error": measured.error}
        metrics = {}
        if answer is not None and answer.key() == sol.policy.key():
            metrics = {f"predicted_{k}": v for k, v in sol.predicted.items()}
        return {"provenance": prov, "metrics": metrics}

    # -- the answer ----------------------------------------------------------------------------------
    def best(self) -> tuple[Policy, EvalResult] | None:
        """See the module docstring: the best feasible evaluated policy under the budget."""
        if not self.constraints.active:
            return super().best()
        ok = self._successes()
        if not ok:
            return None

        def miss(pr: tuple[Policy, EvalResult]) -> float:
            return sum(self.constraints.shortfall(self._budget_metrics(*pr)).values())

        def order(pr: tuple[Policy, EvalResult]) -> tuple[float, ...]:
            first = (self._budget_metrics(*pr)["latency"],) if self.mode == "latency" else ()
            return (miss(pr), *first, *rank_key(pr[1], self.directions))

        return min(ok, key=order)

    def _budget_metrics(self, policy: Policy, result: EvalResult) -> dict[str, float]:
        out = {"top1": _top1(result)}
        if self.latency is not None:
            out["latency"] = self.latency.relative(policy)
        if self.constraints.min_top1 is not None and not math.isfinite(out["top1"]):
            out["top1"] = self.constraints.min_top1  # no labels: unmodelled, held against no policy
        return out


def _top1(result: EvalResult) -> float:
    v = result.metrics.get("top1")
    return float(v) if v is not None else math.nan


def _counts(policy: Policy) -> str:
    return "; ".join(f"{kind}: " + ", ".join(f"{m} {n}" for m, n in per.items())
                     for kind, per in policy.method_counts().items())


def _fmt(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in values.items())

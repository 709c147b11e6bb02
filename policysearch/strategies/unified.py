"""``unified``: per site, the method with the best unified score of quantization sensitivity,
perturbation and computational cost (after IPTQ-ViT, Kim, Lee, Kim, WACV 2026, arXiv 2511.15369).

IPTQ-ViT selects an approximation per layer by one metric combining the three; its code is not
public and only its abstract and third-party summaries were readable here, which say the three are
normalised and combined as a harmonic mean. What is measured here, and why:

1. **Measurements** are those of ``exhaustive`` (this class extends it): the uniform policies, the
   base (the ``base`` option, else the best uniform policy) and every single-site change of the
   base. The evaluator reuses the base's activations up to the changed site, so a change costs
   about one forward from its site on.
2. **Quantization sensitivity** ``Q``: the output ASQNR ``beta`` (eq. 10, dB) of the site in the
   run where only that site runs the candidate (the base's own run for the base's choice). Every
   candidate of a site then sees the same input, so ``beta`` compares the methods alone. Higher
   is better.
3. **Perturbation** ``P``: how much the candidate worsens the model's output when only that site
   changes: the first objective's change against the base, ``v(change) - v(base)`` oriented so that
   larger is worse. With the default objective (``kl``) that is the increase of KL(float ||
   quantized) on the evaluation images: the downstream error the site's output causes, measured
   end to end, in the same runs as ``Q`` (no further forward). Lower is better.
4. **Cost** ``C``: the predicted time of the method at the site from the ``profile`` option
   (``policysearch profile``), else the method catalogue's cost slots. Without either the cost
   term is left out (logged once) and the score combines ``Q`` and ``P``. Lower is better.

Each term is min-max normalised **per kind** (over every measured (site, candidate) of that kind)
to a quality ``q`` in [0, 1], 1 the best (``(x - min) / (max - min)`` for ``Q``, ``(max - x) /
(max - min)`` for ``P`` and ``C``; a term equal for all candidates of a kind gives 1). The score is
the weighted harmonic mean, as an F-score::

    Omega = (w_Q + w_P + w_C) / (w_Q / q'_Q + w_P / q'_P + w_C / q'_C),  q' = floor + (1 - floor) q

Per site the candidate with the highest ``Omega`` is taken (ties: the earlier choice in the
space's order); the combined policy is evaluated once. ``best()`` is that policy, the metric's
answer, as the SQNR rules' answer is theirs (else, if it failed, the best evaluated).

Uncertain (not stated in the sources read): the exact normalisation (min-max here), the weights
(``weights``, default equal), the ``floor`` (default 0.1: without one a candidate worst in any
single term scores 0 and ties with every other such candidate), whether ``Q`` is beta or an SQNR
difference, and how ``P`` is measured (KL of the logits here; the paper may use another output
distance). Failed candidates are never chosen.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from policysearch.errors import ConfigError
from policysearch.objectives.latency import LatencyModel, latency_model
from policysearch.policy import Choice, Policy
from policysearch.result import EvalResult
from policysearch.spaces.space import SearchSpace
from policysearch.strategies.base import register
from policysearch.strategies.exhaustive import BaseSpec, Exhaustive

__all__ = ["Unified", "UnifiedOptions", "UnifiedScore", "harmonic_score"]

log = logging.getLogger(__name__)

TERMS = ("sensitivity", "perturbation", "cost")


@dataclass(frozen=True, kw_only=True)
class UnifiedOptions:
    """``base``: as ``exhaustive``'s; ``weights``: of (sensitivity, perturbation, cost);
    ``floor``: the least normalised quality (see the module docstring); ``profile``: a cost
    profile path or document (else the catalogue's costs, else no cost term)."""

    base: BaseSpec = None
    weights: Sequence[float] = (1.0, 1.0, 1.0)
    floor: float = 0.1
    profile: str | Mapping[str, Any] | LatencyModel | None = None

    def __post_init__(self) -> None:
        w = tuple(self.weights)
        if len(w) != 3 or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 <= x < math.inf)
                              for x in w) or sum(w) <= 0:
            raise ValueError(f"weights must be three non-negative numbers, not all 0, got {self.weights!r}")
        object.__setattr__(self, "weights", tuple(float(x) for x in w))
        if not (0.0 <= self.floor < 1.0):
            raise ValueError(f"floor must be in [0, 1), got {self.floor!r}")


@dataclass(frozen=True, kw_only=True)
class UnifiedScore:
    """One candidate at one site: its raw terms, normalised qualities and score."""

    site: str
    choice: Choice
    raw: Mapping[str, float]
    quality: Mapping[str, float] = field(default_factory=dict)
    score: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "choice": str(self.choice), "raw": {k: _json(v) for k, v in self.raw.items()},
                "quality": dict(self.quality), "score": _json(self.score)}


def harmonic_score(quality: Mapping[str, float], weights: Mapping[str, float], floor: float) -> float:
    """The weighted harmonic mean of ``floor + (1 - floor) * q`` over the terms with a weight."""
    terms = [(weights[t], floor + (1.0 - floor) * q) for t, q in quality.items() if weights.get(t, 0.0) > 0]
    total = sum(w for w, _ in terms)
    if not terms or total <= 0:
        return math.nan
    if any(q <= 0 for _, q in terms):
        return 0.0
    return total / sum(w / q for w, q in terms)


@register
class Unified(Exhaustive):
    """Per-site unified metric over ``exhaustive``'s measurements; see the module docstring."""

    name = "unified"
    Options = UnifiedOptions

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        try:
            super().__init__(space, **kw)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("exhaustive:", "unified:", 1)) from None
        self.latency: LatencyModel | None = None
        if self.options.profile is not None:
            self.latency = latency_model(self.options.profile)
            self.latency.check(space.sites)
        else:
            self.latency = LatencyModel.from_catalogue()
            if self.latency is None and self.options.weights[2] > 0:
                log.info("unified: no cost profile and no catalogue costs; the cost term is left out")
        self._weights = dict(zip(TERMS, self.options.weights))

    # -- the metric -------------------------------------------------------------------------------
    def _cost(self, site: Any, method: str) -> float:
        if self.latency is None:
            return math.nan
        try:
            return float(self.latency.cost(site, method))
        except ConfigError:
            return math.nan

    def _raw(self, base: Policy, base_result: EvalResult) -> list[UnifiedScore]:
        sign = -1.0 if self.directions[0] == "maximize" else 1.0
        rows = []
        for i, (site, opts) in enumerate(zip(self.space.sites, self.space.options)):
            for c in opts:
                policy = base if c == base.choices[i] else base.replace({site.name: c})
                result = base_result if policy is base else self.result_of(policy)
                if result is None or not result.ok:
                    continue
                metrics = result.sites.get(site.name)
                beta = metrics.beta if metrics is not None else math.nan
                rows.append(UnifiedScore(site=site.name, choice=c, raw={
                    "sensitivity": beta, "perturbation": sign * (result.values[0] - base_result.values[0]),
                    "cost": self._cost(site, c.method)}))
        return rows

    def scores(self, base: Policy) -> list[UnifiedScore]:
        """Every usable candidate's terms and score (once the base and its changes are told)."""
        base_result = self.result_of(base)
        if base_result is None or not base_result.ok:
            return []
        rows = self._raw(base, base_result)
        kind_of = {s.name: s.kind for s in self.space.sites}
        weights = dict(self._weights)
        for term in TERMS:  # a term unmeasured anywhere (no costs, no SQNR) is left out
            if not any(math.isfinite(r.raw[term]) for r in rows):
                weights[term] = 0.0
        bounds: dict[tuple[str, str], tuple[float, float]] = {}
        for term in TERMS:
            for kind in set(kind_of.values()):
                vals = [r.raw[term] for r in rows if kind_of[r.site] == kind and math.isfinite(r.raw[term])]
                if vals:
                    bounds[(kind, term)] = (min(vals), max(vals))
        out = []
        for r in rows:
            quality = {t: _quality(r.raw[t], bounds.get((kind_of[r.site], t)), higher_is_better=t == "sensitivity")
                       for t in TERMS if weights[t] > 0}
            out.append(UnifiedScore(site=r.site, choice=r.choice, raw=r.raw, quality=quality,
                                    score=harmonic_score(quality, weights, self.options.floor)))
        return out

    def combined(self, base: Policy) -> Policy:
        """Per site, the candidate with the highest score (ties: space order); else the base's."""
        choices = list(base.choices)
        best: dict[str, float] = {}
        for row in self.scores(base):
            i = next(j for j, s in enumerate(self.space.sites) if s.name == row.site)
            if math.isfinite(row.score) and row.score > best.get(row.site, -math.inf):
                best[row.site], choices[i] = row.score, row.choice
        return self.space.policy(choices)

    def best(self) -> tuple[Policy, EvalResult] | None:
        """The metric's combined policy once measured (if it succeeded), else the best evaluated."""
        base = self.base()
        if base is not None and self._told_key(base) and not any(not self._told_key(p) for p in self.changes(base)):
            chosen = self.combined(base)
            result = self.result_of(chosen)
            if result is not None and result.ok:
                return chosen, result
        return super().best()

    def report(self, policy: Policy) -> dict[str, Any]:
        """``{"provenance": {...}, "metrics": {}}``: the per-site scores behind the answer."""
        base = self.base()
        rows = self.scores(base) if base is not None else []
        return {"provenance": {"strategy": self.name, "weights": dict(self._weights), "floor": self.options.floor,
                               "cost_source": self.latency.source if self.latency is not None else None,
                               "scores": [r.to_dict() for r in rows]},
                "metrics": {}}


def _quality(x: float, bounds: tuple[float, float] | None, *, higher_is_better: bool) -> float:
    """Min-max quality in [0, 1] (1 = best); an unmeasured value gets 0, a flat term 1."""
    if bounds is None or not math.isfinite(x):
        return 0.0
    lo, hi = bounds
    if hi - lo <= 0:
        return 1.0
    return (x - lo) / (hi - lo) if higher_is_better else (hi - x) / (hi - lo)


def _json(x: float) -> float | None:
    return x if math.isfinite(x) else None

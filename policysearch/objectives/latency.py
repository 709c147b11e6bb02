"""Latency-aware objectives and constraints: a policy's latency predicted from a cost profile.

A policy's **relative latency** is its predicted time divided by the float model's, both from a
cost profile (``policysearch profile --model M``, ``policysearch.profile/v1``)::
    latency(policy) = (linear + sum over sites of t[site, method]) / (linear + sum over sites of t[site, fp32])

where ``t[site, method]`` is the profiled median time of ``method``'s kernel at the site's input
shape (at the method's default output bits; a site's ``@bits`` choice is timed as its method) and
``linear`` is the time of the linear layers (the same in every policy). Without a profile the
method catalogue's costs (``policysearch.methods.load_cost_profile``) are used when they are set:
they know neither site shapes nor linear layers, so that fallback is the relative cost of the
non-linear sites alone, every site weighing as much as any other (a coarse proxy).

The metric ``latency`` is derived by the search driver, not by the evaluator (it needs the
policy and the profile, no forward pass): :func:`evaluator_objective` strips it (and ``error``,
``1 - top1``) from what a worker computes, and :func:`derive_metrics` adds them to each result and
recomputes its objective values. Presets:
* ``latency``: relative latency, minimised;
* ``latency_weighted``: ``error + lambda * latency``, minimised; ``lambda`` =
  :data:`DEFAULT_LAMBDA` (0.1: 10% less latency is worth one point of top-1), the weight of
  ``latency`` in the preset (copy ``policysearch/presets/objectives/latency_weighted.yaml`` to change it, or build one
  with :func:`latency_weighted`);
* ``accuracy_and_latency``: top-1 maximised and relative latency minimised (two objectives, for
  ``nsga2`` / ``tpe``: their Pareto front is in the study).

:class:`Constraints` (``--max-latency R``, ``--min-top1 A``) chooses a run's answer: the best
feasible policy, else the one with the least total shortfall, marked infeasible.

This module imports neither torch nor optuna (strategies read it).
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policysearch.errors import ConfigError
from policysearch.identity import profile_path, rank_key
from policysearch.methods import catalogue
from policysearch.objectives.objective import METRICS, Objective
from policysearch.policy import Policy
from policysearch.result import EvalResult

__all__ = [
    "DEFAULT_LAMBDA",
    "DERIVED_METRICS",
    "PROFILE_FORMAT",
    "Constraints",
    "LatencyModel",
    "derive_metrics",
    "evaluator_objective",
    "feasibility_text",
    "latency_model",
    "latency_weighted",
    "read_profile",
    "relative_latency",
    "resolve_profile",
    "uses_metric",
]

log = logging.getLogger(__name__)

PROFILE_FORMAT = "policysearch.profile/v1"
#: the weight of relative latency in ``latency_weighted`` (error + lambda x latency)
DEFAULT_LAMBDA = 0.1
#: metrics the driver derives for each result (the evaluator never computes them)
DERIVED_METRICS = ("latency", "error")

METRICS.setdefault("latency", "predicted latency relative to the float model, from the cost profile "
                              "(policysearch profile); derived by the driver")
METRICS.setdefault("error", "top-1 error, 1 - top1; derived by the driver")


def _profile_hint(model: str | None) -> str:
    return f"run `policysearch profile --model {model or 'MODEL'}` first, or pass --profile FILE"


def latency_weighted(lam: float = DEFAULT_LAMBDA) -> Objective:
    """The ``latency_weighted`` objective with weight ``lam``: minimise error + lam x latency."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0 <= lam < math.inf):
        raise ConfigError(f"latency weight lambda must be a non-negative number, got {lam!r}")
    return Objective(name="latency_weighted", directions=("minimize",),
                     values=((("error", 1.0), ("latency", float(lam))),))


# -- the profile ---------------------------------------------------------------------------------
def read_profile(path: str | Path) -> dict[str, Any]:
    """A cost profile document, checked for its format (one clear error otherwise)."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"the cost profile {path} does not exist; {_profile_hint(None)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the cost profile {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise ConfigError(f"{path} is not a {PROFILE_FORMAT} cost profile; {_profile_hint(None)}")
    return doc


def _ms(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
        raise ConfigError(f"the cost profile's {where} is not a finite time in ms: {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class LatencyModel:
    """Predicted time per (site, method) plus a fixed time; :meth:`relative` divides by float's.

    ``site_ms``: site name -> method -> time (ms, or relative units for the catalogue fallback);
    ``kind_cost``: kind -> method -> cost for sites not in ``site_ms`` (the catalogue fallback,
    fp32 = 1); ``fixed_ms``: the linear layers (the same in every policy).
    """

    source: str
    fixed_ms: float = 0.0
    site_ms: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    kind_cost: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    model: str | None = None

    @classmethod
    def from_profile(cls, profile: str | Path | Mapping[str, Any]) -> LatencyModel:
        """From a profile document or its path: per-site kernel times and the linear total."""
        if isinstance(profile, Mapping):
            doc, source = profile, str(profile.get("path", "profile document"))
            if doc.get("format") != PROFILE_FORMAT:
                raise ConfigError(f"the profile document is not {PROFILE_FORMAT}; {_profile_hint(doc.get('model'))}")
        else:
            doc, source = read_profile(profile), str(profile)
        kernels: dict[tuple[str, tuple[int, ...], str], float] = {}
        hint = _profile_hint(doc.get("model"))
        for k in doc.get("kernels", ()) or ():
            try:
                key = (k["kind"], tuple(k["shape"]), k["method"])
                kernels[key] = _ms(k["median_ms"], f"kernel {k['kind']}/{k['method']}")
            except (KeyError, TypeError):
                raise ConfigError(f"{source}: malformed kernel entry {str(k)[:80]}; {hint}") from None
        site_ms: dict[str, dict[str, float]] = {}
        for s in doc.get("sites", ()) or ():
            try:
                name, kind, shape = s["name"], s["kind"], tuple(s["shape"])
            except (KeyError, TypeError):
                raise ConfigError(f"{source}: malformed site entry {str(s)[:80]}; {hint}") from None
            times = {m: kernels[(kk, sh, m)] for (kk, sh, m) in kernels if kk == kind and sh == shape}
            times.update({m: _ms(v, f"site {name} method {m}") for m, v in (s.get("ms") or {}).items()})
            if "fp32" not in times:
                raise ConfigError(f"{source}: site {name} has no fp32 time; {hint}")
            site_ms[name] = times
        if not site_ms:
            raise ConfigError(f"{source} profiles no site; {hint}")
        totals = doc.get("totals_ms") or {}
        if "linear" in totals:
            fixed = _ms(totals["linear"], "linear total")
        else:
            fixed = sum(_ms(lin.get("median_ms"), f"linear layer {lin.get('name')}") for lin in doc.get("linear", ()) or ())
        return cls(source=source, fixed_ms=fixed, site_ms=site_ms, model=doc.get("model"))

    @classmethod
    def from_catalogue(cls) -> LatencyModel | None:
        """From the method catalogue's cost slots (``None`` when no cost is set)."""
        costs: dict[str, dict[str, float]] = {}
        for spec in catalogue():
            if spec.cost is not None:
                costs.setdefault(spec.kind, {})[spec.name] = spec.cost
        if not costs:
            return None
        for per in costs.values():
            per.setdefault("fp32", 1.0)
        return cls(source="catalogue costs", kind_cost=costs)

    def cost(self, site: Any, method: str) -> float:
        """The predicted time of ``method`` at ``site`` (a Site); an unprofiled one is an error."""
        times = self.site_ms.get(site.name)
        if times is None:
            times = self.kind_cost.get(site.kind)
            if times is None:
                what = f"site {site.name}" if self.site_ms else f"{site.kind} sites"
                raise ConfigError(f"the latency profile ({self.source}) has no {what}; "
                                  f"{_profile_hint(self.model)}")
        try:
            return times[method]
        except KeyError:
            raise ConfigError(f"the latency profile ({self.source}) has no timing of {site.kind}/{method} "
                              f"at {site.name}; {_profile_hint(self.model)}") from None

    def float_ms(self, sites: Sequence[Any]) -> float:
        """The float model's predicted time: every site in fp32, plus the fixed part."""
        return self.fixed_ms + sum(self.cost(s, "fp32") for s in sites)

    def check(self, sites: Sequence[Any]) -> None:
        """Raise one clear error unless every site is profiled (its fp32 time at least)."""
        for s in sites:
            self.cost(s, "fp32")

    def predict(self, policy: Policy) -> dict[str, float]:
        """``ms`` (fixed + sites), ``sites_ms``, ``fixed_ms``, ``float_ms`` and ``relative``."""
        sites = sum(self.cost(site, choice.method) for site, choice in policy.items())
        base = self.float_ms(policy.sites)
        return {"ms": self.fixed_ms + sites, "sites_ms": sites, "fixed_ms": self.fixed_ms, "float_ms": base,
                "relative": (self.fixed_ms + sites) / base if base > 0 else math.nan}

    def relative(self, policy: Policy) -> float:
        """The policy's predicted latency relative to the float model."""
        return self.predict(policy)["relative"]


def latency_model(profile: str | Path | Mapping[str, Any] | LatencyModel | None = None, *,
                  model: str | None = None) -> LatencyModel:
    """A :class:`LatencyModel` from ``profile`` (a document, a path or a model), else from the
    catalogue's costs when set, else one error saying to profile ``model`` first."""
    if isinstance(profile, LatencyModel):
        return profile
    if profile is not None:
        return LatencyModel.from_profile(profile)
    fallback = LatencyModel.from_catalogue()
    if fallback is None:
        raise ConfigError(f"no latency profile and no method costs in the catalogue: {_profile_hint(model)}")
    return fallback


def relative_latency(policy: Policy, profile: str | Path | Mapping[str, Any] | LatencyModel | None = None) -> float:
    """``policy``'s latency relative to the float model, predicted from ``profile`` (a profile
    document or path; ``None``: the catalogue's costs, else an error saying to profile first)."""
    return latency_model(profile).relative(policy)


def resolve_profile(profile: str | None, *, model: str, results_dir: str | Path, needed: bool) -> LatencyModel | None:
    """The search's latency model: ``profile`` when given, else
    ``<results_dir>/profiles/<model>-cpu-b8.json`` when ``needed`` and it exists, else the
    catalogue's costs, else one error; ``None`` when not needed and no profile is given."""
    if profile is not None:
        return LatencyModel.from_profile(profile)
    if not needed:
        return None

    default = profile_path(model, "cpu", 8, results_dir)
    if default.is_file():
        log.info("latency from the cost profile %s", default)
        return LatencyModel.from_profile(default)
    fallback = LatencyModel.from_catalogue()
    if fallback is None:
        raise ConfigError(f"a latency objective or constraint needs a cost profile and {default} does not exist: "
                          f"{_profile_hint(model)}")
    log.info("no cost profile at %s: latency from the method catalogue's costs (non-linear sites only)", default)
    return fallback


# -- derived metrics -----------------------------------------------------------------------------
def uses_metric(objective: Objective, metric: str) -> bool:
    """Whether any value of ``objective`` weighs ``metric``."""
    return any(m == metric for terms in objective.values for m, _ in terms)


def evaluator_objective(objective: Objective) -> Objective:
    """``objective`` without its derived-metric terms (what a worker can compute); itself if none."""
    if not any(uses_metric(objective, m) for m in DERIVED_METRICS):
        return objective
    values = tuple(tuple((m, w) for m, w in terms if m not in DERIVED_METRICS) for terms in objective.values)
    return Objective(name=objective.name, values=values, directions=objective.directions)


def derive_metrics(result: EvalResult, policy: Policy, *, objective: Objective, latency: LatencyModel | None,
                   fresh: bool) -> EvalResult:
    """``result`` with ``latency`` (when a latency model is given) and ``error`` (when the
    objective uses it) added to its metrics and its values recomputed under ``objective``.

    ``fresh``: straight from an evaluator (its ``error`` stands); otherwise a result read back from
    a study, whose only possible error with metrics is a value that could not be computed before
    (so it is recomputed). A result without metrics (a failed evaluation) is returned unchanged.
    """
    wants_error = uses_metric(objective, "error")
    if not result.metrics or (latency is None and not wants_error):
        return result
    metrics = dict(result.metrics)
    if latency is not None:
        metrics["latency"] = latency.relative(policy)
    if wants_error:
        metrics["error"] = 1.0 - float(metrics.get("top1", math.nan))
    return EvalResult(values=objective.compute(metrics), metrics=metrics, sites=result.sites,
                      error=result.error if fresh else None, images=result.images)


# -- constraints ---------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Constraints:
    """``max_latency``: relative latency at most this; ``min_top1``: top-1 (a fraction) at least this."""

    max_latency: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_latency", "min_top1"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number, got {v!r}")
        if self.max_latency is not None and self.max_latency <= 0:
            raise ConfigError(f"--max-latency is a latency relative to float (e.g. 0.9), got {self.max_latency}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise ConfigError(f"--min-top1 is a fraction in [0, 1] (0.75 for 75%), got {self.min_top1}")

    @property
    def active(self) -> bool:
        return self.max_latency is not None or self.min_top1 is not None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("max_latency", self.max_latency), ("min_top1", self.min_top1)) if v is not None}

    def shortfall(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """How far ``metrics`` miss each constraint (only the missed ones; a missing or non-finite
        metric misses by ``inf``)."""
        out: dict[str, float] = {}
        if self.max_latency is not None:
            lat = float(metrics.get("latency", math.nan))
            miss = lat - self.max_latency if math.isfinite(lat) else math.inf
            if miss > 0:
                out["latency"] = miss
        if self.min_top1 is not None:
            top1 = float(metrics.get("top1", math.nan))
            miss = self.min_top1 - top1 if math.isfinite(top1) else math.inf
            if miss > 0:
                out["top1"] = miss
        return out

    def choose(self, best: tuple[Policy, EvalResult] | None, candidates: Sequence[tuple[Policy, EvalResult]],
               directions: Sequence[str]) -> tuple[tuple[Policy, EvalResult] | None, dict[str, Any]]:
        """The answer and its feasibility record: ``best`` (the strategy's pick) when feasible,
        else the best feasible candidate by the objectives, else the candidate with the least total
        shortfall (ties by the objectives), marked ``"feasible": False`` with its ``shortfall``."""

        ok = [(p, r) for p, r in candidates if r.ok]
        feasible = [(p, r) for p, r in ok if not self.shortfall(r.metrics)]
        if best is not None and best[1].ok and not self.shortfall(best[1].metrics):
            chosen = best
        elif feasible:
            chosen = min(feasible, key=lambda pr: rank_key(pr[1], directions))
        elif ok:
            chosen = min(ok, key=lambda pr: (sum(self.shortfall(pr[1].metrics).values()), rank_key(pr[1], directions)))
        else:
            chosen = best
        info: dict[str, Any] = {"constraints": self.to_dict(), "feasible_count": len(feasible),
                                "evaluated": len(ok)}
        if chosen is not None:
            miss = self.shortfall(chosen[1].metrics)
            info.update(feasible=not miss, shortfall={k: _jsonable(v) for k, v in miss.items()})
            if miss:
                log.warning("no evaluated policy meets %s; exporting the closest one (short by %s), marked infeasible",
                            self.text(), ", ".join(f"{k} {v:.4g}" for k, v in miss.items()))
        return chosen, info

    def text(self) -> str:
        parts = []
        if self.max_latency is not None:
            parts.append(f"latency <= {self.max_latency:g}x float")
        if self.min_top1 is not None:
            parts.append(f"top-1 >= {100 * self.min_top1:.2f}%")
        return " and ".join(parts)


def _jsonable(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


def feasibility_text(info: Mapping[str, Any]) -> str:
    """One line on the answer's feasibility under the run's constraints (for the CLI summary)."""
    cons = Constraints(**info.get("constraints", {}))
    if info.get("feasible"):
        return (f"constraints ({cons.text()}): met ({info.get('feasible_count')} of {info.get('evaluated')} "
                "evaluated policies meet them)")
    miss = ", ".join(f"{k} by {v if isinstance(v, str) else f'{v:.4g}'}"
                     for k, v in info.get("shortfall", {}).items())
    return (f"constraints ({cons.text()}): NOT met by any evaluated policy; the closest is exported, "
            f"marked infeasible (short: {miss})")

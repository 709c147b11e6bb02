"""The ceiling of a run, and paired comparisons of its answer with the best uniform method.

The *ceiling* is the run's quantized linear layers and bit widths with every non-linear site in
float (``fp32``: the float operator on the tensor the integer pipeline hands the site). It is
what a choice of non-linear methods could at best give back; the *headroom* is the ceiling minus
the best uniform method. Both are measured as ordinary evaluations (the ceiling trial has kind
``ceiling``) and compared per image: top-1 in points from per-image correctness, KL in nats from
per-image KL(float || quantized), each with the paired 95% interval of
:func:`policysearch.stats.paired_difference`.

The *verdict* compares the strategy's answer with the best uniform method the same way, and
names the best evaluated policy by the run's objective (uniform baselines included, the ceiling
only where the space allows it), and whether it is measurably better than the answer: the
objective is evaluated per image where every term has a per-image form (``top1``, ``agreement``,
``kl``; ``latency`` is the same for every image of a policy), else only its values are compared.

The best uniform method is the uniform baseline (``fp32`` excluded) with the highest top-1, ties
and unlabelled data by the lowest KL.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from policysearch.objectives.objective import Objective
from policysearch.policy import Choice, Policy
from policysearch.result import EvalResult
from policysearch.stats import paired_difference

__all__ = ["CEILING_METHOD", "Comparison", "Headroom", "Interval", "Verdict", "best_uniform", "ceiling_policy",
           "compare", "headroom", "per_image_objective", "verdict"]

#: the method of every site in the ceiling policy
CEILING_METHOD = "fp32"
_SHOWN = ("top1", "agreement", "kl", "logit_sqnr")


def ceiling_policy(space: Any) -> Policy:
    """Every site of ``space`` in float, at the space's weight and activation bits (whether or not
    the space allows ``fp32``: the ceiling is measured, never searched)."""
    return Policy(sites=space.sites, choices=tuple(Choice(method=CEILING_METHOD) for _ in space.sites),
                  weight_bits=space.weight_bits, act_bits=space.act_bits)


@dataclass(frozen=True, kw_only=True)
class Interval:
    """A paired difference and its 95% interval."""

    diff: float
    low: float
    high: float

    @property
    def measurable(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def text(self, spec: str = "+.2f") -> str:
        return f"{self.diff:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def to_dict(self) -> dict[str, float]:
        return {"diff": self.diff, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Interval | None":
        return None if not data else cls(diff=float(data["diff"]), low=float(data["low"]), high=float(data["high"]))


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """``a`` minus ``b`` paired over ``images`` evaluation images: top-1 in points, KL in nats
    (None where a result has no per-image scores, or no labels for top-1)."""

    a: str
    b: str
    images: int
    top1: Interval | None
    kl: Interval | None

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "images": self.images,
                "top1": self.top1.to_dict() if self.top1 else None, "kl": self.kl.to_dict() if self.kl else None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Comparison":
        return cls(a=str(data["a"]), b=str(data["b"]), images=int(data.get("images", 0)),
                   top1=Interval.from_dict(data.get("top1")), kl=Interval.from_dict(data.get("kl")))


def compare(a_name: str, a: EvalResult, b_name: str, b: EvalResult) -> Comparison:
    """``a`` minus ``b`` per image (see :class:`Comparison`)."""
    if a.images is None or b.images is None or a.images.n != b.images.n or not (a.ok and b.ok):
        return Comparison(a=a_name, b=b_name, images=0, top1=None, kl=None)
    x, y = a.images.arrays(), b.images.arrays()
    top1 = None
    if x["correct"] is not None and y["correct"] is not None:
        top1 = Interval(**dict(zip(("diff", "low", "high"), paired_difference(x["correct"], y["correct"], scale=100))))
    kl = Interval(**dict(zip(("diff", "low", "high"), paired_difference(x["kl"], y["kl"]))))
    return Comparison(a=a_name, b=b_name, images=a.images.n, top1=top1, kl=kl)


def _shown(result: EvalResult) -> dict[str, float]:
    return {k: float(result.metrics[k]) for k in _SHOWN if k in result.metrics}


def best_uniform(baselines: Mapping[str, EvalResult]) -> str | None:
    """The uniform method with the highest top-1 (ties, and no labels: the lowest KL); ``fp32``
    only when it is the sole baseline."""
    ok = {m: r for m, r in baselines.items() if r.ok}
    pool = {m: r for m, r in ok.items() if m != CEILING_METHOD} or ok

    def key(item: tuple[str, EvalResult]) -> tuple[float, float]:
        top1, kl = (float(item[1].metrics.get(k, math.nan)) for k in ("top1", "kl"))
        return (-top1 if math.isfinite(top1) else math.inf, kl if math.isfinite(kl) else math.inf)

    return min(pool.items(), key=key)[0] if pool else None


# -- headroom ---------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Headroom:
    """Float, ceiling, best uniform and answer (top-1, agreement, KL, logit SQNR), and the
    headroom = ceiling minus the best uniform method, paired per image."""

    rows: Mapping[str, Mapping[str, float]]
    best_uniform: str | None
    headroom: Comparison

    @property
    def top1_measurable(self) -> bool | None:
        """Whether the top-1 headroom interval excludes 0 (None: not measured)."""
        return None if self.headroom.top1 is None else self.headroom.top1.measurable

    def to_dict(self) -> dict[str, Any]:
        return {"ceiling_policy": f"{CEILING_METHOD} at every site, same linear layers and bits",
                "rows": {k: dict(v) for k, v in self.rows.items()}, "best_uniform": self.best_uniform,
                "headroom": self.headroom.to_dict(), "top1_headroom_measurable": self.top1_measurable}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Headroom":
        return cls(rows={k: dict(v) for k, v in data.get("rows", {}).items()}, best_uniform=data.get("best_uniform"),
                   headroom=Comparison.from_dict(data["headroom"]))


def headroom(*, float_metrics: Mapping[str, float], ceiling: EvalResult, baselines: Mapping[str, EvalResult],
             answer: EvalResult) -> Headroom:
    """The run's :class:`Headroom`."""
    method = best_uniform(baselines)
    rows: dict[str, dict[str, float]] = {"float": {"top1": float(float_metrics.get("top1", math.nan)),
                                                   "agreement": 1.0, "kl": 0.0},
                                         "ceiling": _shown(ceiling)}
    if method is not None:
        rows["best_uniform"] = _shown(baselines[method])
        comp = compare("ceiling", ceiling, f"uniform {method}", baselines[method])
    else:
        comp = Comparison(a="ceiling", b="uniform (none succeeded)", images=0, top1=None, kl=None)
    rows["answer"] = _shown(answer)
    return Headroom(rows=rows, best_uniform=method, headroom=comp)


# -- verdict ----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The answer against the best uniform method, and the best evaluated policy by the objective.

    ``best``: ``{"label", "policy", "values", "metrics"}`` of the best evaluated policy (the answer
    itself when nothing beats it; None for an objective with several values); ``best_vs_answer``:
    its objective minus the answer's, paired per image where the objective allows;
    ``best_measurably_better``: True/False from that interval, None where there is none."""

    objective: str
    direction: str | None
    #: the answer's objective value(s)
    answer_values: tuple[float, ...]
    #: ``"uniform <method>"`` when the answer is a uniform policy, else None
    answer_is: str | None
    answer_vs_uniform: Comparison
    best: Mapping[str, Any] | None
    best_is_answer: bool
    best_vs_answer: Interval | None
    best_measurably_better: bool | None
    export_command: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "direction": self.direction, "answer_values": list(self.answer_values),
                "answer_is": self.answer_is,
                "answer_vs_best_uniform": self.answer_vs_uniform.to_dict(), "best": self.best,
                "best_is_answer": self.best_is_answer,
                "best_vs_answer": self.best_vs_answer.to_dict() if self.best_vs_answer else None,
                "best_measurably_better": self.best_measurably_better, "export_command": self.export_command}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Verdict":
        return cls(objective=str(data.get("objective")), direction=data.get("direction"),
                   answer_values=tuple(float(x) for x in data.get("answer_values", ())),
                   answer_is=data.get("answer_is"),
                   answer_vs_uniform=Comparison.from_dict(data["answer_vs_best_uniform"]), best=data.get("best"),
                   best_is_answer=bool(data.get("best_is_answer")),
                   best_vs_answer=Interval.from_dict(data.get("best_vs_answer")),
                   best_measurably_better=data.get("best_measurably_better"),
                   export_command=data.get("export_command"))


#: per-image forms of the metrics (from :meth:`PerImage.arrays`); ``latency`` is per policy
_PER_IMAGE = {"top1": lambda a: a["correct"], "agreement": lambda a: a["agree"], "kl": lambda a: a["kl"],
              "error": lambda a: None if a["correct"] is None else 1.0 - a["correct"]}
_PER_POLICY = ("latency",)


def per_image_objective(objective: Objective, result: EvalResult) -> Any:
    """The objective's single value per evaluation image (its mean is the value), or None where a
    term has no per-image form, the objective has several values, or the result no scores."""
    if len(objective.values) != 1 or result.images is None or not result.ok:
        return None
    arrays = result.images.arrays()
    total = np.zeros(result.images.n)
    for metric, weight in objective.values[0]:
        if metric in _PER_IMAGE and (v := _PER_IMAGE[metric](arrays)) is not None:
            total = total + weight * np.asarray(v, dtype=np.float64)
        elif metric in _PER_POLICY and metric in result.metrics:
            total = total + weight * float(result.metrics[metric])
        else:
            return None
    return total


def _rank(result: EvalResult, direction: str) -> float:
    v = result.values[0] if result.ok and result.values else math.nan
    if not math.isfinite(v):
        return math.inf
    return -v if direction == "maximize" else v


def _entry(label: str, policy: Policy, result: EvalResult) -> dict[str, Any]:
    return {"label": label, "policy": policy.to_dict(), "values": list(result.values),
            "metrics": {**dict(result.metrics), "sites": {k: v.to_dict() for k, v in result.sites.items()}}}


def verdict(*, objective: Objective, answer: tuple[Policy, EvalResult], baselines: Mapping[str, EvalResult],
            uniform: Mapping[str, Policy], evaluated: Iterable[tuple[Policy, EvalResult]],
            export_command: str, feasible: Any = None) -> Verdict:
    """The run's :class:`Verdict`. ``evaluated``: the strategy's evaluations in the space;
    ``uniform``: the uniform policies of ``baselines``; ``feasible(result) -> bool``: under
    constraints, the policies ``best`` may be (None: all); ``export_command``: the command that
    exports ``best``, named when it is measurably better."""
    policy, result = answer
    method = best_uniform(baselines)
    comp = (compare("answer", result, f"uniform {method}", baselines[method]) if method is not None
            else Comparison(a="answer", b="uniform (none succeeded)", images=0, top1=None, kl=None))
    labels = {p.key(): f"uniform {m}" for m, p in uniform.items()}
    head = {"objective": objective.name, "answer_values": tuple(result.values), "answer_is": labels.get(policy.key()),
            "answer_vs_uniform": comp}
    labels[policy.key()] = "the answer"
    pool: dict[str, tuple[Policy, EvalResult]] = {policy.key(): (policy, result)}
    for p, r in [*evaluated, *((uniform[m], r) for m, r in baselines.items() if m in uniform)]:
        if r.ok and (feasible is None or feasible(r)):
            pool.setdefault(p.key(), (p, r))
    if len(objective.directions) != 1:
        return Verdict(**head, direction=None, best=None,
                       best_is_answer=False, best_vs_answer=None, best_measurably_better=None, export_command=None)
    direction = objective.directions[0]
    # the answer first: it wins ties
    best_p, best_r = min(pool.values(), key=lambda pr: (_rank(pr[1], direction), pr[0].key() != policy.key()))
    is_answer = best_p.key() == policy.key()
    interval, better = None, None
    if not is_answer:
        a, b = per_image_objective(objective, best_r), per_image_objective(objective, result)
        if a is not None and b is not None and len(a) == len(b):
            interval = Interval(**dict(zip(("diff", "low", "high"), paired_difference(a, b))))
            better = interval.low > 0 if direction == "maximize" else interval.high < 0
    label = labels.get(best_p.key(), "another evaluated policy")
    return Verdict(**head, direction=direction,
                   best=_entry(label, best_p, best_r), best_is_answer=is_answer, best_vs_answer=interval,
                   best_measurably_better=better, export_command=None if is_answer else export_command)


"""Plain sentences on a run's headroom and on its answer (console summary, dashboard notes, report).

They read the ``headroom`` and ``verdict`` records of ``run.json``
(:class:`policysearch.objectives.headroom.Headroom` / ``Verdict`` as dicts), never objects in memory.
Top-1 differences are in points, KL differences in nats; every interval is the paired 95% one
over the evaluation images.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from policysearch.objectives.headroom import Comparison, Headroom, Interval, Verdict

__all__ = ["comparison_text", "headroom_lines", "headroom_rows", "headroom_sentence", "report_lines", "verdict_lines",
           "verdict_sentence"]


def _pct(v: Any) -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{100 * float(v):.2f}%"


def _kl(v: Any) -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.5f}"


def _judge(iv: Interval | None, *, higher_is_better: bool) -> str:
    if iv is None:
        return "not measured"
    if not iv.measurable:
        return "no measurable difference"
    return "better" if (iv.low > 0) == higher_is_better else "worse"


def comparison_text(comp: Comparison) -> str:
    """``top-1 -2.30 [-3.41, -1.19] points (worse), KL +0.01234 [...] nats (worse)`` for ``a`` - ``b``."""
    parts = []
    if comp.top1 is not None:
        parts.append(f"top-1 {comp.top1.text('+.2f')} points ({_judge(comp.top1, higher_is_better=True)})")
    if comp.kl is not None:
        parts.append(f"KL {comp.kl.text('+.5f')} nats ({_judge(comp.kl, higher_is_better=False)})")
    return ", ".join(parts) if parts else "no per-image scores to compare"


def headroom_sentence(data: Mapping[str, Any]) -> str:
    """The plain sentence on what a choice of non-linear methods can gain."""
    h = Headroom.from_dict(data)
    uni = h.best_uniform or "none"
    top1, kl = h.headroom.top1, h.headroom.kl
    if top1 is None:
        return (f"Without labelled images the headroom is on fidelity only: the ceiling's KL minus uniform {uni}'s "
                f"is {kl.text('+.5f') if kl else 'not measured'} nats.")
    if not top1.measurable and kl is not None and not kl.high < 0:
        return (f"No choice of non-linear methods can measurably beat the best uniform method ({uni}) on this "
                "model and data, in top-1 or in KL to the float model.")
    if not top1.measurable:
        return (f"No choice of non-linear methods can measurably beat the best uniform method ({uni}) in top-1 "
                "on this model and data; fidelity (KL to the float model) is what is left to gain.")
    if top1.low > 0:
        return (f"A choice of non-linear methods can gain up to {top1.diff:.2f} [{top1.low:.2f}, {top1.high:.2f}] "
                f"points of top-1 over the best uniform method ({uni}) on this model and data.")
    return (f"Every non-linear site in float is measurably worse in top-1 than uniform {uni} on this model and "
            "data, so no choice of non-linear methods is needed to beat it there; compare policies on KL.")


def headroom_rows(data: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(head, rows): float, ceiling, best uniform and answer on top-1, agreement and KL."""
    h = Headroom.from_dict(data)
    rows = [[f"uniform {h.best_uniform}" if key == "best_uniform" else key, _pct(m.get("top1")),
             _pct(m.get("agreement")), _kl(m.get("kl"))] for key, m in h.rows.items()]
    return ["policy", "top-1", "agree", "KL"], rows


def _headroom_line(data: Mapping[str, Any]) -> str:
    h = Headroom.from_dict(data)
    return (f"headroom = ceiling - uniform {h.best_uniform} (paired 95%, {h.headroom.images} images): "
            + comparison_text(h.headroom))


def headroom_lines(data: Mapping[str, Any]) -> list[str]:
    """Float, ceiling, best uniform and answer, the headroom with its intervals, and the sentence."""
    head, rows = headroom_rows(data)
    lines = [f"{head[0]:24s}" + "".join(f"{c:>10s}" for c in head[1:])]
    lines += [f"{r[0]:24s}" + "".join(f"{c:>10s}" for c in r[1:]) for r in rows]
    return [*lines, _headroom_line(data), headroom_sentence(data)]


def report_lines(run: Mapping[str, Any]) -> list[str]:
    """The headroom and verdict paragraphs of a run record (the HTML report's section)."""
    lines = [_headroom_line(run["headroom"]), headroom_sentence(run["headroom"])] if run.get("headroom") else []
    return lines + (verdict_lines(run["verdict"]) if run.get("verdict") else [])


def verdict_sentence(data: Mapping[str, Any]) -> str:
    """One sentence: the answer against the best uniform method."""
    v = Verdict.from_dict(data)
    comp = v.answer_vs_uniform
    uni = comp.b
    if v.answer_is is not None and v.answer_is == comp.b:
        return f"The answer is {uni} itself, the best uniform method."
    judged = {name: _judge(iv, higher_is_better=hib) for name, iv, hib in
              (("top-1", comp.top1, True), ("KL", comp.kl, False)) if iv is not None}
    if not judged:
        return f"The answer and {uni} have no per-image scores to compare."
    by = {j: [m for m, x in judged.items() if x == j] for j in ("better", "worse", "no measurable difference")}
    if not by["better"] and not by["worse"]:
        return f"The answer and {uni} do not differ measurably ({' or '.join(judged)})."
    parts = [f"{j} than {uni} on {' and '.join(by[j])}" for j in ("better", "worse") if by[j]]
    if by["no measurable difference"]:
        parts.append(f"does not differ measurably on {' and '.join(by['no measurable difference'])}")
    return f"The answer is {' and '.join(parts)}.".replace("is does not", "does not")


def _best_sentence(v: Verdict) -> str:
    if v.best is None:
        return (f"The objective {v.objective} has several values: there is no single best policy to compare "
                "(see the non-dominated trials in the study).")
    if v.best_is_answer:
        return f"By the run's objective ({v.objective}) the answer is the best evaluated policy."
    label = v.best["label"]
    values = [f"{x[0]:.5g}" if x else "n/a" for x in (v.best.get("values"), v.answer_values)]
    how = f"{v.objective} {values[0]} against {values[1]}"
    command = f"; export it with: {v.export_command}" if v.export_command else ""
    if v.best_measurably_better:
        return (f"{label[0].upper()}{label[1:]} is measurably better than the answer by the run's objective "
                f"({v.objective}: difference {v.best_vs_answer.text('+.4g')}){command}.")
    if v.best_measurably_better is False:
        return (f"{label[0].upper()}{label[1:]} has a better {v.objective} than the answer, but not measurably "
                f"(difference {v.best_vs_answer.text('+.4g')} includes 0){command}.")
    return (f"{label[0].upper()}{label[1:]} has a better {v.objective} than the answer ({how}); this objective has "
            f"no per-image form, so no interval{command}.")


def verdict_lines(data: Mapping[str, Any]) -> list[str]:
    """The verdict: the answer against the best uniform method, then the best evaluated policy."""
    v = Verdict.from_dict(data)
    comp = v.answer_vs_uniform
    lines = []
    if comp.top1 is not None or comp.kl is not None:
        lines.append(f"answer - {comp.b} (paired 95%, {comp.images} images): {comparison_text(comp)}")
    lines += [verdict_sentence(data), _best_sentence(v)]
    return lines

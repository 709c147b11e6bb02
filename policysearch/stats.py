"""Paired comparison of two classifiers on the same images (used by every results table).

Two policies evaluated on the same test images are compared per image: ``d_i = c_a,i - c_b,i``
with ``c`` = 1 for a correct prediction, so ``d_i`` is -1, 0 or 1. The difference of top-1 is
the mean of ``d`` and its 95% interval the normal one, ``mean ± 1.96 · sd(d) / sqrt(n)``: on
10,000 images that is tight where the two models disagree on few images, which an unpaired
interval (two binomials) would hide.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["best_of", "cell", "format_interval", "paired_difference", "paired_interval", "top1_percent"]


def paired_interval(a: Any, b: Any, labels: Any) -> tuple[float, float, float]:
    """(difference, low, high) of top-1 ``a`` - ``b`` in points, from per-image predictions."""
    a, b, y = (np.asarray(v).reshape(-1) for v in (a, b, labels))
    if not (a.shape == b.shape == y.shape):
        raise ValueError(f"paired_interval needs predictions on the same images: {a.shape}, {b.shape}, {y.shape}")
    return paired_difference(a == y, b == y, scale=100)


def paired_difference(a: Any, b: Any, *, scale: float = 1.0) -> tuple[float, float, float]:
    """(difference, low, high) of the means of per-image values ``a`` - ``b`` (e.g. per-image
    correctness, or per-image KL), times ``scale``: the same normal 95% interval over
    ``d_i = a_i - b_i`` as :func:`paired_interval`."""
    a, b = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs values on the same images: {a.shape}, {b.shape}")
    d = a - b
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return scale * mean, scale * (mean - half), scale * (mean + half)


def top1_percent(pred: Any, labels: Any) -> float:
    return 100 * float((np.asarray(pred).reshape(-1) == np.asarray(labels).reshape(-1)).mean())


def format_interval(d: tuple[float, float, float]) -> str:
    """``+0.12 [-0.05, +0.29]``; a ``*`` marks an interval that excludes 0 (a real difference)."""
    real = d[1] > 0 or d[2] < 0
    return f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]" + ("*" if real else "")


def best_of(preds: dict[str, Any], labels: Any) -> str | None:
    """The key of the highest top-1 among ``preds`` (None values: failed runs; None: every one failed)."""
    ok = [k for k, p in preds.items() if p is not None]
    return max(ok, key=lambda k: top1_percent(preds[k], labels)) if ok else None


def cell(pred: Any, best: Any, labels: Any, *, is_best: bool = False) -> str:
    """A results table's cell: ``top-1 (difference from best [paired 95% interval])``; the best in bold."""
    if pred is None:
        return "failed"
    if is_best:
        return f"**{top1_percent(pred, labels):.2f}** (best)"
    if best is None:
        return f"{top1_percent(pred, labels):.2f}"
    return f"{top1_percent(pred, labels):.2f} ({format_interval(paired_interval(pred, best, labels))})"

"""Paired intervals and the results tables' cells (policysearch.stats)."""
import math

import numpy as np
import pytest
import torch

from policysearch.stats import best_of, cell, format_interval, paired_interval, top1_percent


def test_paired_interval_matches_the_formula():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 1000)
    a = np.where(rng.random(1000) < 0.9, y, (y + 1) % 10)
    b = np.where(rng.random(1000) < 0.8, y, (y + 1) % 10)
    d = (a == y).astype(float) - (b == y)
    diff, lo, hi = paired_interval(a, b, y)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert diff == pytest.approx(100 * d.mean()) and hi - lo == pytest.approx(200 * half)
    assert lo > 0  # 90% against 80% on 1000 images is not noise
    assert paired_interval(a, a, y) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        paired_interval(a, b[:10], y)


def test_interval_marks_only_differences_that_exclude_zero():
    assert format_interval((1.0, 0.5, 1.5)).endswith("*")
    assert not format_interval((0.1, -0.2, 0.4)).endswith("*")


def test_cells_compare_with_the_best():
    y = torch.tensor([0, 1, 2, 3])
    preds = {"a": torch.tensor([0, 1, 2, 0]), "b": torch.tensor([0, 1, 2, 3]), "c": None}
    assert best_of(preds, y) == "b" and best_of({"c": None}, y) is None
    assert cell(preds["b"], preds["b"], y, is_best=True) == "**100.00** (best)"
    assert cell(preds["a"], preds["b"], y).startswith("75.00 (-25.00 [")
    assert cell(None, preds["b"], y) == "failed"
    assert top1_percent(preds["a"], y) == 75.0

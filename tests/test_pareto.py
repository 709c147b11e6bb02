"""The Pareto-front table of a run (reproduce/pareto.py)."""
import json

import pytest

from policysearch.errors import ConfigError
from scripts import load_script

_pareto = load_script("pareto")
main, pareto_rows = _pareto.main, _pareto.pareto_rows


def _record(evals):
    return {"name": "r", "evaluations": evals, "config": {"model": "m", "strategy": "nsga2"},
            "objective": {"name": "accuracy_and_latency"}, "answer": {"policy": "b"}}


def _e(key, lat, top1, error=None):
    return {"policy": key, "latency": lat, "top1": top1, "kl": 0.01, "error": error,
            "counts": {"gelu": {"relu": 1}}}


def test_front_keeps_only_non_dominated_policies_sorted_by_latency():
    evals = [_e("a", 2.0, 0.90), _e("b", 1.5, 0.91), _e("c", 1.2, 0.80), _e("d", 3.0, 0.95),
             _e("e", 1.6, 0.85), _e("f", 1.0, 0.99, error="nan logits")]
    front, n = pareto_rows(_record(evals))
    assert [e["policy"] for e in front] == ["c", "b", "d"] and n == 5  # a, e dominated by b; f failed


def test_table_file_and_errors(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    rec = {"format": "policysearch.run/v1", **_record([_e("a", 2.0, 0.9), _e("b", 1.5, 0.91)])}
    (run / "run.json").write_text(json.dumps(rec))
    out = tmp_path / "p.md"
    assert main(["r", "--results-dir", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 1.500 | 91.00 |" in text and "(answer)" in text and "| 2.000 |" not in text
    assert "python reproduce/pareto.py r" in text
    with pytest.raises(ConfigError, match="no evaluation with a latency"):
        pareto_rows(_record([{"policy": "a", "top1": 0.9, "error": None}]))

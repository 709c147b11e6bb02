"""The reproduction scripts of reproduce/: their committed records are JSON, and they render from it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from policysearch.errors import PolicySearchError
from policysearch.numerics import NUMERICS_VERSION
from scripts import REPRODUCE, load_script

ROOT = REPRODUCE.parent


def test_the_scripts_live_outside_the_package() -> None:
    for name in ("finetune_tables", "table2", "zoo_table", "pareto", "train_zoo", "make_sample"):
        assert (REPRODUCE / f"{name}.py").is_file()
    for old in ("finetune/tables.py", "report/table2.py", "report/zoo_table.py", "report/pareto.py",
                "models/zoo/train.py", "models/zoo/make_sample.py"):
        assert not (ROOT / "policysearch" / old).exists(), old


def test_committed_results_keep_no_state_in_markdown() -> None:
    for md in (ROOT / "results").glob("*.md"):
        assert "-state" not in md.read_text(), md
    kept = load_script("finetune_tables").read_kept(ROOT / "results" / "finetune" / "kept.json")
    assert kept and all(r.command and r.numerics for r in kept.values())
    state = json.loads((ROOT / "results" / "table2.json").read_text())
    assert state["rows"] and state["commands"] and state["numerics"]


def test_table2_renders_from_its_json_record(tmp_path: Path) -> None:
    table2 = load_script("table2")
    record, out = tmp_path / "t.json", tmp_path / "t.md"
    with pytest.raises(PolicySearchError, match="run this script first"):
        table2.render_file(record, out)
    rows = ["| m | paper | W8A8 | float | 90.00 | | | |"]
    table2.write_state(record, rows=rows, commands=["python reproduce/table2.py --bits 8"], n=10, data="d", db=20)
    assert json.loads(record.read_text())["numerics"] == NUMERICS_VERSION
    table2.render_file(record, out)
    text = out.read_text()
    assert rows[0] in text and "`python reproduce/table2.py --bits 8`" in text and "10 evaluation images of `d`" in text
    record.write_text(json.dumps({"format": "other"}))
    with pytest.raises(PolicySearchError, match="not a Table 2 record"):
        table2.render_file(record, out)

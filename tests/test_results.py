"""The committed results agree with what quotes them, and say which numerics made them.

Every figure the README's results section quotes (a number with a decimal point or a %) must appear
in the results file that line links to; every ``results/*.md`` and every section of
``docs/results.md`` states the numerics version it was made with, and a file made with another
version than the current code's says that it was not regenerated.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from policysearch.errors import PolicySearchError
from policysearch.numerics import NUMERICS_VERSION
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "results").glob("*.md"))
LINK = re.compile(r"\]\(((?:\.\./)?(?:results/[\w.-]+\.md|docs/results\.md|results\.md))(?:#[\w-]*)?\)")
FIGURE = re.compile(r"(?<![A-Za-wyz0-9_.])[-+]?(\d+(?:\.\d+)?)(%)?")  # "x1.64" is a figure, "W8A8" none
NUMERICS = re.compile(r"^Numerics: .*?(?=\n\s*\n|\Z)", re.MULTILINE | re.DOTALL)  # the paragraph
VERSION = re.compile(r"\bnumerics (?:version )?\(?(\d{4}\.\d+\.\d+)")


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of a Markdown text."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert m, f"no '## {title}' section"
    return m.group(1)


def quoted_items(text: str) -> list[str]:
    """The paragraphs and bullets of a section, each joined into one line."""
    items: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            items.append([])
        elif line.startswith("- ") or not items:
            items.append([line])
        else:
            items[-1].append(line.strip())
    return [" ".join(i) for i in items if i]


def figures(item: str) -> list[str]:
    """The figures an item quotes: numbers with a decimal point or a %, without sign and %."""
    prose = re.sub(r"\[[^\]]*\]\([^)]*\)|`[^`]*`", " ", item)  # link targets and code are not figures
    return [m.group(1) for m in FIGURE.finditer(prose) if "." in m.group(1) or m.group(2)]


def appears(figure: str, text: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(figure)}(?![\d])", text) is not None


def cited(target: str) -> Path:
    return ROOT / ("docs/results.md" if target.endswith("docs/results.md") or target == "results.md"
                   else target.removeprefix("../"))


def test_every_figure_the_readme_quotes_is_in_the_file_it_cites() -> None:
    items = quoted_items(section((ROOT / "README.md").read_text(), "Results"))
    problems, checked = [], 0
    for item in items:
        figs = figures(item)
        if not figs:
            continue
        targets = [cited(t) for t in LINK.findall(item)]
        if not targets:
            problems.append(f"README quotes {figs} without linking the results file they come from: {item[:90]!r}")
            continue
        texts = {t: t.read_text() for t in targets if t.is_file()}
        problems += [f"README links {t.relative_to(ROOT)}, which does not exist" for t in targets if t not in texts]
        for fig in figs:
            checked += 1
            if texts and not any(appears(fig, x) for x in texts.values()):
                names = ", ".join(str(t.relative_to(ROOT)) for t in texts)
                problems.append(f"README quotes {fig} but {names} does not contain it: {item[:90]!r}")
    assert not problems, "\n".join(problems)
    assert checked, "the README's results section quotes no figure: the parser no longer finds them"


def numerics_problems(name: str, text: str) -> list[str]:
    lines = [" ".join(p.split()) for p in NUMERICS.findall(text)]
    if not lines:
        return [f"{name} states no numerics version (a line 'Numerics: made with numerics X ...')"]
    problems = []
    for line in lines:
        versions = VERSION.findall(line)
        if not versions and "before numerics versions existed" not in line and "does not apply" not in line:
            problems.append(f"{name}: {line!r} names no numerics version")
        if any(v != NUMERICS_VERSION for v in versions) and "not regenerated" not in line:
            problems.append(f"{name}: {line!r} was made with another numerics version than the current "
                            f"{NUMERICS_VERSION}: regenerate it (its command is in the file) or say 'not regenerated'")
    return problems


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_results_file_states_its_numerics_version(path: Path) -> None:
    problems = numerics_problems(str(path.relative_to(ROOT)), path.read_text())
    assert not problems, "\n".join(problems)


def test_every_section_of_the_results_log_states_its_numerics_version() -> None:
    text = (ROOT / "docs" / "results.md").read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert sections
    problems = [p for s in sections for p in numerics_problems(f"docs/results.md, '## {s.splitlines()[0]}'", s)]
    assert not problems, "\n".join(problems)


def test_the_checks_fail_usefully() -> None:
    assert figures("top-1 90.05% against 89.97 at 2 threads, 10,000 images, x1.64 ([a](results/x.md))") == [
        "90.05", "89.97", "1.64"]
    assert appears("89.8", "| 89.80 | 89.8 |") and not appears("89.8", "| 89.81 |")
    assert numerics_problems("f.md", "no statement") == ["f.md states no numerics version (a line 'Numerics: "
                                                         "made with numerics X ...')"]
    old = "Numerics: made with numerics 2000.1.1."
    assert "regenerate it" in numerics_problems("f.md", old)[0]
    assert not numerics_problems("f.md", "Numerics: made with an earlier numerics version (2000.1.1); not regenerated.")
    assert not numerics_problems("f.md", f"Numerics: made with numerics {NUMERICS_VERSION}, the current code's.")


def test_zoo_md_is_rendered_from_its_committed_record(tmp_path: Path) -> None:
    zoo = load_script("zoo_table")
    out = tmp_path / "zoo.md"
    zoo.render_file(ROOT / "results" / "zoo.json", out)
    assert out.read_text() == (ROOT / "results" / "zoo.md").read_text(), \
        "results/zoo.md differs from its record: python reproduce/zoo_table.py --render"


def test_zoo_record_states_its_numerics_and_refuses_to_mix_versions(tmp_path: Path) -> None:
    zoo = load_script("zoo_table")
    record, out = tmp_path / "z.json", tmp_path / "z.md"
    with pytest.raises(PolicySearchError, match="run this script first"):
        zoo.render_file(record, out)
    row = "| m | paper | W8A8 | 90.00 | **90.10** (best) | 1.00 | 2.00 | 3.00 |"
    zoo.write_state(record, rows=[row], commands=["python reproduce/zoo_table.py --bits 8"], n=10, data="d",
                    device="cpu", seconds=1.0)
    state = json.loads(record.read_text())
    assert state["numerics"] == NUMERICS_VERSION and state["n"] == 10
    zoo.render_file(record, out)
    text = out.read_text()
    assert row in text and "`python reproduce/zoo_table.py --bits 8`" in text and "10 evaluation images of `d`" in text
    assert not numerics_problems("z.md", text)
    assert zoo._previous(record, "d")["rows"] == [row]
    with pytest.raises(PolicySearchError, match="same data"):
        zoo._previous(record, "other")
    record.write_text(json.dumps({**state, "numerics": "2000.1.1"}))
    with pytest.raises(PolicySearchError, match="regenerate them instead of --append"):
        zoo._previous(record, "d")
    zoo.render_file(record, out)
    assert "earlier numerics version (2000.1.1)" in out.read_text() and not numerics_problems("z.md", out.read_text())
    record.write_text(json.dumps({"format": "other"}))
    with pytest.raises(PolicySearchError, match="not a zoo table record"):
        zoo.render_file(record, out)


def test_a_zoo_run_keeps_an_earlier_table_until_it_covers_its_wiring(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    zoo = load_script("zoo_table")
    record, out = tmp_path / "z.json", tmp_path / "z.md"
    kept = {"title": "native, kept", "wiring": "native", "about": "measured earlier", "numerics": None,
            "commit": "abc1234", "columns": ["model", "top-1"], "rows": ["| m | 80.00 |"]}
    zoo.write_state(record, rows=[], commands=["old"], n=10, data="d", device="cpu", seconds=1.0, kept=[kept])

    def fake_table(models, data, bits, device, wirings, eval_size=None, on_row=None):  # noqa: ANN001, ANN202
        return [f"| m | {w} | W8A8 | 90.00 | **90.10** (best) | 1.00 | 2.00 | 3.00 |" for w in wirings], 10

    monkeypatch.setattr(zoo, "build_table", fake_table)
    monkeypatch.setattr(zoo, "resolve_device", lambda d: "cpu")

    def run(*argv: str) -> dict:
        monkeypatch.setattr("sys.argv", ["zoo_table.py", *argv])
        zoo._run(zoo.argparse.Namespace(data="d", append="--append" in argv, wirings=[argv[0]], models=["m"],
                                        bits=[8], eval_size=None, device="cpu"), out, record)
        return json.loads(record.read_text())

    state = run("paper")
    assert state["kept"] == [kept] and "measured earlier" in out.read_text() and "before numerics versions" in \
        out.read_text()
    state = run("native", "--append")
    assert state["kept"] == [] and len(state["rows"]) == 2 and len(state["commands"]) == 2

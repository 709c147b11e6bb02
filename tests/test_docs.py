"""The docs tell the truth: their Python examples run on a freshly exported policy file."""
import json
import re
from pathlib import Path

import pytest

from policysearch.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    args = ["run", "--strategy", "sqnr_drop", "--model", "test_fmnist_vit", "--eval-size", "48",
            "--calib-size", "32", "--run-name", "doc", "--no-progress", "--results-dir", str(root / "results")]
    assert main(args) == 0
    assert main(["export", "doc", "--results-dir", str(root / "results"), "--out", str(root / "policy.json")]) == 0
    return root


def test_policy_format_examples_run(exported, monkeypatch, capsys):
    monkeypatch.chdir(exported)
    blocks = _blocks((DOCS / "policy-format.md").read_text(), "python")
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code, "policy-format.md", "exec"), {})
    out = capsys.readouterr().out
    assert "blocks.0.attn.softmax" in out and "top-1 on 256 images" in out


def test_policy_format_example_json_is_valid():
    from policysearch.policy import validate_json

    (block,) = _blocks((DOCS / "policy-format.md").read_text(), "json")
    validate_json(json.loads(block), source="docs example")


def test_readme_links_stay_inside_the_repository():
    text = README.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert "../shared" not in text
    for link in links:
        assert not link.startswith(("http://", "https://", "..")), link
        assert (README.parent / link.split("#")[0]).exists(), link

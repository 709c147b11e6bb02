"""The docs tell the truth: their Python examples run on a freshly exported policy file, every command
they show parses (`policysearch ...` with the real argument parser, `python -m MODULE` names a module
that exists, `python SCRIPT.py --flag` a script that exists and takes that flag), every link points
at a file of the repository, and the README stays a README (short, linking every page of docs/)."""
import contextlib
import importlib.util
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from policysearch.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_BYTES = 10_500


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    args = ["run", "--strategy", "sqnr_drop", "--model", "test_fmnist_vit", "--eval-size", "48",
            "--calib-size", "32", "--run-name", "doc", "--no-progress", "--results-dir", str(root / "results")]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(args) == 0
    (root / "run-output.txt").write_text(out.getvalue())
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


def test_api_examples_run(tmp_path, monkeypatch, capsys):
    """docs/api.md's blocks run in order, in one namespace (each continues the one before)."""
    monkeypatch.chdir(tmp_path)
    blocks = _blocks((DOCS / "api.md").read_text(), "python")
    assert len(blocks) == 2
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "api.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert re.search(r"top-1 \d+\.\d\d% \(float \d+\.\d\d%\) on 200 images, KL .* calibrated on 64 images", out)
    assert re.search(r"my-vit: top-1 \d+\.\d\d% on 200 images", out)
    assert isinstance(namespace["qmodel"], torch.nn.Module) and (tmp_path / "results" / "my-vit" / "run.json").is_file()


def test_policy_format_example_json_is_valid():
    from policysearch.policy import validate_json

    (block,) = _blocks((DOCS / "policy-format.md").read_text(), "json")
    validate_json(json.loads(block), source="docs example")



# ---- every page: links stay inside the repository and resolve, anchors included ---------------------
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve_inside_the_repository(page):
    text = page.read_text()
    assert "../shared" not in text and "](http" not in text
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert not link.startswith(("http://", "https://", "/")), f"{page.name}: {link}"
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_relative_to(ROOT) and target.exists(), f"{page.name}: {link}"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{page.name}: {link} (no such heading)"


# ---- the README is a README --------------------------------------------------------------------------
def test_readme_is_short_and_links_every_docs_page():
    assert README.stat().st_size < README_MAX_BYTES, f"README.md is {README.stat().st_size} bytes"
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in re.findall(r"\]\(([^)#]+)[^)]*\)", README.read_text())}
    pages = sorted(DOCS.glob("*.md"))
    assert {"usage.md", "cluster.md", "results.md", "architecture.md", "policy-format.md", "api.md"} <= {p.name for p in pages}
    for page in pages:
        assert page.resolve() in linked, f"README.md does not link docs/{page.name}"


def test_readme_setup_is_the_two_commands():
    setup = README.read_text().split("## Set-up", 1)[1]
    assert _blocks(setup, "bash")[0].splitlines() == [
        'pip install -e ".[dev]" && policysearch run --strategy sqnr_diff', "python -m pytest -q"]


def test_readme_first_run_output_is_what_the_run_prints(exported):
    """Every code span of the README's list "It ends by printing" is in a run's printed summary
    (placeholders NAME, N, M, <run> stand for any value; options and the default name are skipped)."""
    section = README.read_text().split("## The first run", 1)[1].split("\n## ", 1)[0]
    bullets = section.split("It ends by printing", 1)[1].split("\n\n", 2)[1]
    spans = [s for s in re.findall(r"`([^`]+)`", bullets) if not s.startswith("--") and "<time>" not in s]
    assert len(spans) >= 10, spans
    printed = (exported / "run-output.txt").read_text()
    for span in spans:
        pattern = re.escape(span).replace("NAME", r"\S+").replace("<run>", r"\S+").replace("results/", r"\S*results/")
        pattern = re.sub(r"\b[NM]\b", r"\\d+", pattern)
        assert re.search(pattern, printed), f"README's `{span}` is not in the run's output:\n{printed}"


# ---- every command a page shows parses -----------------------------------------------------------------
def _commands(text: str) -> list[str]:
    """Shell commands of the bash blocks (continuations joined, comments dropped) and inline code spans,
    split at ``&&``; only those starting with ``policysearch`` or ``python``."""
    found = []
    for block in _blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(re.sub(r"\s+#.*$", "", line))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += re.findall(r"`([^`]+)`", prose)
    commands = []
    for chunk in found:
        for cmd in chunk.split("&&"):
            cmd = " ".join(cmd.split())
            if re.match(r"(policysearch|python) ", cmd):
                commands.append(cmd)
    return commands


def _page_commands() -> list[tuple[str, str]]:
    return [(page.name, cmd) for page in PAGES for cmd in _commands(page.read_text())]


def test_pages_show_commands():
    names = {name for name, _ in _page_commands()}
    assert {"README.md", "usage.md", "cluster.md", "results.md"} <= names


@pytest.mark.parametrize(("page", "command"), _page_commands())
def test_command_parses(page, command):
    argv = shlex.split(command)
    if argv[0] == "policysearch":
        if len(argv) == 2:  # a subcommand named in prose ("the `policysearch run` process")
            assert argv[1] in build_parser()._subparsers._group_actions[0].choices, command
            return
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as exc:
            pytest.fail(f"{page}: `{command}` does not parse (exit {exc.code})")
    elif argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, f"{page}: no module {argv[2]}"
    else:
        script = ROOT / argv[1]
        assert script.suffix == ".py" and script.is_file(), f"{page}: no script {argv[1]}"
        source = script.read_text()
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert f'"{flag}"' in source, f"{page}: {argv[1]} takes no {flag}"

"""reproduce/headroom.py: its quick mode writes a record whose rows are paired with the best
uniform method, and the Markdown renders from that record alone."""
from __future__ import annotations

import json

import pytest

from policysearch.errors import PolicySearchError
from policysearch.numerics import NUMERICS_VERSION
from scripts import load_script

headroom = load_script("headroom")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("headroom")
    out = tmp / "headroom.md"
    argv = ["--quick", "--data", "fmnist-sample", "--strategies", "sqnr_output", "--spaces", "paper", "data_aware",
            "--random-models", "deit_tiny_patch16_224", "--random-img-size", "32",
            "--out", str(out), "--work-dir", str(tmp / "work")]
    headroom.main(argv)
    return out, json.loads(out.with_suffix(".json").read_text())


@pytest.mark.slow
def test_record(quick):
    _, rec = quick
    assert rec["format"] == headroom.FORMAT and rec["numerics"] == NUMERICS_VERSION
    assert rec["commands"][0].startswith("python reproduce/headroom.py --quick")
    zoo, rnd = rec["blocks"]
    assert (zoo["model"], zoo["weights"], zoo["bits"], zoo["images"]) == ("fmnist_vit", "zoo", 8, 32)
    labels = [r["label"] for r in zoo["rows"]]
    assert labels[:2] == ["float", "ceiling"]
    uniform = {lab for lab in labels if lab.startswith("uniform ")}
    assert {"uniform ibert", "uniform fqvit", "uniform ivit", "uniform poly_gelu", "uniform fit_exp"} <= uniform
    assert zoo["best_uniform"] in uniform
    answers = [r for r in zoo["rows"] if r["kind"] == "answer"]
    assert [(r["label"], r["space"], r["search_images"]) for r in answers] == [
        ("sqnr_output", "paper", 16), ("sqnr_output", "data_aware", 16)]
    for row in zoo["rows"]:
        assert "_arrays" not in row
        if row["label"] == zoo["best_uniform"]:
            assert "vs_best_uniform" not in row
            continue
        vs = row["vs_best_uniform"]
        assert set(vs) == {"top1", "kl", "agreement"}
        assert vs["kl"]["low"] <= vs["kl"]["diff"] <= vs["kl"]["high"]
    ceiling = next(r for r in zoo["rows"] if r["label"] == "ceiling")
    assert 0 <= ceiling["metrics"]["kl"] and ceiling["metrics"]["logit_sqnr"] > 0
    # random weights: no top-1 anywhere, the best uniform by KL
    assert (rnd["weights"], rnd["labels"], rnd["images"]) == ("random", False, 4)
    assert rnd["model_args"] == {"num_classes": 10, "img_size": 32}
    assert all("top1" not in r.get("metrics", {}) and "top1" not in r.get("vs_best_uniform", {}) for r in rnd["rows"])
    kls = {r["label"]: r["metrics"]["kl"] for r in rnd["rows"] if r["kind"] == "uniform"}
    assert rnd["best_uniform"] == min(kls, key=kls.get)


@pytest.mark.slow
def test_markdown_renders_from_the_record(quick, tmp_path):
    out, rec = quick
    text = out.read_text()
    assert NUMERICS_VERSION in text and "python reproduce/headroom.py --quick" in text
    assert "## Summary" in text and "best uniform" in text
    assert "fmnist_vit, W8A8" in text and "deit_tiny_patch16_224 (random weights" in text
    again = tmp_path / "again.md"
    headroom.main(["--render", "--record", str(out.with_suffix(".json")), "--out", str(again)])
    assert again.read_text() == text


def test_render_needs_a_record(tmp_path):
    with pytest.raises(PolicySearchError, match="run this script first"):
        headroom.main(["--render", "--out", str(tmp_path / "none.md")])


def test_append_replaces_blocks_of_the_same_model_and_bits():
    a = {"model": "m", "weights": "zoo", "bits": 8, "rows": [1]}
    b = {"model": "m", "weights": "zoo", "bits": 6, "rows": [2]}
    merged = headroom.merge([a, b], [{**a, "rows": [3]}])
    assert [(x["bits"], x["rows"]) for x in merged] == [(8, [3]), (6, [2])]

import json

import pytest

from policysearch.policy import (
    Choice,
    Policy,
    PolicyDocument,
    PolicyError,
    document_from_json,
    read_policy,
    write_policy,
)
from policysearch.sites import Site

SITES = (
    Site(name="blocks.0.norm1", kind="layernorm"),
    Site(name="blocks.0.attn.softmax", kind="softmax"),
    Site(name="blocks.0.mlp.act", kind="gelu"),
)


def test_uniform_with_fallback_and_counts():
    p = Policy.uniform(SITES, "fqvit", fallback={"gelu": "ibert"})
    assert [c.method for c in p.choices] == ["fqvit", "fqvit", "ibert"]
    assert p.method_counts() == {"softmax": {"fqvit": 1}, "gelu": {"ibert": 1}, "layernorm": {"fqvit": 1}}


def test_uniform_without_fallback_rejects_missing_method():
    with pytest.raises(PolicyError, match="not allowed for gelu"):
        Policy.uniform(SITES, "fqvit")


def test_hashable_and_replace():
    p = Policy.uniform(SITES, "ivit")
    q = p.replace({"blocks.0.mlp.act": "relu"})
    assert p != q and hash(p) == hash(Policy.uniform(SITES, "ivit"))
    assert q["blocks.0.mlp.act"] == Choice(method="relu")
    assert len({p, q, Policy.uniform(SITES, "ivit")}) == 2
    assert p.replace(act_bits=6).act_bits == 6


def test_choice_parse():
    assert Choice.parse("ivit@6") == Choice(method="ivit", bits=6)
    with pytest.raises(PolicyError):
        Choice.parse("ivit@x")
    with pytest.raises(PolicyError):
        Choice(method="ivit", bits=40)


def test_round_trip(tmp_path):
    p = Policy.uniform(SITES, "ivit", act_bits=6).replace({"blocks.0.attn.softmax": "ibert@8"})
    path = write_policy(tmp_path / "p.json", p, model={"name": "fmnist_vit"}, metrics={"top1": 0.9})
    doc = read_policy(path)
    assert doc.policy == p
    assert doc.metrics["top1"] == 0.9 and doc.model["name"] == "fmnist_vit"
    data = json.loads(path.read_text())
    assert data["format"] == "policysearch.policy/v1"
    assert [s["name"] for s in data["sites"]] == [s.name for s in SITES]


def _doc():
    return PolicyDocument(policy=Policy.uniform(SITES, "ivit")).to_json()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["sites"][2].update(method="fqvit"), "not allowed for gelu"),
        (lambda d: d["sites"][0].update(method="bogus"), "not allowed for layernorm"),
        (lambda d: d["sites"][1].update(kind="matmul"), "sites/1"),
        (lambda d: d.update(format="other/v9"), "format"),
        (lambda d: d["quantization"].update(weight_bits=1), "weight_bits"),
        (lambda d: d["sites"].append(dict(d["sites"][0])), "appears twice"),
        (lambda d: d.pop("sites"), "sites"),
        (lambda d: d["sites"][0].update(extra=1), "extra"),
    ],
)
def test_rejects_bad_documents(mutate, message):
    data = _doc()
    mutate(data)
    with pytest.raises(PolicyError, match=message):
        document_from_json(data)


def test_rejects_bad_files(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        read_policy(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        read_policy(bad)


def test_from_mapping_unknown_and_missing_sites():
    with pytest.raises(PolicyError, match="unknown site"):
        Policy.from_mapping(SITES, {"nope": "ivit", **{s.name: "ivit" for s in SITES}})
    with pytest.raises(PolicyError, match="no choice"):
        Policy.from_mapping(SITES, {"blocks.0.norm1": "ivit"})

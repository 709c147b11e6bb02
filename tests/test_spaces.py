"""Search spaces: presets, built-ins, overrides, bit choices, uniform policies, clear errors."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

import policysearch.methods as catalogue
from fake_eval import SITES, small_space
from policysearch.errors import ConfigError
from policysearch.policy import Choice
from policysearch.spaces import (
    KIND_METHODS,
    SPACES,
    SearchSpace,
    Site,
    list_spaces,
    load_space,
)

ROOT = Path(__file__).resolve().parents[1]
SOFTMAX, GELU, LN = "blocks.0.attn.softmax", "blocks.0.mlp.act", "blocks.0.norm1"


def methods(space, site):
    return [str(c) for c in space.choices(site)]


# -- presets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_spaces())
def test_preset_files_equal_builtins(name):
    data = yaml.safe_load((ROOT / "policysearch" / "presets" / "spaces" / f"{name}.yaml").read_text())
    assert data.pop("name") == name
    assert data == SPACES.get(name)


def test_every_preset_file_is_a_builtin():
    assert sorted(p.stem for p in (ROOT / "policysearch" / "presets" / "spaces").glob("*.yaml")) == list_spaces()
    assert {"paper", "all", "gelu_less", "mixed_bits"} <= set(list_spaces())
    assert not (ROOT / "policysearch" / "presets" / "spaces" / "__init__.py").exists()


def test_paper_space():
    space = load_space("paper", SITES)
    assert methods(space, SOFTMAX) == ["ibert", "fqvit", "ivit"]
    assert methods(space, GELU) == ["ibert", "ivit"]
    assert methods(space, LN) == ["ibert", "fqvit", "ivit"]
    assert space.name == "paper" and space.size() == 3**5 * 2
    uniform = space.uniform_policies()
    assert list(uniform) == ["ibert", "fqvit", "ivit"]
    assert uniform["fqvit"][GELU].method == "ibert"  # FQ-ViT has no GELU
    assert all(c.method == "fqvit" for s, c in uniform["fqvit"].items() if s.kind != "gelu")
    assert all(space.contains(p) for p in uniform.values())


def test_all_and_gelu_less_spaces():
    space = load_space("all", SITES)
    for site in SITES:
        assert methods(space, site.name) == list(KIND_METHODS[site.kind])
    uniform = space.uniform_policies()
    assert list(uniform) == ["ibert", "fqvit", "ivit", "relu", "fp32", "fit_exp", "poly_gelu", "poly_gelu_fixed"]
    assert all(c.method == "fp32" for c in uniform["fp32"].choices)
    assert uniform["relu"][GELU].method == "relu" and uniform["relu"][SOFTMAX].method == "ibert"
    gelu_less = load_space("gelu_less", SITES)
    assert methods(gelu_less, GELU) == ["relu"] and methods(gelu_less, SOFTMAX) == ["ibert", "fqvit", "ivit"]
    assert all(p[GELU].method == "relu" for p in gelu_less.uniform_policies().values())


@pytest.mark.parametrize("act_bits, picked", [(8, 8), (6, 6), (4, 8)])
def test_mixed_bits_space(act_bits, picked):
    space = load_space("mixed_bits", SITES, act_bits=act_bits)
    assert methods(space, SOFTMAX) == ["ibert@6", "ibert@8", "fqvit@6", "fqvit@8", "ivit@6", "ivit@8"]
    assert methods(space, GELU) == ["ibert@6", "ibert@8", "ivit@6", "ivit@8"]
    assert methods(space, LN) == ["ibert", "fqvit", "ivit"]
    # uniform policies take the bits equal to act_bits, else the widest option
    assert space.uniform_policies()["ivit"][SOFTMAX] == Choice(method="ivit", bits=picked)


def test_local_preset_file_wins_then_builtin(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    assert methods(load_space("paper", SITES), GELU) == ["ibert", "ivit"]  # no file: built-in
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "paper.yaml").write_text("methods: {gelu: [relu]}\n")
    assert methods(load_space("paper", SITES), GELU) == ["relu"]
    explicit = tmp_path / "mine.yml"
    explicit.write_text("methods: {gelu: [ivit]}\n")
    space = load_space(str(explicit), SITES)
    assert space.name == "mine" and methods(space, GELU) == ["ivit"]
    assert methods(space, SOFTMAX) == list(KIND_METHODS["softmax"])  # a kind left out allows all


def test_unknown_space_lists_available(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="unknown space 'nope'; available: all, data_aware, gelu_less, mixed_bits, paper"):
        load_space("nope", SITES)
    with pytest.raises(ConfigError, match="does not exist"):
        load_space("missing.yaml", SITES)


# -- overrides and bits ----------------------------------------------------------------------------
def test_overrides_glob_regex_kind_and_order(caplog):
    preset = {
        "methods": {"softmax": ["ivit"], "gelu": ["ivit", "relu"], "layernorm": ["ivit"]},
        "bits": {"softmax": [6, 8]},
        "overrides": [
            {"match": "blocks.1.*", "methods": ["fp32"]},
            {"regex": r"blocks\.1\.attn\..*", "methods": ["ibert", "fqvit"]},  # later rule wins
            {"match": "*", "kind": "layernorm", "bits": [8]},  # bits only: keeps the methods
            {"match": "nothing.*", "methods": ["ivit"]},
        ],
    }
    with caplog.at_level(logging.WARNING):
        space = SearchSpace.from_preset(preset, SITES, act_bits=6)
    assert "'nothing.*' matches no site" in caplog.text
    assert methods(space, SOFTMAX) == ["ivit@6", "ivit@8"]
    assert methods(space, "blocks.1.attn.softmax") == ["ibert@6", "ibert@8", "fqvit@6", "fqvit@8"]
    assert methods(space, "blocks.1.norm1") == ["fp32"]  # fp32 takes no bits
    assert methods(space, "norm") == ["ivit@8"] and methods(space, LN) == ["ivit@8"]
    assert methods(space, GELU) == ["ivit", "relu"]
    assert space.act_bits == 6 and space.size() == 2 * 1 * 2 * 1 * 4 * 1


def test_regex_is_a_full_match():
    preset = {"methods": {}, "overrides": [{"regex": r"blocks\.0", "methods": ["fp32"]},
                                            {"regex": r"norm", "methods": ["ibert"]}]}
    space = SearchSpace.from_preset(preset, SITES)
    assert methods(space, LN) == list(KIND_METHODS["layernorm"]) and methods(space, "norm") == ["ibert"]


def test_uniform_fallback_order_is_documented_order():
    assert catalogue.fallback()[:3] == ["ibert", "ivit", "fqvit"]
    preset = {"methods": {"softmax": ["ibert", "fqvit", "ivit"], "gelu": ["ibert", "ivit"], "layernorm": ["ivit"]},
              "overrides": [{"match": SOFTMAX, "methods": ["fqvit", "ivit"]}]}
    uniform = SearchSpace.from_preset(preset, SITES).uniform_policies()
    assert uniform["ibert"][SOFTMAX].method == "ivit"  # ibert not allowed: ivit comes before fqvit
    assert uniform["ibert"][LN].method == "ivit" and uniform["fqvit"][GELU].method == "ibert"


# -- queries ---------------------------------------------------------------------------------------
def test_contains_size_and_dict_round_trip():
    space = small_space()
    policy = space.uniform_policies()["ivit"]
    assert space.contains(policy) and space.size() == 144
    assert not space.contains(policy.replace({GELU: "relu"}))
    assert not space.contains(policy.replace(act_bits=6))
    assert not space.contains(SearchSpace.from_preset({}, SITES[:3]).uniform_policies()["ivit"])
    data = space.to_dict()
    assert data["sites"][0] == {"name": LN, "kind": "layernorm", "choices": ["ibert", "ivit"]}
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert SearchSpace.from_dict(data) == space
    with pytest.raises(ConfigError, match="no site 'x'"):
        space.choices("x")


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, message", [
    ({"methods": {"softmax": ["relu"]}}, "site 'blocks.0.attn.softmax': method 'relu' is not allowed for softmax"),
    ({"methods": {"matmul": ["ivit"]}}, "unknown kind 'matmul' in 'methods'"),
    ({"bits": {"matmul": [8]}}, "unknown kind 'matmul' in 'bits'"),
    ({"method": {}}, "unknown key.* method; valid: bits, description"),
    ({"methods": ["ivit"]}, "'methods' must map kinds to lists"),
    ({"methods": {"softmax": []}}, "left with no choice: blocks.0.attn.softmax, blocks.1.attn.softmax"),
    ({"bits": {"softmax": [1]}}, r"bits of softmax must be an integer in \[2, 16\], got 1"),
    ({"bits": {"softmax": ["8"]}}, "must be an integer"),
    ({"overrides": [{"match": "*"}]}, "override 0: needs 'methods' and/or 'bits'"),
    ({"overrides": [{"methods": ["fp32"]}]}, "override 0: needs exactly one of 'match'"),
    ({"overrides": [{"match": "*", "regex": "x", "methods": ["fp32"]}]}, "exactly one of 'match'"),
    ({"overrides": [{"regex": "(", "methods": ["fp32"]}]}, "invalid regex"),
    ({"overrides": [{"match": "*", "methods": ["fqvit"]}]}, "method 'fqvit' is not allowed for gelu"),
    ({"overrides": [{"match": "*", "kind": "mlp", "methods": ["fp32"]}]}, "unknown kind 'mlp'"),
    ({"overrides": [{"match": "*", "method": ["fp32"]}]}, "override 0: unknown key.* method"),
    ({"overrides": ["blocks.0.*"]}, "override 0: expected a mapping"),
    ("paper", "expected a mapping"),
])
def test_bad_presets(preset, message):
    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_preset(preset, SITES)


def test_bad_spaces_built_directly():
    with pytest.raises(ConfigError, match="no sites"):
        SearchSpace(sites=(), options=())
    with pytest.raises(ConfigError, match="duplicate site"):
        SearchSpace(sites=(SITES[0], SITES[0]), options=(("ivit",), ("ivit",)))
    with pytest.raises(ConfigError, match="not allowed for gelu"):
        SearchSpace(sites=(Site(name="a", kind="gelu"),), options=(("fqvit",),))
    with pytest.raises(ConfigError, match="act_bits"):
        SearchSpace(sites=SITES[:1], options=(("ivit",),), act_bits=1)
    assert SearchSpace(sites=SITES[:1], options=(("ivit@6",),)).choices(LN) == (Choice(method="ivit", bits=6),)

"""The method catalogue: one declaration per method, read by kernels, spaces, policies and the schema."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from policysearch import kernels, methods
from policysearch.errors import PolicyError, PolicySearchError, UnknownNameError
from policysearch.kernels import KERNELS, register_kernel
from policysearch.methods import MethodSpec, catalogue, get_method, register_method
from policysearch.policy import Policy
from policysearch.schema import (
    build_policy_schema,
    catalogue_enums,
    load_policy_schema,
    schema_enums,
)
from policysearch.schema import (
    main as schema_main,
)
from policysearch.sites import KIND_METHODS, KINDS, Site, check_method

#: What each method consumed before the catalogue existed (policysearch.models.precision's rules).
EXPECTS = {
    ("softmax", "fp32"): "float", ("softmax", "ibert"): "accumulator", ("softmax", "fqvit"): "requant",
    ("softmax", "ivit"): "requant",
    ("gelu", "fp32"): "float", ("gelu", "ibert"): "accumulator", ("gelu", "ivit"): "requant",
    ("gelu", "relu"): "requant",
    ("layernorm", "fp32"): "float", ("layernorm", "ibert"): "requant", ("layernorm", "fqvit"): "ptf",
    ("layernorm", "ivit"): "requant",
}


def test_catalogue_declares_the_design_table():
    assert methods.kinds() == ["softmax", "gelu", "layernorm"]
    assert {k: methods.methods(k) for k in methods.kinds()} == {
        "softmax": ["fp32", "ibert", "fqvit", "ivit"],
        "gelu": ["fp32", "ibert", "ivit", "relu"],
        "layernorm": ["fp32", "ibert", "fqvit", "ivit"],
    }
    assert {(s.kind, s.name): s.expects for s in catalogue()} == EXPECTS
    for spec in catalogue():
        assert spec.integer_only == (spec.name != "fp32") and spec.cost is None and spec.summary
        assert get_method(spec.kind, spec.name) is spec and spec.key == f"{spec.kind}/{spec.name}"
    bits = {(s.kind, s.name): (s.out_bits, s.default_bits) for s in catalogue() if s.out_bits}
    assert bits == {("softmax", "ibert"): ((8, 16), 8), ("softmax", "fqvit"): ((4,), 4),
                    ("softmax", "ivit"): ((8, 16), 8), ("gelu", "ivit"): ((8,), 8)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_method("gelu", "relu").cost = 1.0  # type: ignore[misc]


def test_expects_agrees_with_the_precision_rules():
    from policysearch.models.precision import input_precision

    for spec in catalogue():
        got = input_precision(spec.kind, spec.name, bits=None, act_bits=8).source
        assert got == spec.expects, spec.key


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownNameError, match="unknown gelu method 'fqvit'; valid: fp32, ibert, ivit, relu"):
        get_method("gelu", "fqvit")
    with pytest.raises(UnknownNameError, match="unknown kind 'matmul'; valid: softmax, gelu, layernorm"):
        methods.methods("matmul")
    with pytest.raises(PolicySearchError):
        get_method("matmul", "ibert")
    with pytest.raises(UnknownNameError):
        get_method("softmax", ["not", "hashable"])  # type: ignore[arg-type]


@pytest.mark.parametrize("kw, message", [
    (dict(kind="conv", name="x", expects="float"), "unknown kind 'conv'"),
    (dict(kind="gelu", name="x", expects="int"), "expects='int'"),
    (dict(kind="gelu", name="x-y", expects="requant"), "identifier"),
    (dict(kind="gelu", name="x", expects="requant", out_bits=(8,)), "needs default_bits"),
    (dict(kind="gelu", name="x", expects="requant", out_bits=(8,), default_bits=4), "not one of out_bits"),
    (dict(kind="gelu", name="x", expects="requant", out_bits=(0,), default_bits=0), "positive integers"),
    (dict(kind="gelu", name="x", expects="float"), "cannot be integer-only"),
    (dict(kind="gelu", name="relu", expects="requant"), "already in the catalogue"),
])
def test_register_method_rejects_bad_entries(kw, message):
    before = catalogue()
    with pytest.raises(ValueError, match=message):
        register_method(**kw)
    assert catalogue() == before


def test_every_catalogue_entry_has_exactly_one_kernel_and_vice_versa():
    assert sorted(KERNELS.names()) == sorted(s.key for s in catalogue())
    for spec in catalogue():
        entry = KERNELS.get(spec.key)
        assert entry.spec is spec and entry.bits == spec.out_bits and entry.default_bits == spec.default_bits
        assert kernels.default_bits(spec.kind, spec.name) == spec.default_bits
    with pytest.raises(ValueError, match="already registered"):
        register_kernel("gelu", "relu", lambda **_: torch.nn.ReLU())
    with pytest.raises(UnknownNameError, match="unknown gelu method 'poly'"):
        register_kernel("gelu", "poly", lambda **_: torch.nn.ReLU())
    with pytest.raises(UnknownNameError):

        @register_kernel("conv", "ibert")
        def _factory(**_):
            return torch.nn.Identity()

    assert sorted(KERNELS.names()) == sorted(s.key for s in catalogue())


def test_create_takes_the_default_bits_from_the_catalogue():
    assert kernels.create("softmax", "fqvit").bits == get_method("softmax", "fqvit").default_bits == 4
    assert kernels.create("softmax", "ivit").output_bit == 8
    assert kernels.create("softmax", "ivit", bits=16).output_bit == 16
    with pytest.raises(ValueError, match="allowed: 8, 16"):
        kernels.create("softmax", "ibert", bits=4)


def test_every_list_derives_from_the_catalogue():
    assert list(KINDS) == list(KIND_METHODS) == kernels.kinds() == methods.kinds()
    for kind in methods.kinds():
        assert list(KIND_METHODS[kind]) == kernels.methods(kind) == methods.methods(kind)
        assert methods.methods(kind)[0] == "fp32"
    assert catalogue_enums() == {k: methods.methods(k) for k in methods.kinds()}


@pytest.fixture
def extra_method(monkeypatch):
    """A temporary catalogue entry ``gelu/poly`` (no kernel): the catalogue is restored after."""
    monkeypatch.setitem(methods._CATALOGUE, "gelu", dict(methods._CATALOGUE["gelu"]))
    return register_method("gelu", "poly", expects="requant", out_bits=(8,), default_bits=8,
                           summary="a test entry")


def test_one_new_entry_reaches_every_reader(extra_method):
    assert KIND_METHODS["gelu"][-1] == "poly" and kernels.methods("gelu")[-1] == "poly"
    check_method("gelu", "poly")
    policy = Policy(sites=(Site(name="b.act", kind="gelu"),), choices=("poly",))
    assert policy["b.act"].method == "poly"
    assert schema_enums(build_policy_schema())["gelu"][-1] == "poly"
    with pytest.raises(LookupError, match="no kernel is registered"):
        kernels.create("gelu", "poly")
    with pytest.raises(UnknownNameError):
        get_method("softmax", "poly")


def test_a_method_outside_the_catalogue_is_refused_by_policies():
    with pytest.raises(PolicyError, match="method 'poly' is not allowed for gelu; valid: fp32, ibert, ivit, relu"):
        Policy(sites=(Site(name="b.act", kind="gelu"),), choices=("poly",))
    with pytest.raises(ValueError, match="unknown kind 'conv'"):
        check_method("conv", "ibert")


# ---- the committed schema ------------------------------------------------------------------------
def test_committed_schema_enums_equal_the_catalogue():
    schema = load_policy_schema()
    assert schema_enums(schema) == catalogue_enums()
    assert build_policy_schema(schema) == schema  # regenerating changes nothing


def test_schema_regeneration(tmp_path, capsys, extra_method):
    path = tmp_path / "policy.schema.json"
    path.write_text(json.dumps(load_policy_schema()))
    assert schema_main(["--check", "--path", str(path)]) == 1  # the catalogue has gelu/poly now
    assert "differ from the method catalogue" in capsys.readouterr().err
    assert schema_main(["--path", str(path)]) == 0
    regenerated = json.loads(path.read_text())
    assert schema_enums(regenerated)["gelu"] == ["fp32", "ibert", "ivit", "relu", "poly"]
    assert schema_main(["--check", "--path", str(path)]) == 0
    # everything outside the enums is kept
    original = load_policy_schema()
    assert regenerated["properties"]["quantization"] == original["properties"]["quantization"]
    assert set(regenerated["properties"]) == set(original["properties"])


def test_python_dash_m_schema_check_passes_on_the_committed_file():
    res = subprocess.run([sys.executable, "-m", "policysearch.schema", "--check"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stdout


def test_methodspec_api():
    spec = MethodSpec(kind="gelu", name="x", expects="requant", out_bits=[8, 4], default_bits=4, integer_only=True)
    assert spec.out_bits == (8, 4) and spec.summary == "" and spec.cost is None
    assert dataclasses.replace(spec, cost=0.5).cost == 0.5
    with pytest.raises(TypeError):
        MethodSpec("gelu", "x", "requant", (), None, True)  # type: ignore[misc]  # keyword-only

"""The method catalogue: one descriptor per method, read by kernels, spaces, strategies, the schema,
the report, the precision rules and the ONNX export."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from policysearch import kernels, methods
from policysearch.errors import PolicyError, PolicySearchError, UnknownNameError
from policysearch.methods import MethodDescriptor, catalogue, get_method, register_method, unregister_method
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
    # data-aware (IPTQ-ViT): fit_exp is I-BERT's softmax form, poly_gelu is fed as I-ViT's GELU
    ("softmax", "fit_exp"): "accumulator", ("gelu", "poly_gelu"): "requant", ("gelu", "poly_gelu_fixed"): "requant",
}


def test_catalogue_declares_the_design_table():
    assert methods.kinds() == ["softmax", "gelu", "layernorm"]
    assert {k: methods.methods(k) for k in methods.kinds()} == {
        "softmax": ["fp32", "ibert", "fqvit", "ivit", "fit_exp"],
        "gelu": ["fp32", "ibert", "ivit", "relu", "poly_gelu", "poly_gelu_fixed"],
        "layernorm": ["fp32", "ibert", "fqvit", "ivit"],
    }
    assert {(s.kind, s.name): s.expects for s in catalogue()} == EXPECTS
    for spec in catalogue():
        assert spec.integer_only == (spec.name != "fp32") and spec.cost is None and spec.summary
        assert get_method(spec.kind, spec.name) is spec and spec.key == f"{spec.kind}/{spec.name}"
    bits = {(s.kind, s.name): (s.out_bits, s.default_bits) for s in catalogue() if s.out_bits}
    assert bits == {("softmax", "ibert"): ((8, 16), 8), ("softmax", "fqvit"): ((4,), 4),
                    ("softmax", "ivit"): ((8, 16), 8), ("gelu", "ivit"): ((8,), 8),
                    ("softmax", "fit_exp"): ((8, 16), 8)}
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


#: the per-name fields every descriptor needs (a name no other kind has)
RANKS = dict(order=99, fallback=99, colour="#123456")


@pytest.mark.parametrize("kw, message", [
    (dict(kind="conv", name="x", expects="float"), "unknown kind 'conv'"),
    (dict(kind="gelu", name="x", expects="int"), "expects='int'"),
    (dict(kind="gelu", name="x-y", expects="requant"), "identifier"),
    (dict(kind="gelu", name="x", expects="requant", out_bits=(8,)), "needs default_bits"),
    (dict(kind="gelu", name="x", expects="requant", out_bits=(8,), default_bits=4), "not one of out_bits"),
    (dict(kind="gelu", name="x", expects="requant", out_bits=(0,), default_bits=0), "positive integers"),
    (dict(kind="gelu", name="x", expects="requant", out_bits=(8,), default_bits=8, family_out_bits=(("swin", 4),)),
     "family_out_bits"),
    (dict(kind="gelu", name="x", expects="float"), "cannot be integer-only"),
    (dict(kind="gelu", name="relu", expects="requant"), "already in the catalogue"),
    (dict(kind="gelu", name="x", expects="requant", colour="red"), "colour"),
    (dict(kind="gelu", name="x", expects="requant", order=1.5), "order must be an integer"),
    (dict(kind="gelu", name="x", expects="requant", kernel="no_colon"), "module.path:attr"),
    (dict(kind="gelu", name="x", expects="requant", onnx_swaps=(("a:b",),)), "module.path:attr"),
    (dict(kind="gelu", name="x", expects="requant", replaces_op="tanh"), "replaces_op='tanh'"),
    (dict(kind="softmax", name="x", expects="requant", replaces_op="relu"), "replaces_op='relu'"),
    (dict(kind="layernorm", name="x", expects="requant"), "native_in_bits"),
    (dict(kind="gelu", name="x", expects="requant", native_in_bits=16), "native_in_bits"),
    (dict(kind="layernorm", name="ibert2", expects="ptf"), None),  # a control: valid
])
def test_register_method_rejects_bad_entries(kw, message):
    before = catalogue()
    kw = {**RANKS, **kw}
    if message is None:
        MethodDescriptor(**kw)
        return
    with pytest.raises(ValueError, match=message):
        register_method(**kw)
    assert catalogue() == before


def test_one_name_has_one_order_fallback_and_colour():
    before = catalogue()
    relu = get_method("gelu", "relu")
    with pytest.raises(ValueError, match="colour differ from gelu/relu's"):
        register_method("softmax", "relu", expects="requant", order=relu.order, fallback=relu.fallback,
                        colour="#000000")
    with pytest.raises(ValueError, match="order, fallback differ from gelu/relu's"):
        register_method("softmax", "relu", expects="requant", order=1, fallback=1, colour=relu.colour)
    assert catalogue() == before


def test_orders_fallbacks_colours_and_widths():
    data_aware = ["fit_exp", "poly_gelu", "poly_gelu_fixed"]
    assert methods.ordered() == ["ibert", "fqvit", "ivit", "relu", "fp32", *data_aware]
    assert methods.ordered("gelu") == ["ibert", "ivit", "relu", "fp32", "poly_gelu", "poly_gelu_fixed"]
    assert methods.fallback() == ["ibert", "ivit", "fqvit", "relu", "fp32", *data_aware]
    assert methods.colour("relu") == "#d62728" and methods.colour("nothing") is None
    assert len({methods.colour(m) for m in methods.ordered()}) == len(methods.ordered())
    ivit = get_method("softmax", "ivit")
    assert (ivit.output_bits("swin"), ivit.output_bits("vit"), ivit.default_bits) == (8, 16, 8)
    assert get_method("softmax", "fqvit").output_bits("swin") == 4
    assert get_method("gelu", "ibert").output_bits("vit") is None
    assert [d.key for d in catalogue() if d.float_reference] == ["softmax/fp32", "gelu/fp32", "layernorm/fp32"]
    assert [d.key for d in catalogue() if d.replaces_op] == ["gelu/relu"]
    assert {d.key: d.native_in_bits for d in catalogue() if d.native_in_bits} == {"layernorm/ibert": 22,
                                                                                 "layernorm/ivit": 16}


def test_every_catalogue_entry_names_a_kernel_factory_that_builds():
    for desc in catalogue():
        assert desc.kernel is not None and desc.kernel.startswith("policysearch.kernels."), desc.key
        module = kernels.create(desc.kind, desc.name, norm=torch.nn.LayerNorm(8))
        assert isinstance(module, torch.nn.Module) and kernels.factory(desc.kind, desc.name) is kernels.factory(
            desc.kind, desc.name)
        assert kernels.default_bits(desc.kind, desc.name) == desc.default_bits
    with pytest.raises(UnknownNameError, match="unknown gelu method 'poly'"):
        kernels.create("gelu", "poly")


def test_a_kernel_target_that_does_not_import_is_one_clear_error():
    register_method("gelu", "broken", expects="requant", kernel="policysearch.kernels.relu:no_such_factory",
                    **RANKS, summary="a test entry")
    try:
        with pytest.raises(PolicySearchError, match="'policysearch.kernels.relu:no_such_factory' cannot be imported"):
            kernels.create("gelu", "broken")
    finally:
        unregister_method("gelu", "broken")
    assert "broken" not in methods.methods("gelu")


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
def extra_method():
    """A temporary catalogue entry ``gelu/poly`` (no kernel), unregistered after the test."""
    yield register_method("gelu", "poly", expects="requant", out_bits=(8,), default_bits=8, **RANKS,
                          summary="a test entry")
    unregister_method("gelu", "poly")


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
    assert schema_enums(regenerated)["gelu"] == ["fp32", "ibert", "ivit", "relu", "poly_gelu", "poly_gelu_fixed",
                                                 "poly"]
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


def test_method_descriptor_api():
    spec = MethodDescriptor(kind="gelu", name="x", expects="requant", out_bits=[8, 4], default_bits=4, integer_only=True,
                            family_out_bits=[["swin", 8]], **RANKS)
    assert spec.family_out_bits == (("swin", 8),) and spec.output_bits("swin") == 8 and spec.output_bits("vit") == 4
    assert spec.out_bits == (8, 4) and spec.summary == "" and spec.cost is None
    assert dataclasses.replace(spec, cost=0.5).cost == 0.5
    with pytest.raises(TypeError):
        MethodDescriptor("gelu", "x", "requant", (), None, True)  # type: ignore[misc]  # keyword-only


# ---- a new method, registered once, appears everywhere -------------------------------------------
class _GridGELU(torch.nn.Module):
    """Float GELU rounded onto the input's integer grid: a tiny stand-in for an integer GELU."""

    def forward(self, x, scale):
        s = torch.as_tensor(scale, dtype=torch.float32)
        return torch.round(torch.nn.functional.gelu(x) / s) * s, s


def _grid_gelu(*, bits, norm):
    return _GridGELU()


DUMMY = dict(kind="gelu", name="gridgelu", expects="requant", order=35, fallback=35, colour="#9467bd",
             kernel=f"{__name__}:_grid_gelu", summary="float GELU on the integer grid (a test method)")


@pytest.fixture
def dummy_method():
    """``gelu/gridgelu`` in the catalogue for one test, then removed."""
    desc = register_method(**DUMMY)
    try:
        yield desc
    finally:
        unregister_method("gelu", "gridgelu")
    assert "gridgelu" not in methods.methods("gelu")


def test_a_dummy_method_appears_everywhere(dummy_method, capsys):
    from fake_eval import SITES, fake_evaluate
    from policysearch.cli import main as cli_main
    from policysearch.models.precision import input_precision
    from policysearch.report.figures import method_colour
    from policysearch.spaces import SPACES, SearchSpace, list_spaces, load_space
    from policysearch.strategies import create_strategy

    gelu = next(s.name for s in SITES if s.kind == "gelu")
    # every built space whose preset leaves GELU to the catalogue allows it; curated lists do not
    for name in list_spaces():
        space = load_space(name, SITES)
        curated = "gelu" in (SPACES.get(name).get("methods") or {})
        assert ("gridgelu" in {c.method for c in space.choices(gelu)}) != curated, name
    space = load_space("all", SITES)
    assert [str(c) for c in space.choices(gelu)][-1] == "gridgelu"
    assert "gridgelu@6" in {str(c) for c in SearchSpace.from_preset({"bits": {"gelu": [6]}}, SITES).choices(gelu)}
    # a uniform baseline, between ivit and relu (its order); other kinds fall back by rank
    uniform = space.uniform_policies()
    assert list(uniform) == ["ibert", "fqvit", "ivit", "gridgelu", "relu", "fp32", "fit_exp", "poly_gelu",
                            "poly_gelu_fixed"]
    assert uniform["gridgelu"][gelu].method == "gridgelu"
    assert {c.method for s, c in uniform["gridgelu"].items() if s.kind != "gelu"} == {"ibert"}
    # ... so the strategies that start from the uniform runs see it: uniform, every rule, exhaustive
    for strategy in ("uniform", "sqnr_diff", "sqnr_drop", "sqnr_absdiff", "sqnr_output", "exhaustive"):
        s = create_strategy(strategy, space)
        assert s.uniform["gridgelu"] == uniform["gridgelu"], strategy
    rule = create_strategy("sqnr_diff", space)
    for p in rule.uniform.values():
        rule.tell(p, fake_evaluate(p))
    assert "gridgelu" in rule.selection()[gelu].candidates
    # the policy schema's enum and `policysearch list methods`
    assert schema_enums(build_policy_schema())["gelu"][-1] == "gridgelu"
    assert cli_main(["list", "methods"]) == 0
    assert "gelu       fp32, ibert, ivit, relu, poly_gelu, poly_gelu_fixed, gridgelu" in capsys.readouterr().out
    # the figures' colour, the precision rules
    assert method_colour("gridgelu") == "#9467bd"
    assert input_precision("gelu", "gridgelu", bits=None, act_bits=6).bits == 6
    # the kernel factory builds it, and a model runs it
    module = kernels.create("gelu", "gridgelu")
    y, s = module(torch.tensor([-1.0, 0.0, 1.0]), torch.tensor(0.25))
    assert torch.equal(y, torch.tensor([-0.25, 0.0, 0.75])) and float(s) == 0.25
    _runs_in_a_model()


def _runs_in_a_model():
    import policysearch as ps
    from policysearch.models.tiny import tiny_vit

    torch.manual_seed(0)
    model, x = tiny_vit(), torch.randn(4, 3, 32, 32)
    ps.calibrate(ps.prepare(model), x.split(2))
    with torch.no_grad(), ps.float_mode(model):
        ref = model(x)
    ps.apply_policy(model, Policy.uniform(ps.find_sites(model), {"softmax": "fp32", "gelu": "gridgelu",
                                                                  "layernorm": "fp32"}))
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert (out - ref).norm() / ref.norm() < 0.2

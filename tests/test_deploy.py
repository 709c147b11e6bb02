"""Deployment: cost profile, ONNX export (float and integer), int8 with ONNX Runtime, latency stage.

Tests that need ``onnx`` / ``onnxruntime`` (the ``policysearch[onnx]`` extra) skip without them.
"""
from __future__ import annotations

import importlib
import json
import shutil
import sys

import pytest
import torch
from torch import nn

import policysearch.methods as catalogue
from policysearch.errors import ConfigError, MissingExtraError


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


HAVE_ONNX = _importable("onnx") and _importable("onnxruntime")
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason='needs the onnx extra: pip install "policysearch[onnx]"')


@pytest.fixture
def restore_costs():
    before = {(s.kind, s.name): s.cost for s in catalogue.catalogue()}
    yield
    catalogue.set_costs(before)


# -- the catalogue's cost slot ------------------------------------------------------------

def test_set_costs_rebuilds_entries(restore_costs):
    old = catalogue.get_method("gelu", "relu")
    new = catalogue.set_costs({("gelu", "relu"): 0.5, ("softmax", "ibert"): 2})
    assert catalogue.get_method("gelu", "relu").cost == 0.5
    assert catalogue.get_method("softmax", "ibert").cost == 2.0
    assert old.cost is None and new[0] is catalogue.get_method("gelu", "relu")
    assert catalogue.get_method("gelu", "relu").out_bits == old.out_bits  # everything else kept
    catalogue.set_costs({("gelu", "relu"): None})
    assert catalogue.get_method("gelu", "relu") is old  # the registered entry itself (the kernel registry's)


def test_set_costs_checks_everything_first(restore_costs):
    with pytest.raises(ConfigError, match="positive finite"):
        catalogue.set_costs({("gelu", "relu"): 0.5, ("gelu", "ivit"): -1.0})
    assert catalogue.get_method("gelu", "relu").cost is None  # nothing changed
    with pytest.raises(Exception, match="valid"):
        catalogue.set_costs({("gelu", "nope"): 1.0})


def test_load_cost_profile(tmp_path, restore_costs):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"format": "policysearch.profile/v1",
                                "methods": {"gelu": {"fp32": 1.0, "relu": 0.25, "future": 3.0}}}))
    assert catalogue.load_cost_profile(path) == {("gelu", "fp32"): 1.0, ("gelu", "relu"): 0.25}
    assert catalogue.get_method("gelu", "relu").cost == 0.25
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="policysearch profile"):
        catalogue.load_cost_profile(path)


# -- cost profile ---------------------------------------------------------------------------

def _forward_site_shapes(name: str, batch: int) -> dict[str, list[int]]:
    """Site input shapes from hooks on the unwired model (independent of the profile's recorder)."""
    from policysearch.models.loading import load_model, model_input_size

    model = load_model(name)
    shapes: dict[str, list[int]] = {}

    def hook(path: str):
        def record(mod, args, out) -> None:
            shapes.setdefault(path, list(args[0].shape))
        return record

    for path, m in model.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GELU, nn.Softmax)):  # Swin's WindowAttention has an nn.Softmax
            m.register_forward_hook(hook(path))
    with torch.no_grad():
        model(torch.randn(batch, *model_input_size(model)))
    return shapes


@pytest.mark.parametrize("name", ["test_fmnist_vit", "test_fmnist_swin"])
def test_profile_has_every_site_shape(tmp_path, name, restore_costs):
    from policysearch import find_sites, kernels
    from policysearch.deploy.profile import method_costs, policy_cost, profile_model, read_profile
    from policysearch.models.loading import load_model
    from policysearch.policy import Policy

    doc = profile_model(name, batch=2, repeats=20, warmup=1, threads=1, results_dir=tmp_path)
    path = tmp_path / "profiles" / f"{name}-cpu-b2.json"
    assert doc["path"] == str(path) and read_profile(path)["sites"] == doc["sites"]
    sites = find_sites(load_model(name))
    assert [s["name"] for s in doc["sites"]] == [s.name for s in sites]
    hooked = _forward_site_shapes(name, 2)
    for s in doc["sites"]:
        assert s["shape"][0] == 2 or (name.endswith("swin") and s["kind"] == "softmax")  # Swin: batch x windows
        if s["kind"] != "softmax" or name.endswith("swin"):  # ViT's softmax is inside attention
            assert s["shape"] == hooked[s["name"]], s["name"]
        assert set(s["ms"]) == set(kernels.methods(s["kind"])) and all(v > 0 for v in s["ms"].values())
    if name == "test_fmnist_vit":  # 28/7 = 4x4 patches + class token, 2 heads, dim 32, MLP 64
        shapes = {s["kind"]: s["shape"] for s in doc["sites"]}
        assert shapes == {"softmax": [2, 2, 17, 17], "gelu": [2, 17, 64], "layernorm": [2, 17, 32]}
    distinct = {(s["kind"], tuple(s["shape"])) for s in doc["sites"]}
    assert {(k["kind"], tuple(k["shape"])) for k in doc["kernels"]} == distinct
    assert len(doc["kernels"]) == sum(len(kernels.methods(k)) for k, _ in distinct)
    n_linear = sum(isinstance(m, nn.Linear) for m in load_model(name).modules()) + 1  # + patch embedding
    assert len(doc["linear"]) == n_linear and all(x["median_ms"] > 0 for x in doc["linear"])
    assert doc["repeats"] == 20 and doc["threads"] == 1
    costs = method_costs(doc)
    assert all(per["fp32"] == 1.0 for per in costs.values()) and costs == doc["methods"]
    catalogue.load_cost_profile(path)
    assert catalogue.get_method("gelu", "ivit").cost == costs["gelu"]["ivit"]
    fp32 = policy_cost(doc, Policy.uniform(sites, "fp32"))
    assert fp32["relative"] == pytest.approx(1.0)
    ivit = policy_cost(doc, Policy.uniform(sites, "ivit"))
    expected = sum(s["ms"]["ivit"] for s in doc["sites"])
    assert ivit["sites_ms"] == pytest.approx(expected) and ivit["ms"] == pytest.approx(expected + ivit["linear_ms"])


def test_profile_refuses_few_repeats(tmp_path):
    from policysearch.deploy.profile import profile_model

    with pytest.raises(ConfigError, match="at least 20"):
        profile_model("test_fmnist_vit", repeats=5, results_dir=tmp_path)


# -- export: helpers ------------------------------------------------------------------------

def test_missing_extra_names_the_install(monkeypatch):
    from policysearch.deploy import require_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(MissingExtraError, match=r'pip install "policysearch\[onnx\]"'):
        require_onnx()


def test_replace_gelu_paths():
    from policysearch.deploy.onnx_export import gelu_paths, replace_gelu
    from policysearch.models.loading import load_model

    vit, swin = load_model("test_fmnist_vit"), load_model("test_fmnist_swin")
    assert gelu_paths(vit) == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert gelu_paths(swin) == ["layers.0.blocks.0.mlp.act", "layers.1.blocks.0.mlp.act"]
    assert replace_gelu(swin, ["layers.1.blocks.0.mlp.act"]) == ["layers.1.blocks.0.mlp.act"]
    assert isinstance(swin.layers[1].blocks[0].mlp.act, nn.ReLU) and gelu_paths(swin) == ["layers.0.blocks.0.mlp.act"]
    with pytest.raises(ConfigError, match="not a GELU"):
        replace_gelu(vit, ["blocks.0.mlp.fc1"])


def test_exp2_replacement_equals_kernel_helper():
    from policysearch.kernels._common import exp2_int
    from policysearch.kernels._common import exp2_int_traceable as _exp2_export

    k = torch.arange(-300.0, 300.0)
    assert torch.equal(_exp2_export(k), exp2_int(k))


def test_log_round_power_replacement_equals_kernel_helper():
    """The traceable LIS code (frexp) gives the kernel's powers of two, and keeps every masked code masked."""
    from policysearch.kernels.fqvit import log_round_power
    from policysearch.kernels.fqvit import log_round_power_traceable as _log_round_power_export

    k = torch.arange(0.0, 60.0)
    p2 = torch.pow(2.0, k)
    r = torch.cat([torch.arange(1.0, 70000.0), p2, p2 * 1.5, p2 * 1.5 - 1, p2[1:] - 1, torch.tensor([3.3e29])])
    assert torch.equal(_log_round_power_export(r), log_round_power(r))
    huge = torch.tensor([1e31, 1e38, float("inf")])  # codes past 2^100: every one masked either way
    assert (log_round_power(huge) >= 2.0**100).all() and (_log_round_power_export(huge) >= 2.0**100).all()


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@needs_onnx
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frexp_symbolic_is_exact(tmp_path, dtype):
    from policysearch.deploy.onnx_export import export_friendly

    class Frexp(nn.Module):
        def forward(self, x):
            m, e = torch.frexp(x)
            return m, e

    k = torch.arange(-100, 101, dtype=dtype)
    p2 = torch.pow(torch.tensor(2.0, dtype=dtype), k)
    tiny = torch.finfo(dtype).eps
    x = torch.cat([p2, p2 * (1 - tiny / 2), p2 * (1 + tiny), -p2 * 1.5, torch.tensor([0.0, 1e-30, 3.3e30], dtype=dtype),
                   torch.randn(2000, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 1e3])
    with export_friendly():
        torch.onnx.export(Frexp(), (x,), str(tmp_path / "f.onnx"), dynamo=False, opset_version=17)
    m, e = _ort(tmp_path / "f.onnx").run(None, {_ort(tmp_path / "f.onnx").get_inputs()[0].name: x.numpy()})
    ref_m, ref_e = torch.frexp(x)
    assert torch.equal(torch.from_numpy(m), ref_m) and torch.equal(torch.from_numpy(e), ref_e)
    # unregistered after the block (torch then fails with an empty registry entry or as unsupported)
    with pytest.raises((torch.onnx.errors.UnsupportedOperatorError, ValueError)):
        torch.onnx.export(Frexp(), (x,), str(tmp_path / "g.onnx"), dynamo=False, opset_version=17)


@needs_onnx
def test_integer_kernels_export_bit_exact(tmp_path):
    """Every integer kernel runs in ONNX Runtime with exactly PyTorch's integers (float ones within 1e-6)."""
    from policysearch import kernels
    from policysearch.deploy.onnx_export import export_friendly
    from policysearch.methods import get_method

    class Wrap(nn.Module):
        def __init__(self, kern, scale):
            super().__init__()
            self.kern = kern
            self.register_buffer("scale", scale)

        def forward(self, x):
            return self.kern(x, self.scale)[0]

    g = torch.Generator().manual_seed(0)
    shapes = {"softmax": (2, 2, 17, 17), "gelu": (2, 17, 64), "layernorm": (2, 17, 32)}
    for kind in kernels.kinds():
        for method in kernels.methods(kind):
            norm = None
            if kind == "layernorm":
                norm = nn.LayerNorm(32)
                with torch.no_grad():
                    norm.weight.uniform_(0.5, 1.5, generator=g)
                    norm.bias.uniform_(-0.5, 0.5, generator=g)
            bits = 16 if kind == "layernorm" or get_method(kind, method).expects == "accumulator" else 8
            scale = torch.tensor(0.037 if bits == 8 else 0.0007)
            lim = 2 ** (bits - 1) - 1
            x = torch.clamp(torch.round(torch.randn(*shapes[kind], generator=g) * 3 / scale), -lim, lim) * scale
            module = Wrap(kernels.create(kind, method, norm=norm), scale).eval()
            if hasattr(module.kern, "fit"):  # a data-aware kernel: its constants fitted first, as calibration does
                module.kern.fit(*module.kern.input_range(x))
            path = tmp_path / f"{kind}-{method}.onnx"
            with export_friendly(), torch.no_grad():
                torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                                  dynamic_axes={"x": {0: "b"}})
                ref = module(x)
            got = torch.from_numpy(_ort(path).run(None, {"x": x.numpy()})[0])
            if get_method(kind, method).integer_only or method == "relu":
                assert torch.equal(got, ref), f"{kind}/{method}"
            else:
                assert torch.allclose(got, ref, atol=1e-6, rtol=0), f"{kind}/{method}"


@needs_onnx
@pytest.mark.parametrize("name", ["test_fmnist_vit", "test_fmnist_swin"])
def test_float_export_agrees(tmp_path, name):
    import copy

    from policysearch.deploy.onnx_export import FLOAT_TOLERANCE, compare_onnx, export_float, replace_gelu
    from policysearch.models.loading import load_model

    model = load_model(name)
    images = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    path = export_float(model, tmp_path / "f.onnx")
    agree = compare_onnx(path, model, images, batch_size=5)  # batches of another size than the trace's
    assert agree.tolerance == FLOAT_TOLERANCE and agree.ok and agree.rel < 1e-5, agree
    relu_path = export_float(model, tmp_path / "r.onnx", relu=True)
    assert any(isinstance(m, nn.GELU) for m in model.modules())  # the original is untouched
    relu_model = copy.deepcopy(model)
    replace_gelu(relu_model)
    agree_relu = compare_onnx(relu_path, relu_model, images)
    assert agree_relu.ok, agree_relu
    assert not compare_onnx(relu_path, model, images).rel < 1e-5  # it is another model


@needs_onnx
@pytest.mark.parametrize("wiring", ["native", "paper"])
@pytest.mark.parametrize("name", ["test_fmnist_vit", "test_fmnist_swin"])
def test_integer_export_agrees_mixed_policy(tmp_path, name, wiring):
    """The simulated-integer model under a mixed policy, through the public API, in ONNX Runtime."""
    from policysearch import apply_policy, calibrate, find_sites, prepare
    from policysearch.data import load_data
    from policysearch.deploy.onnx_export import (
        EXACT_TOLERANCE,
        INTEGER_TOLERANCE,
        compare_onnx,
        export_float,
        export_integer,
    )
    from policysearch.models.loading import load_model
    from policysearch.policy import Policy
    from policysearch.sites import KIND_METHODS

    torch.manual_seed(0)
    model = prepare(load_model(name), wiring=wiring)
    data = load_data("fmnist-sample", model=model, calib_size=48)
    calib = data.calib_images()
    calibrate(model, calib.split(16))
    sites = find_sites(model)
    with pytest.raises(ConfigError, match="under a policy"):
        export_integer(model, tmp_path / "none.onnx", calib[:2])
    integer = {k: [m for m in KIND_METHODS[k] if catalogue.get_method(k, m).integer_only] for k in KIND_METHODS}
    seen = {k: 0 for k in integer}
    choices = {}
    for s in sites:  # each kind cycles through its integer methods
        choices[s.name] = integer[s.kind][seen[s.kind] % len(integer[s.kind])]
        seen[s.kind] += 1
    policy = Policy.from_mapping(sites, choices)
    assert {(s.kind, c.method) for s, c in policy.items()} >= {("layernorm", "fqvit"), ("softmax", "ibert"), ("gelu", "ivit")}
    apply_policy(model, policy)
    path = export_integer(model, tmp_path / "int.onnx", calib[:2])
    agree = compare_onnx(path, model, calib, batch_size=16)
    if wiring == "paper":  # integer GEMMs and integer-only kernels: every logit identical
        assert agree.tolerance == EXACT_TOLERANCE and agree.bit_exact and agree.ok, agree
        assert str(agree).startswith("bit-exact on 48 images")
    else:  # float32 GEMMs of dequantized operands: within the tolerance, and it says why
        assert agree.tolerance == INTEGER_TOLERANCE and agree.ok, agree
        assert agree.top1 == 1.0 and agree.rel < 0.01, agree  # tiny models: far inside the tolerance
        assert "not bit-exact by design (the native wiring's linear layers are float32 GEMMs" in str(agree)
    # no calibration batch baked into the graph (FQ-ViT's PTF factors are exported as values):
    # without the warm-up forward the file was 18-50x the float model's, with it about 3x
    float_size = export_float(load_model(name), tmp_path / "float.onnx").stat().st_size
    assert path.stat().st_size < 5 * float_size


def _cycle_integer_methods(sites):
    """Each kind cycles through its integer-only methods (a mixed policy of every integer kernel)."""
    from policysearch.policy import Policy
    from policysearch.sites import KIND_METHODS

    integer = {k: [m for m in KIND_METHODS[k] if catalogue.get_method(k, m).integer_only] for k in KIND_METHODS}
    seen = {k: 0 for k in integer}
    choices = {}
    for s in sites:
        choices[s.name] = integer[s.kind][seen[s.kind] % len(integer[s.kind])]
        seen[s.kind] += 1
    return Policy.from_mapping(sites, choices)


_POLICIES = {
    "ibert": lambda sites: _uniform(sites, "ibert"),
    "ivit": lambda sites: _uniform(sites, "ivit"),
    "fqvit": lambda sites: _uniform(sites, "fqvit"),  # FQ-ViT has no GELU: I-BERT's there
    "mixed": _cycle_integer_methods,
}


def _uniform(sites, method):
    from policysearch.policy import Policy

    return Policy.uniform(sites, method, fallback={"gelu": "ibert"})


def _tiny_integer_model(make, policy_of, images):
    from policysearch import apply_policy, calibrate, find_sites, prepare

    torch.manual_seed(0)
    model = prepare(make(), wiring="paper")
    calibrate(model, images.split(12))
    apply_policy(model, policy_of(find_sites(model)))
    return model


@needs_onnx
@pytest.mark.parametrize("policy", list(_POLICIES))
@pytest.mark.parametrize("name", ["tiny_vit", "tiny_swin"])
def test_whole_model_integer_export_is_bit_exact(tmp_path, name, policy):
    """The paper wiring's integer model: linear layers as MatMulInteger (int32 accumulators), every
    logit of ONNX Runtime identical to policysearch's, in batches of another size than the trace's."""
    import onnx

    from policysearch.deploy.onnx_export import EXACT_TOLERANCE, compare_onnx, export_integer
    from policysearch.models import tiny
    from policysearch.quant import IntConv2d, IntLinear

    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = _tiny_integer_model(getattr(tiny, name), _POLICIES[policy], images)
    path = export_integer(model, tmp_path / "m.onnx", images[:2])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    linear = sum(isinstance(m, (IntLinear, IntConv2d)) for m in model.modules())
    assert ops.count("MatMulInteger") == linear and "Gemm" not in ops and "Conv" not in ops
    assert ops.count("MatMul") == 2 * sum(s.kind == "softmax" for s in model._policysearch.policy.sites)  # q·kᵀ, attn·v
    agree = compare_onnx(path, model, images, batch_size=8)
    assert agree.tolerance == EXACT_TOLERANCE and agree.bit_exact and agree.exact == 1.0 and agree.ok, agree
    assert "bit-exact" in str(agree)


@needs_onnx
def test_float_site_gets_the_tolerance_and_says_why(tmp_path):
    from policysearch.deploy.onnx_export import (
        EXACT_TOLERANCE,
        INTEGER_TOLERANCE,
        Agreement,
        expected_agreement,
    )
    from policysearch.models import tiny
    from policysearch.policy import Policy

    images = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def with_fp32_softmax(sites):
        return Policy.uniform(sites, {"softmax": "fp32", "gelu": "ivit", "layernorm": "ivit"})

    model = _tiny_integer_model(tiny.tiny_vit, with_fp32_softmax, images)
    tolerance, why = expected_agreement(model)
    assert tolerance == INTEGER_TOLERANCE and "2 site(s) keep a float operator (blocks.0.attn.softmax" in why
    assert expected_agreement(tiny.tiny_vit())[0] != EXACT_TOLERANCE  # the float model
    # an exact-required model that differs is reported as such (export_run_onnx then raises)
    bad = Agreement(images=4, max_abs=1e-6, logit_scale=1.0, rel=1e-6, exact=0.9, top1=1.0,
                    tolerance=dict(EXACT_TOLERANCE), basis="integer GEMMs")
    assert not bad.ok and not bad.bit_exact and str(bad).startswith("NOT bit-exact, as it should be")


@needs_onnx
def test_fqvit_mn_exports_exactly_near_powers_of_two(tmp_path):
    """get_MN's floor(log2 a) in ONNX Runtime equals policysearch's on the floats around every
    power of two (where a log2 rounded otherwise moves the floor; ONNX's Log / ln 2 in float32
    puts 2^15 below 15)."""
    from policysearch.deploy.onnx_export import export_friendly
    from policysearch.kernels.fqvit import _mn_and_power

    class MN(nn.Module):
        def forward(self, a):
            m, n, _ = _mn_and_power(a)
            return m, n

    p = torch.pow(2.0, torch.arange(-126.0, 128.0))
    around = [p]
    down, up = p, p
    for _ in range(40):
        down, up = torch.nextafter(down, torch.zeros_like(p)), torch.nextafter(up, torch.full_like(p, float("inf")))
        around += [down, up]
    a = torch.cat(around + [torch.rand(20000, generator=torch.Generator().manual_seed(0)) * 300])
    with export_friendly():
        torch.onnx.export(MN(), (a,), str(tmp_path / "mn.onnx"), dynamo=False, opset_version=17, input_names=["a"])
    m, n = _ort(tmp_path / "mn.onnx").run(None, {"a": a.numpy()})
    ref_m, ref_n = MN()(a)
    assert torch.equal(torch.from_numpy(n), ref_n) and torch.equal(torch.from_numpy(m), ref_m)


@needs_onnx
def test_ibert_layernorm_root_is_exact_and_exports_exactly(tmp_path):
    """I-BERT's std_int is the integer root of the exact sum of squares, in ONNX Runtime too, on
    rows whose sum of squares is a perfect square or one off it (where a float root's last bit
    decides the floor)."""
    import math

    from policysearch.deploy.onnx_export import export_friendly
    from policysearch.kernels.ibert import IBertLayerNorm

    g = torch.Generator().manual_seed(0)
    y = torch.randint(-9000, 9000, (4000, 48), generator=g).double()  # sums below 2^32: no overflow shift
    y[:, -1] = 0
    target = torch.floor(torch.sqrt((y**2).sum(-1)))  # make some rows' sums k^2, k^2 - 1, k^2 + 1
    y[::3, -1] = torch.floor(torch.sqrt(torch.clamp((target[::3] + 1) ** 2 - (y[::3] ** 2).sum(-1), min=0)))
    y = y.float()
    std = IBertLayerNorm(nn.LayerNorm(48)).std_int(y)
    exact = torch.tensor([max(math.isqrt(int(v)), 1) for v in (y.double() ** 2).sum(-1).tolist()], dtype=torch.float32)
    assert torch.equal(std.squeeze(-1), exact)

    class Std(nn.Module):
        def forward(self, t):
            return IBertLayerNorm(nn.LayerNorm(48)).std_int(t)

    with export_friendly():
        torch.onnx.export(Std(), (y,), str(tmp_path / "s.onnx"), dynamo=False, opset_version=17, input_names=["y"])
    assert torch.equal(torch.from_numpy(_ort(tmp_path / "s.onnx").run(None, {"y": y.numpy()})[0]), std)


# -- runs: export --onnx, latency -----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from policysearch.search import SearchConfig, search

    root = tmp_path_factory.mktemp("deploy")
    search(SearchConfig(strategy="uniform", model="test_fmnist_vit", calib_size=32, eval_size=48, batch_size=48,
                        results_dir=str(root / "results"), storage=f"sqlite:///{root / 'studies.db'}",
                        run_name="tiny"), progress=False)
    return root / "results"


@needs_onnx
def test_export_run_onnx_cli(tiny_run, tmp_path, capsys):
    from policysearch.cli import main
    from policysearch.deploy.onnx_export import export_run_onnx

    out = tmp_path / "tiny.onnx"
    res = export_run_onnx("tiny", out, results_dir=tiny_run)
    assert out.is_file() and res.agreement.ok and res.agreement.bit_exact and res.agreement.images == 32
    assert res.top1_onnx == res.top1_torch == pytest.approx(res.top1_recorded)
    assert res.wiring == json.loads((tiny_run / "tiny" / "run.json").read_text())["fingerprint"]["wiring"]
    out.unlink()
    assert main(["export", "tiny", "--results-dir", str(tiny_run), "--onnx", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "top-1" in text
    assert "bit-exact on 32 images: every logit identical" in text and "MatMulInteger" in text
    assert main(["export", "nope", "--results-dir", str(tiny_run), "--onnx", str(out)]) == 2


@needs_onnx
def test_measure_interleaved(tmp_path):
    from policysearch.deploy.latency import measure
    from policysearch.deploy.onnx_export import export_float
    from policysearch.models.loading import load_model

    model = load_model("test_fmnist_vit")
    a = export_float(model, tmp_path / "a.onnx")
    b = export_float(model, tmp_path / "b.onnx", relu=True)
    res = measure({"a": a, "b": b}, batches=(1, 3), repeats=20, warmup=1, threads=1)
    assert set(res["results"]) == {"a", "b"} and set(res["results"]["a"]) == {"1", "3"}
    assert all(v["runs"] == 20 and v["median_ms"] > 0 for per in res["results"].values() for v in per.values())
    assert [sorted(r) for r in res["_rounds"]["3"]] == [["a", "b"]] * 20
    assert res["threads"] == 1 and res["provider"] == "cpu" and res["input_shape"] == [1, 28, 28]
    with pytest.raises(ConfigError, match="at least 20"):
        measure({"a": a}, repeats=19)
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ConfigError, match="not available"):
            measure({"a": a}, repeats=20, provider="tensorrt")


@needs_onnx
def test_latency_stage_end_to_end(tiny_run, tmp_path):
    """quantize + run + latency.json + run record + policy JSON + table, with a ReLU site in the policy."""
    from policysearch.deploy.latency import run_latency, update_table
    from policysearch.policy import read_policy
    from policysearch.run import RunRecord

    run_dir = tmp_path / "relu-run"
    shutil.copytree(tiny_run / "tiny", run_dir)
    record = RunRecord.load(run_dir)
    sites = record.data["answer"]["policy"]["sites"]
    relu_site = next(s for s in sites if s["kind"] == "gelu")
    relu_site["method"] = "relu"
    record.save()
    table = tmp_path / "latency.md"
    doc = run_latency(str(run_dir), batches=(1, 2), repeats=20, threads=1, table=table, command="test-cmd")
    assert set(doc["results"]) == {"float", "int8_gelu", "int8_policy", "int8_relu", "policy_integer"}
    assert doc["labels"]["policy_integer"].startswith("the searched policy itself: policysearch's integer model")
    assert "QDQ" in doc["labels"]["int8_gelu"] and "float GELU" in doc["labels"]["int8_gelu"]
    assert doc["variants"]["policy_integer"]["relu_sites"] == [relu_site["name"]]
    assert doc["variants"]["int8_policy"]["relu_sites"] == [relu_site["name"]]
    assert doc["variants"]["int8_relu"]["relu_sites"] == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert all(doc["results"][v][b]["runs"] == 20 for v in doc["results"] for b in ("1", "2"))
    assert set(doc["ratios"]["2"]) == {"int8_gelu/float", "int8_policy/int8_gelu", "int8_relu/int8_gelu",
                                       "policy_integer/int8_gelu"}
    assert doc["int8"]["format"] == "u8s8" and doc["int8"]["calibration_images"] == 32
    assert all(0.0 <= doc["top1"][v] <= 1.0 for v in doc["results"]) and doc["eval_images"] == 48
    for name in ("float", "int8_gelu", "int8_policy", "int8_relu", "policy_integer"):
        assert (run_dir / "onnx" / f"{name}.onnx").is_file()
    written = json.loads((run_dir / "latency.json").read_text())
    assert written["results"] == doc["results"] and "_rounds" not in written
    stage = RunRecord.load(run_dir).data["stages"]["latency"]
    assert stage["file"] == "latency.json" and stage["median_ms"]["int8_relu"]["2"] == doc["results"]["int8_relu"]["2"]["median_ms"]
    policy = read_policy(run_dir / "policy.json")  # schema-validated
    assert policy.metrics["latency"]["ratios"]["2"]["int8_relu/int8_gelu"] == doc["ratios"]["2"]["int8_relu/int8_gelu"]["paired_median"]
    assert policy.policy[relu_site["name"]].method == "relu"
    text = table.read_text()
    assert text.count("| test_fmnist_vit |") == 2 and "`test-cmd`" in text and "Rows still missing" in text
    import policysearch.deploy.latency as lat

    rows = json.loads(lat._BLOCK.search(text).group(1))
    update_table(table, [{**rows[0], "command": None}], command="again")  # same (model, weights, batch, threads): replaced
    assert table.read_text().count("| test_fmnist_vit |") == 2 and "`again`" in table.read_text()


@needs_onnx
def test_latency_of_a_geluless_finetune_folder_runs_each_variant_on_its_weights(tmp_path, monkeypatch):
    """A standalone ``finetune --policy`` folder: GELU variants on the GELU weights, ReLU ones on the
    float ReLU model; latency.json, finetune.json and policy.json; the CLI takes the folder."""
    import policysearch as ps
    import policysearch.deploy.latency as lat
    from policysearch.cli import main
    from policysearch.finetune import finetune
    from policysearch.models.loading import load_model
    from policysearch.policy import Policy, read_policy

    m = load_model("test_fmnist_vit")
    ps.prepare(m, wiring="paper")
    policy = Policy.uniform(ps.find_sites(m), {"softmax": "ibert", "gelu": "relu", "layernorm": "ibert"})
    out = tmp_path / "ft"
    finetune(policy=policy, out=out, model="test_fmnist_vit", data="fmnist-sample", wiring="paper", steps=2,
             relu_steps=1, lr=2e-3, calib_size=32, eval_size=48, batch_size=32, progress=False, device="cpu")
    loaded = []
    import policysearch.deploy.onnx_export as ox

    original = ox.load_run_model
    monkeypatch.setattr(ox, "load_run_model", lambda rec, **k: loaded.append(k.get("checkpoint")) or original(rec, **k))
    import policysearch.data as pdata

    loads = []
    load_data = pdata.load_data
    counting = lambda *a, **k: loads.append(a) or load_data(*a, **k)  # noqa: E731
    monkeypatch.setattr(pdata, "load_data", counting)
    monkeypatch.setattr(ox, "load_data", counting)  # onnx_export binds it at import
    doc = lat.run_latency(str(out), batches=(1,), repeats=20, threads=1, command="cmd")
    # GELU: the zoo model's own weights; the policy's integer model (ReLU sites): the ReLU weights
    assert loaded == [None, str(out / "relu_float.safetensors"), str(out / "relu_float.safetensors")]
    assert len(loads) == 1  # the ReLU model reuses the GELU model's data
    assert doc["relu_weights"] == str(out / "relu_float.safetensors") and doc["weights"].startswith(("sha256:", "seeded:"))
    assert set(doc["results"]) == {"float", "int8_gelu", "int8_relu", "policy_integer"} and doc["eval_images"] == 48
    assert doc["weights_label"].startswith("GELU-less distilled (training stage): relu_float.safetensors; "
                                           "GELU: test_fmnist_vit's own (")
    assert doc["top1"]["torch_float"] == json.loads((out / "finetune.json").read_text())["float_top1"]
    assert json.loads((out / "latency.json").read_text())["results"] == doc["results"]
    assert json.loads((out / "finetune.json").read_text())["latency"]["relu_weights"] == doc["relu_weights"]
    assert read_policy(out / "policy.json").metrics["latency"]["median_ms"]["int8_relu"]["1"] == \
        doc["results"]["int8_relu"]["1"]["median_ms"]
    assert not (out / "run.json").exists()
    # the same weights and settings: reused; --relu-checkpoint from the CLI measures again
    assert lat._previous(out, doc["weights"], doc["relu_weights"], (1,), "auto", "u8s8", 1) is not None
    assert lat._previous(out, doc["weights"], doc["weights"], (1,), "auto", "u8s8", 1) is None
    loaded.clear()
    assert main(["latency", str(out), "--batches", "1", "--threads", "1", "--relu-checkpoint",
                 str(out / "finetuned.safetensors")]) == 0
    assert loaded == [None, str(out / "finetuned.safetensors"), str(out / "finetuned.safetensors")]
    assert json.loads((out / "latency.json").read_text())["weights_label"].startswith("ReLU: checkpoint finetuned")


@needs_onnx
def test_latency_refuses_unfinished_run(tmp_path):
    from policysearch.deploy.latency import run_latency

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"format": "policysearch.run/v1", "name": "r", "status": "running"}))
    with pytest.raises(ConfigError, match="has not finished"):
        run_latency(str(run_dir))


@needs_onnx
def test_quantize_int8_qdq(tmp_path):
    import onnx

    from policysearch.deploy.onnx_export import export_float
    from policysearch.deploy.ort_int8 import ImageReader, quantize_int8
    from policysearch.models.loading import load_model

    model = load_model("test_fmnist_vit")
    images = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    reader = ImageReader(images, batch_size=4)
    assert len(reader) == 3 and [len(reader.get_next()["x"]) for _ in range(3)] == [4, 4, 2] and reader.get_next() is None
    float_path = export_float(model, tmp_path / "f.onnx")
    types = {}
    for fmt in ("u8s8", "s8s8"):
        q = quantize_int8(float_path, tmp_path / f"{fmt}.onnx", images, fmt=fmt)
        graph = onnx.load(str(q)).graph
        ops = [n.op_type for n in graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        dtype = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in graph.initializer}
        quantized = {n.input[2] for n in graph.node if n.op_type == "QuantizeLinear"}  # activations (+ weights)
        weights = {n.input[2] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in dtype
                   and dtype[n.input[0]] == "int8"}
        types[fmt] = ({dtype[z] for z in quantized - weights}, {dtype[z] for z in weights})
        out = _ort(q).run(None, {"x": images.numpy()})[0]
        assert out.shape == (10, 10)
    assert types["u8s8"] == ({"uint8"}, {"int8"}) and types["s8s8"] == ({"int8"}, {"int8"})
    with pytest.raises(ConfigError, match="unknown int8 format"):
        quantize_int8(float_path, tmp_path / "x.onnx", images, fmt="u4")


@needs_onnx
def test_run_chains_search_finetune_and_latency_and_each_stage_resumes(tmp_path, capsys, monkeypatch):
    """``run --finetune --latency``: the three stages; the same command again redoes none of them."""
    import policysearch.deploy.latency as lat
    from policysearch.cli import main
    from policysearch.run import RunRecord

    argv = ["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--eval-size", "48", "--calib-size", "32",
            "--results-dir", str(tmp_path), "--run-name", "chain", "--storage", f"sqlite:///{tmp_path}/s.db",
            "--device", "cpu", "--no-progress", "--finetune", "--steps", "2", "--train-batch-size", "32",
            "--latency", "--latency-batches", "1", "--latency-threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    stages = RunRecord.load(tmp_path / "chain").data["stages"]
    assert set(stages) >= {"finetune", "latency"} and "int8_gelu" in out
    assert "policy_integer: the searched policy itself: policysearch's integer model" in out
    assert "int8_gelu: ONNX Runtime's int8 QDQ model" in out
    doc = json.loads((tmp_path / "chain" / "latency.json").read_text())
    assert doc["weights"].endswith("finetuned.safetensors")  # measured on the training stage's weights
    measured = []
    monkeypatch.setattr(lat, "measure", lambda *a, **k: measured.append(1) or pytest.fail("measured again"))
    assert main(argv) == 0
    assert not measured and json.loads((tmp_path / "chain" / "latency.json").read_text()) == doc
    # other latency settings measure again; a bad batch list is one CLI error
    assert main([*argv[:-4], "--latency", "--latency-batches", "x"]) == 2

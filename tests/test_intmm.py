"""The integer GEMM engine (``policysearch.quant.intmm``) is exact: its integers equal an int64
reference GEMM at the linear shapes of every supported model, where the old float32 simulation
is not (K > 1040); the Int layers' accumulators, the attention matmuls and QAT use it."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from policysearch.errors import PolicySearchError
from policysearch.models.loading import load_model
from policysearch.quant import IntConv2d, IntLinear
from policysearch.quant.intmm import (
    FLOAT32_EXACT,
    exact_matmul,
    get_engine,
    int_matmul,
    set_engine,
    use_engine,
)

TIMM_MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "vit_base_patch16_224",
               "swin_tiny_patch4_window7_224"]
ZOO_MODELS = ["fmnist_vit", "fmnist_swin"]


def _gemm_shapes(model: nn.Module) -> set[tuple[int, int]]:
    """(K, N) of every linear layer, the convolutions as GEMMs over their patches."""
    shapes = set()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            shapes.add((m.in_features, m.out_features))
        elif isinstance(m, nn.Conv2d):
            shapes.add((m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups, m.out_channels))
    return shapes


def _model_shapes(name: str) -> set[tuple[int, int]]:
    if name in ZOO_MODELS:
        return _gemm_shapes(load_model(name))
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return _gemm_shapes(timm.create_model(name, pretrained=False))


def _ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.to(torch.int64) @ b.to(torch.int64)


@pytest.mark.parametrize("name", ZOO_MODELS + TIMM_MODELS)
def test_int_matmul_equals_int64_at_every_models_linear_shapes(name):
    shapes = _model_shapes(name)
    assert len(shapes) >= 4, shapes
    gen = torch.Generator().manual_seed(0)
    for K, N in sorted(shapes):
        for M in (3, 21):  # below CUDA's M > 16 (padded) and above
            a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=gen)
            b = torch.randint(-128, 128, (K, N), dtype=torch.int8, generator=gen)
            got = int_matmul(a, b)
            assert got.dtype == torch.int32 and got.shape == (M, N)
            assert torch.equal(got.to(torch.int64), _ref(a, b)), (name, M, K, N)
        worst = torch.full((2, K), -128, dtype=torch.int8)  # the largest accumulator of these widths
        assert torch.equal(int_matmul(worst, torch.full((K, N), -128, dtype=torch.int8)).to(torch.int64),
                           torch.full((2, N), K * 128 * 128, dtype=torch.int64))


def _odd_beyond_float32(K: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A (1, K) x (K, 1) int8 product whose value is an odd integer in (2^24, 2^25): float32 has no
    such number, so any float32 GEMM of these operands misses it (1042 * 127^2 + 1)."""
    a = torch.zeros(1, K, dtype=torch.int8)
    b = torch.zeros(K, 1, dtype=torch.int8)
    a[0, :1042], b[:1042, 0] = 127, 127
    a[0, 1042], b[1042, 0] = 1, 1
    truth = 1042 * 127 * 127 + 1
    assert FLOAT32_EXACT < truth < 2 * FLOAT32_EXACT and truth % 2 == 1
    return a, b, truth


def test_beyond_k_1040_the_float32_path_differs_and_the_engine_does_not():
    K = 1536  # fc2 of deit_small / swin_tiny
    a, b, truth = _odd_beyond_float32(K)
    assert int(_ref(a, b)) == truth
    assert int(int_matmul(a, b)) == truth
    old = a.to(torch.float32) @ b.to(torch.float32)  # the old simulation's GEMM
    assert int(old) != truth and abs(int(old) - truth) < 64  # a few float32 ulps (2 here) lost


def test_intlinear_accumulator_beyond_k_1040_old_and_new():
    """The same case through an IntLinear: the engine's accumulator is the int64 truth, the old
    float32 engine's is not."""
    K = 1536
    a, b, truth = _odd_beyond_float32(K)
    lin = nn.Linear(K, 4, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[0] = b[:, 0].float()  # per-channel scale 1: the integer weights are these
        lin.weight[1:, 0] = 127.0
    layer = IntLinear(lin)
    layer.enabled = True
    scale = torch.tensor(0.5)
    x = a.float() * scale
    acc = layer.int_accumulator(x, scale)
    assert int(acc[0, 0]) == truth
    assert torch.equal(acc.to(torch.int64), _ref(a, layer._weight_int()[0].t().to(torch.int8)))
    with torch.no_grad(), use_engine("float"):
        y_old, s_acc = layer(x, scale)
    assert int(torch.round(y_old[0, 0].double() / s_acc[0].double())) != truth


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_intlinear_matches_an_int64_reference_with_bias(bits):
    torch.manual_seed(0)
    lin = nn.Linear(200, 13)
    layer = IntLinear(lin)
    layer.enabled, layer.weight_bits = True, bits
    scale = torch.tensor(0.03)
    lim = 2 ** (bits - 1)
    q = torch.randint(-lim, lim, (2, 9, 200)).float()
    with torch.no_grad():
        y, s_acc = layer(q * scale, scale)
        w_int, s_w = layer._weight_int()
        b = torch.round(lin.bias / (scale * s_w)).to(torch.int64)
        ref = q.to(torch.int64) @ w_int.t().to(torch.int64) + b
    assert torch.equal(layer.int_accumulator(q * scale, scale).to(torch.int64), ref)
    assert torch.equal(y, ref.to(torch.float32) * s_acc)


def test_wide_operands_take_the_exact_wide_path():
    """16-bit activations: not int8, products beyond float32; the int64 result is exact."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(-2**15, 2**15, (5, 384), generator=gen)
    b = torch.randint(-127, 128, (384, 24), generator=gen)
    got = int_matmul(a, b)
    assert got.dtype == torch.int64 and torch.equal(got, a @ b)
    lin = nn.Linear(384, 24)
    layer = IntLinear(lin)
    layer.enabled, layer.act_bits = True, 16
    scale = torch.tensor(1e-3)
    with torch.no_grad():
        acc = layer.int_accumulator(a.float() * scale, scale)
        w_int, s_w = layer._weight_int()
        ref = a @ w_int.t().to(torch.int64) + torch.round(lin.bias / (scale * s_w)).to(torch.int64)
    assert torch.equal(acc, ref)


@pytest.mark.parametrize("kernel,stride,padding", [(16, 16, 0), (4, 4, 0), (3, 2, 1)])
def test_intconv2d_is_a_gemm_over_patches_equal_to_int64(kernel, stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, kernel, stride, padding)
    layer = IntConv2d(conv)
    layer.enabled = True
    scale = torch.tensor(0.02)
    q = torch.randint(-128, 128, (2, 3, 32, 32)).float()
    with torch.no_grad():
        y, s_acc = layer(q * scale, scale)
        w_int, s_w = layer._weight_int()
        ref = torch.nn.functional.conv2d(q.double(), w_int.double(), None, stride, padding)
        ref = ref.to(torch.int64) + torch.round(conv.bias / (scale * s_w)).to(torch.int64).view(1, -1, 1, 1)
        with use_engine("float"):
            y_old, _ = layer(q * scale, scale)
    assert torch.equal(layer.int_accumulator(q * scale, scale).to(torch.int64), ref)
    assert torch.equal(y, ref.to(torch.float32) * s_acc.view(1, -1, 1, 1))
    assert torch.equal(y, y_old)  # K = 3 * k * k <= 1040: the old simulation was exact here


def test_exact_matmul_picks_float32_only_under_its_bound():
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-128, 128, (2, 3, 50, 64), generator=gen).float()  # q·kᵀ of a head of 64
    k = torch.randint(-128, 128, (2, 3, 50, 64), generator=gen).float()
    got = exact_matmul(q, k.transpose(-2, -1), 128, 128)
    assert got.dtype == torch.float32  # 64 * 128 * 128 = 2^20 < 2^24
    assert torch.equal(got.to(torch.int64), q.to(torch.int64) @ k.transpose(-2, -1).to(torch.int64))
    a, b, truth = _odd_beyond_float32(1536)
    wide = exact_matmul(a.float(), b.float())  # bound measured: 1536 * 127^2 > 2^24
    assert wide.dtype == torch.float64 and int(wide) == truth
    with pytest.raises(PolicySearchError, match="2\\^53"):
        exact_matmul(torch.ones(1, 4), torch.ones(4, 1), 2.0**30, 2.0**30)


def test_engine_switch():
    assert get_engine() == "int"
    with use_engine("float"):
        assert get_engine() == "float"
    assert get_engine() == "int"
    with pytest.raises(PolicySearchError, match="unknown GEMM engine 'fast'.*int, float"):
        set_engine("fast")


@pytest.mark.parametrize("conv", [False, True])
def test_qat_value_is_the_integer_value_and_gradient_the_float_ste(conv):
    """With autograd the forward value is exactly the engine's no-grad value; the gradients equal
    those of the float straight-through graph (the old engine's QAT path)."""
    torch.manual_seed(0)
    layer = IntConv2d(nn.Conv2d(3, 8, 4, 4)) if conv else IntLinear(nn.Linear(40, 12))
    layer.enabled = True
    scale = torch.tensor(0.05)
    shape = (2, 3, 8, 8) if conv else (3, 5, 40)
    x0 = torch.randint(-128, 128, shape).float() * scale
    with torch.no_grad():
        y_ref, _ = layer(x0, scale)
    grads = {}
    for engine in ("int", "float"):
        layer.zero_grad()
        x = x0.clone().requires_grad_(True)
        with use_engine(engine):
            y, _ = layer(x, scale)
        r = torch.linspace(-1, 1, y.numel()).view_as(y)
        (y * r).sum().backward()
        grads[engine] = (y.detach(), x.grad, layer.weight.grad, layer.bias.grad)
    assert torch.equal(grads["int"][0], y_ref)
    for g_int, g_float in zip(grads["int"][1:], grads["float"][1:]):
        torch.testing.assert_close(g_int, g_float, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_integers_equal_the_cpus():
    gen = torch.Generator().manual_seed(3)
    for M, K, N in [(3, 192, 10), (21, 768, 576), (197, 1536, 384), (50, 100, 13)]:
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 128, (K, N), dtype=torch.int8, generator=gen)
        assert torch.equal(int_matmul(a.cuda(), b.cuda()).cpu(), int_matmul(a, b))
    a, b, truth = _odd_beyond_float32(1536)
    assert int(int_matmul(a.cuda(), b.cuda())) == truth


def test_integer_onnx_export_writes_the_linear_layers_as_matmulinteger(tmp_path):
    """The engine's GEMMs export as ONNX ``MatMulInteger`` (int8 x int8 -> int32), one per linear
    layer and the patch embedding, and ONNX Runtime reproduces the model within the export's
    tolerance at another batch size than the trace's."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import policysearch as ps
    from policysearch.deploy.onnx_export import compare_onnx, export_integer
    from policysearch.models.tiny import tiny_vit
    from policysearch.policy import Policy

    torch.manual_seed(0)
    model = ps.prepare(tiny_vit())
    x = torch.randn(6, 3, 32, 32)
    ps.calibrate(model, [x])
    ps.apply_policy(model, Policy.uniform(ps.find_sites(model), "ivit"))
    path = export_integer(model, tmp_path / "int.onnx", x[:2])
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    n_gemm = sum(isinstance(m, (IntLinear, IntConv2d)) for m in model.modules())
    assert ops.count("MatMulInteger") == n_gemm
    agree = compare_onnx(path, model, x, batch_size=6)
    assert agree.ok, agree


@pytest.mark.parametrize("make", ["tiny_vit", "tiny_swin"])
def test_engine_equals_the_old_simulation_where_that_was_exact(make):
    """Where every float32 partial sum stayed below 2^24 (tiny models, K <= 64, 8-bit operands) the
    integer engine gives the old float32 simulation's logits bit for bit (layouts included: the
    kernels' float reductions follow them)."""
    import policysearch as ps
    from policysearch.models import tiny
    from policysearch.policy import Policy

    torch.manual_seed(0)
    model = getattr(tiny, make)()
    x = torch.randn(4, 3, 32, 32)
    ps.calibrate(ps.prepare(model), [x])
    for method in ("ivit", "ibert"):
        for bits in (8, 6):
            ps.apply_policy(model, Policy.uniform(ps.find_sites(model), method, weight_bits=bits, act_bits=bits,
                                                  fallback={"gelu": "ivit"}))
            with torch.no_grad():
                new = model(x)
                with use_engine("float"):
                    old = model(x)
            assert torch.equal(new, old), (method, bits)

"""Kernel tests: float bounds at each method's operating point, integer grids, hand-worked cases,
statelessness, documented deviations, gradients, CPU vs CUDA."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from policysearch import kernels
from policysearch.kernels._common import i_exp_poly, shift_exp
from policysearch.kernels.fqvit import log2_codes, log_round
from policysearch.kernels.ivit import IViTLayerNorm
from policysearch.registry import UnknownNameError
from policysearch.spaces.site import KIND_METHODS


def quant(x, bits):
    s = x.abs().max() / (2 ** (bits - 1) - 1)
    return torch.round(x / s) * s, s


def norm(c=64, seed=0):
    torch.manual_seed(seed)
    ln = nn.LayerNorm(c)
    nn.init.normal_(ln.weight, 1.0, 0.1)
    nn.init.normal_(ln.bias, 0.0, 0.1)
    return ln


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(32, 64) * 2


def test_registry_matches_design_table():
    for kind in kernels.kinds():
        assert kernels.methods(kind) == list(KIND_METHODS[kind])


def test_unknown_names_and_bad_bits():
    with pytest.raises(UnknownNameError, match="valid: fp32, ibert, ivit, relu"):
        kernels.create("gelu", "fqvit")
    with pytest.raises(UnknownNameError, match="valid: gelu, layernorm, softmax"):
        kernels.methods("matmul")
    with pytest.raises(ValueError, match="allowed: 8, 16"):
        kernels.create("softmax", "ivit", bits=4)
    with pytest.raises(ValueError, match="needs norm"):
        kernels.create("layernorm", "ivit")
    assert kernels.default_bits("softmax", "fqvit") == 4


# ---- bounds against the float operator at each method's own operating point ------------------
@pytest.mark.parametrize(
    "method, bits, scale, bound",
    [
        ("ibert", 8, 1e-4, 0.0065),   # accumulator input: 1.6 LSB of 1/256
        ("ivit", 8, 0.05, 0.025),     # integer-kernels.md: 0.021
        ("ivit", 16, 0.05, 0.02),     # integer-kernels.md: 0.018
        ("fqvit", 4, 0.05, 0.34),     # 4-bit log2 code of round(S/e): any p > 2/3 becomes 1
    ],
)
def test_softmax_close_to_float(logits, method, bits, scale, bound):
    s = torch.tensor(scale)
    x = torch.clamp(torch.round(logits / s), -(2**15), 2**15) * s
    y, out_scale = kernels.create("softmax", method, bits=bits)(x, s)
    assert (y - x.softmax(-1)).abs().max() <= bound
    q = y / out_scale
    assert torch.equal(q, q.round())
    assert q.min() >= 0


@pytest.mark.parametrize("method, scale, bound", [("ibert", 1e-4, 0.02), ("ivit", 0.05, 0.3), ("relu", 0.05, 0.171)])
def test_gelu_close_to_float(method, scale, bound):
    s = torch.tensor(scale)
    x = torch.round(torch.linspace(-6, 6, 2400).reshape(3, -1) / s) * s
    y, out_scale = kernels.create("gelu", method)(x, s)
    assert (y - F.gelu(x)).abs().max() <= bound
    q = y / out_scale
    assert torch.allclose(q, q.round(), atol=1e-3 * q.abs().max().item())


@pytest.mark.parametrize("method, bits, bound", [("ibert", 22, 0.02), ("ivit", 16, 0.02), ("fqvit", 8, 0.07)])
def test_layernorm_close_to_float(method, bits, bound):
    ln = norm()
    torch.manual_seed(1)
    x, s = quant(torch.randn(4, 10, 64) * 3 + 1, bits)
    y, out_scale = kernels.create("layernorm", method, norm=ln)(x, s)
    with torch.no_grad():
        assert (y - ln(x)).abs().max() <= bound
    q = y / out_scale
    assert torch.allclose(q, q.round(), atol=1e-2)


def test_layernorm_any_rank_reduces_last_dim():
    ln = norm(16)
    x, s = quant(torch.randn(2, 3, 3, 16), 16)
    y4, _ = kernels.create("layernorm", "ivit", norm=ln)(x, s)
    y3, _ = kernels.create("layernorm", "ivit", norm=ln)(x.reshape(2, 9, 16), s)
    assert torch.equal(y4.reshape(2, 9, 16), y3)


# ---- hand-worked cases -----------------------------------------------------------------------
def test_ivit_newton_sqrt_table():
    v = torch.tensor([0.0, 1, 100, 4096, 2.0**20, 2.0**32, 2.0**40])
    assert IViTLayerNorm.newton_sqrt(v).tolist() == [64, 64, 64, 83, 1024, 65536, 2**20]


def test_ivit_shift_exp_by_hand():
    # s = 0.25: x0_int = floor(-1/0.25) = -4. x_int = -6 -> -6 + floor(-3) - floor(-0.375) = -8;
    # q = floor(-8/-4) = 2, r = 0, exp = 0/2 + 4 = 4, * 2^(15-2) = 32768  (2^-2 * 2^15 * 4/... )
    e, scale = shift_exp(torch.tensor([-6.0, 0.0]), torch.tensor(0.25), 15)
    assert e.tolist() == [4 * 2**13, 4 * 2**15]
    # the ratio is 2^-2 = e^(-6*0.25*1.4375/ln2 * ln2)... i.e. log2(e) ~ 1.4375 -> 2^(-1.5*1.333)
    assert scale == pytest.approx(0.25 / 2**15)


def test_ibert_iexp_by_hand():
    s = torch.tensor(0.1)
    # x0_int = floor(-0.6931/0.1) = -7; x_int = -10 -> q = 1, r = -3
    # b_int = floor(2.707325/0.1) = 27, c_int = floor(2.792115/0.01) = 279
    # z = -3 * (-3 + 27) + 279 = 207; exp_int = floor(207 * 2^29)
    e, scale = i_exp_poly(torch.tensor([-10.0, 0.0]), s)
    assert e.tolist() == [207 * 2**29, 279 * 2**30]
    assert scale.item() == pytest.approx(0.35815147 * 0.01 / 2**30, rel=1e-6)


def test_fqvit_log_round_threshold():
    r = torch.tensor([1.0, 1.49, 1.5, 2.0, 2.99, 3.0, 5.9, 6.0])
    assert log_round(r).tolist() == [0, 0, 1, 1, 1, 2, 2, 3]


def test_fqvit_codes_and_mask():
    s = torch.tensor(0.05)
    x = torch.tensor([[0.0, -0.7, -1.4, -40.0, float("-inf")]])
    y, out_scale = kernels.create("softmax", "fqvit")(x, s)
    codes = log2_codes(y)
    assert codes[0, -1] == 16 and codes[0, -2] == 16  # masked: far below the max, and -inf
    assert codes[0, 0] >= 0 and (codes[0, :3] <= 15).all()
    assert torch.isfinite(y).all() and out_scale == 2.0**-15


def test_relu_is_exact():
    s = torch.tensor(0.1)
    x = torch.round(torch.randn(50) * 10) * s
    y, out_scale = kernels.create("gelu", "relu")(x, s)
    assert torch.equal(y, torch.relu(x)) and out_scale == s


def test_ibert_gelu_accepts_per_channel_scale():
    s = torch.tensor([1e-4, 2e-4, 5e-5])
    x = torch.round(torch.randn(7, 3) / s) * s
    y, out_scale = kernels.create("gelu", "ibert")(x, s)
    assert out_scale.shape == (3,) and (out_scale > 0).all()
    assert (y - F.gelu(x)).abs().max() < 0.02


# ---- deviations and state ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ibert", "ivit", "fqvit"])
def test_constant_row_layernorm_is_finite_and_gives_bias(method):
    ln = norm(8)
    x = torch.full((1, 2, 8), 0.5)
    s = torch.tensor(0.5 / 100)
    y, _ = kernels.create("layernorm", method, norm=ln)(x, s)
    assert torch.isfinite(y).all()
    assert (y - ln.bias.detach()).abs().max() < 0.01


@pytest.mark.parametrize("method", ["ibert", "ivit", "fqvit", "fp32"])
def test_masked_softmax_rows(method):
    x = torch.tensor([[0.5, float("-inf"), -100.0, 0.0]])
    y, _ = kernels.create("softmax", method)(x, torch.tensor(0.05))
    assert torch.isfinite(y).all() and y[0, 1] == 0 and y[0, 2] < 1e-3


@pytest.mark.parametrize("kind, method", [("softmax", "ibert"), ("softmax", "ivit"), ("layernorm", "ibert")])
def test_no_state_leaks_between_calls(kind, method):
    torch.manual_seed(0)
    xa, sa = quant(torch.randn(2, 5, 16) * 40, 22 if kind == "layernorm" else 8)
    xb, sb = quant(torch.randn(2, 5, 16), 22 if kind == "layernorm" else 8)
    kw = {"norm": norm(16)} if kind == "layernorm" else {}
    used = kernels.create(kind, method, **kw)
    used(xa, sa)
    fresh = kernels.create(kind, method, **kw)
    assert torch.equal(used(xb, sb)[0], fresh(xb, sb)[0])


def test_ibert_layernorm_overflow_shift():
    ln = norm(64)
    x, s = quant(torch.randn(2, 3, 64) * 10, 22)  # var_int ~ 2^45: needs the overflow shift
    y, _ = kernels.create("layernorm", "ibert", norm=ln)(x, s)
    with torch.no_grad():
        assert (y - ln(x)).abs().max() < 0.02


# ---- gradients and devices ----------------------------------------------------------------------
@pytest.mark.parametrize("kind, method", [(k, m) for k in KIND_METHODS for m in KIND_METHODS[k] if m != "relu"])
def test_gradients_are_those_of_the_float_operator(kind, method):
    torch.manual_seed(0)
    ln = norm(16)
    x0, s = quant(torch.randn(3, 16), 16)
    x = x0.clone().requires_grad_(True)
    kw = {"norm": ln} if kind == "layernorm" else {}
    y, _ = kernels.create(kind, method, **kw)(x, s)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    xr = x0.clone().requires_grad_(True)
    ref = {"softmax": lambda t: t.softmax(-1), "gelu": F.gelu, "layernorm": ln}[kind](xr)
    (ref * w).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind, method", [(k, m) for k in KIND_METHODS for m in KIND_METHODS[k]])
def test_cpu_and_cuda_agree_within_one_lsb(kind, method):
    torch.manual_seed(0)
    bits = {"layernorm": 16}.get(kind, 8)
    x, s = quant(torch.randn(4, 7, 32) * 2, bits)
    ln = norm(32)
    k_cpu = kernels.create(kind, method, **({"norm": ln} if kind == "layernorm" else {}))
    y_cpu, o = k_cpu(x, s)
    ln_gpu = norm(32).cuda()
    ln_gpu.load_state_dict(ln.state_dict())
    k_gpu = kernels.create(kind, method, **({"norm": ln_gpu} if kind == "layernorm" else {}))
    y_gpu, _ = k_gpu(x.cuda(), s.cuda())
    lsb = o.max().item() if o is not None else 1e-5
    assert (y_gpu.cpu() - y_cpu).abs().max().item() <= lsb * 1.01 + 1e-5 or kind == "softmax" and method == "fqvit"


def test_shift_exp_keeps_the_reference_float_order():
    """x/s is not rounded, so (x + floor(x/2)) - floor(x/16) must associate as in I-ViT."""
    torch.manual_seed(0)
    s = torch.tensor(0.0371)
    x = (torch.randn(20000) * 3) / s  # not integral
    x = x - x.max()

    def formula(x_int):
        x_int = x_int + torch.floor(x_int / 2) - torch.floor(x_int / 2**4)
        x0 = torch.floor(-1.0 / s)
        x_int = torch.max(x_int, 15 * x0)
        q = torch.floor(x_int / x0)
        r = x_int - x0 * q
        return torch.clamp(torch.floor((r / 2 - x0) * 2 ** (15 - q)), min=0)

    assert torch.equal(shift_exp(x.clone(), s, 15)[0], formula(x))
    assert torch.equal(shift_exp(x.clone(), s, 15, inplace=True)[0], formula(x))

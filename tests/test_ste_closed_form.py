"""The kernels' reference-STE gradients in closed form against the op-by-op straight-through graphs
they replace (kept here as the oracles): same forward value bit for bit, same gradient up to float
rounding (exactly 0 where the graph's is), on several scales including saturating inputs."""
from __future__ import annotations

import pytest
import torch
from ste_graphs import fqvit_softmax_graph, i_exp_poly_graph, ivit_gelu_graph, shift_exp_graph, shifted_rows
from torch import nn

from policysearch import kernels
from policysearch.kernels._common import ste_gradients
from policysearch.quant.ste import floor_ste, round_ste

RTOL = 1e-5


# ---- the op-by-op graphs (the kernels' reference gradients before they were closed forms) -------
# ---- helpers -----------------------------------------------------------------------------------
def _close(fast: torch.Tensor, slow: torch.Tensor) -> None:
    """Equal up to float rounding, relative to the gradient's magnitude (sums of terms of both
    signs cancel), exactly 0 where the graph's is exactly 0, NaN where it is NaN."""
    assert torch.equal(fast.isnan(), slow.isnan())
    f, g = fast.nan_to_num(0.0), slow.nan_to_num(0.0)
    assert torch.equal(f[g == 0], g[g == 0])
    torch.testing.assert_close(f, g, rtol=RTOL, atol=RTOL * float(g.abs().max()))


def _compare(make, graph, x: torch.Tensor, s: torch.Tensor, params=()) -> None:
    """The kernel (``make()``) under reference STE against ``graph(x, s)``: value bit-identical to
    the kernel's no-grad integer pass, gradients (input and ``params``) as the graph's."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        value, _ = make()(x, s)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with ste_gradients("reference"):
        y, _ = make()(a, s)
    assert torch.equal(y, value)
    grads_fast = torch.autograd.grad((y * w).sum(), [a, *params])
    grads_slow = torch.autograd.grad((graph(b, s) * w).sum(), [b, *params])
    assert grads_slow[0].abs().sum() > 0
    for fast, slow in zip(grads_fast, grads_slow, strict=True):
        _close(fast, slow)


def _inputs(shape, s_val: float, spread: float, seed: int) -> torch.Tensor:
    """Values on the grid of ``s``, with a saturating row and a row of ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(shape, generator=g) * spread / s_val) * s_val
    x.view(-1, shape[-1])[0] = -torch.rand(shape[-1], generator=g) * 200 - 50  # very negative row
    x.view(-1, shape[-1])[1, : shape[-1] // 2] = x.view(-1, shape[-1])[1].max()  # tied maxima
    return x


# ---- I-ViT GELU ----------------------------------------------------------------------------------
@pytest.mark.parametrize("s_val, spread", [(1e-3, 2.0), (0.02, 2.0), (0.1, 3.0), (0.05, 30.0)])
def test_ivit_gelu(s_val, spread) -> None:
    s = torch.tensor(s_val)
    x = _inputs((3, 7, 48), s_val, spread, 1)
    _compare(lambda: kernels.create("gelu", "ivit"), ivit_gelu_graph, x, s)


# ---- I-BERT GELU ---------------------------------------------------------------------------------
def _ibert_gelu_graph(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """I-BERT's ``IntGELU.forward`` graph (with the kernel's ``round_ste`` on ``x / s``)."""
    a, b, c = -0.2888, -1.769, 1.0
    s_e = s / 1.4142
    x_int = round_ste(x / s)
    b_int = torch.floor(b / s_e)
    y_int = torch.sign(x_int.detach()) * ((torch.minimum(x_int.abs(), -b_int) + b_int) ** 2
                                          + torch.floor((c / a) / s_e**2))
    sig_scale = s_e**2 * a * 2**14
    y_int = floor_ste(y_int / 2**14)
    return x_int * (y_int + torch.floor(1.0 / sig_scale)) * (s * sig_scale / 2)


@pytest.mark.parametrize("s_val, spread", [(1e-4, 2.0), (3e-3, 2.0), (0.02, 3.0), (0.3, 3.0)])
def test_ibert_gelu(s_val, spread) -> None:
    s = torch.tensor(s_val)
    x = _inputs((3, 7, 48), s_val, spread, 2)
    tie = -torch.floor(-1.769 / (s / 1.4142))  # |x_int| = -b_int: torch.minimum's tie
    x.view(-1, 48)[2, :5] = torch.stack([tie * s, -tie * s, (tie + 1) * s, torch.tensor(0.0), s])
    _compare(lambda: kernels.create("gelu", "ibert"), _ibert_gelu_graph, x, s)


# ---- I-BERT / I-ViT LayerNorm --------------------------------------------------------------------
def _ibert_std_graph(y_int: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        var = (y_int.detach().double() ** 2).sum(dim=-1).max()
        shift = torch.clamp(torch.ceil((torch.ceil(torch.log2(var)) - 32) / 2), min=0).float()
    var_int = (floor_ste(y_int / 2**shift) ** 2).sum(dim=-1, keepdim=True)
    return floor_ste(torch.sqrt(torch.clamp(var_int, min=1.0))) * 2**shift


def _ivit_std_graph(y_int: torch.Tensor) -> torch.Tensor:
    var_int = (y_int**2).sum(dim=-1, keepdim=True)
    k = torch.full_like(var_int, 2.0**16)
    for _ in range(10):
        k = floor_ste((k + floor_ste(var_int / k)) / 2)
    return k


def _sqrt_layernorm_graph(norm: nn.LayerNorm, std_graph, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """I-BERT's / I-ViT's ``IntLayerNorm.forward`` graph (the bias passing straight through)."""
    weight, bias = norm.weight, norm.bias
    x_int = x / s
    y_int = x_int - round_ste(x_int.mean(dim=-1, keepdim=True))
    factor = floor_ste(2**31 / std_graph(y_int))
    y_int = floor_ste(y_int * factor / 2)
    base = torch.full((), x.shape[-1] ** 0.5 / 2**30)
    y_int = y_int + floor_ste((bias / weight.detach()) / base)
    return y_int * (base * weight)


@pytest.mark.parametrize("method", ["ibert", "ivit"])
@pytest.mark.parametrize("s_val, spread", [(1e-3, 1.0), (0.01, 3.0), (0.2, 3.0), (3e-6, 1.0)])
def test_sqrt_layernorm(method, s_val, spread) -> None:
    torch.manual_seed(4)
    norm = nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32) + 0.5)
        norm.bias.copy_(torch.randn(32) * 0.1)
    s = torch.tensor(s_val)
    x = _inputs((3, 5, 32), s_val, spread, 3)
    x.view(-1, 32)[2] = s  # a constant row (the clamp of var / the Newton floor)
    std_graph = _ibert_std_graph if method == "ibert" else _ivit_std_graph
    _compare(lambda: kernels.create("layernorm", method, norm=norm),
             lambda b, s: _sqrt_layernorm_graph(norm, std_graph, b, s), x, s, params=(norm.weight, norm.bias))


# ---- softmaxes -----------------------------------------------------------------------------------
def _ibert_softmax_graph(x: torch.Tensor, s: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """I-BERT's ``IntSoftmax.forward`` graph (with the kernel's coarsening and this call's range)."""
    x_int = shifted_rows(x, s)
    k = torch.clamp(torch.ceil(torch.log2(2e-5 / s)), 0.0, 126.0)
    x_int = torch.where(k > 0, floor_ste(x_int * 2.0**-k), x_int)
    exp_int = i_exp_poly_graph(x_int, s * 2.0**k)
    act_sf = torch.clamp(exp_int.detach().abs().max(), min=1e-8) / (2**15 - 1)
    exp_int = torch.clamp(round_ste(exp_int / act_sf), -(2**15), 2**15 - 1)
    factor = floor_ste(2**32 / exp_int.sum(dim=-1, keepdim=True))
    return floor_ste(exp_int * factor / 2 ** (32 - bits)) * (1.0 / 2**bits)


def _softmax_inputs(s_val: float, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(3, 4, 12, 12, generator=g) * spread / s_val) * s_val
    x[0, 0, 0, 5:] = -100.0  # masked entries, as attention masks write them
    x[0, 0, 1, 3:] = float("-inf")
    x[0, 1, 2, :6] = x[0, 1, 2].max()  # tied maxima
    x[1, 0, 0] = 0.0  # a constant row
    return x


@pytest.mark.parametrize("s_val, spread", [(1e-5, 1e-3), (5e-5, 2e-2), (1e-3, 2.0), (0.05, 2.0), (0.3, 3.0)])
def test_ibert_softmax(s_val, spread) -> None:
    s = torch.tensor(s_val)
    _compare(lambda: kernels.create("softmax", "ibert", bits=8), _ibert_softmax_graph,
             _softmax_inputs(s_val, spread, 5), s)


def _ivit_softmax_graph(x: torch.Tensor, s: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """I-ViT's ``IntSoftmax.forward`` graph."""
    num = 2**31 - 1
    exp_int = shift_exp_graph(shifted_rows(x, s), s, 15)
    total = torch.clamp(exp_int.sum(dim=-1, keepdim=True), max=num)
    factor = floor_ste(num / total)
    return floor_ste(exp_int * factor / 2 ** (32 - bits)) * (1.0 / 2 ** (bits - 1))


@pytest.mark.parametrize("s_val, spread", [(1e-3, 2.0), (0.02, 2.0), (0.05, 2.0), (0.3, 3.0), (2.0, 3.0)])
def test_ivit_softmax(s_val, spread) -> None:
    s = torch.tensor(s_val)
    _compare(lambda: kernels.create("softmax", "ivit", bits=8), _ivit_softmax_graph,
             _softmax_inputs(s_val, spread, 6), s)


@pytest.mark.parametrize("s_val, spread", [(1e-3, 2.0), (0.05, 2.0), (0.3, 3.0), (1.0, 3.0)])
def test_fqvit_softmax(s_val, spread) -> None:
    s = torch.tensor(s_val)
    _compare(lambda: kernels.create("softmax", "fqvit", bits=4), fqvit_softmax_graph,
             _softmax_inputs(s_val, spread, 7), s)


# ---- FQ-ViT LayerNorm ----------------------------------------------------------------------------
def _fqvit_layernorm_graph(norm: nn.LayerNorm, x: torch.Tensor, in_scale: torch.Tensor,
                           out_scale: torch.Tensor) -> torch.Tensor:
    """``QIntLayerNorm`` ``'int'`` mode with straight-through roundings (the ``fqvit`` module docstring)."""
    from policysearch.kernels._common import value_with_grad_of
    from policysearch.kernels.fqvit import get_mn

    weight, bias = norm.weight, norm.bias
    channels = x.shape[-1]
    s1 = in_scale.min()
    x_q = round_ste(x / in_scale) * torch.round(in_scale / s1)
    mean = x_q.mean(dim=-1) * s1
    spread = channels * (x_q**2).sum(dim=-1) - x_q.sum(dim=-1) ** 2
    flat = ~(spread.detach() > 0)
    std = torch.where(flat, torch.ones_like(spread), (s1 / channels) * torch.sqrt(torch.clamp(spread, min=1.0)))
    a = (s1 / std).unsqueeze(-1) * weight / out_scale
    with torch.no_grad():
        m, n = get_mn(a.detach().abs())
        p2n = 2.0**n
    m = value_with_grad_of(m, a.abs() * p2n)
    b = round_ste((bias - (mean / std).unsqueeze(-1) * weight) / out_scale * p2n)
    out_int = round_ste((a.detach().sign() * m * x_q + b) / p2n)
    out_int = torch.where(flat.unsqueeze(-1), round_ste(bias / out_scale).expand_as(out_int), out_int)
    return out_int * out_scale


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("s_val, spread", [(0.01, 1.0), (0.05, 3.0), (0.5, 3.0)])
def test_fqvit_layernorm(per_channel, s_val, spread) -> None:
    torch.manual_seed(8)
    norm = nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
        norm.weight[3] = 0.0  # sign(a) = 0
        norm.bias.copy_(torch.randn(32) * 0.1)
    in_scale = torch.full((32,), s_val) * (2.0 ** torch.randint(0, 3, (32,)).float() if per_channel else 1.0)
    out_scale = torch.tensor(0.02)
    x = _inputs((3, 5, 32), s_val, spread, 9)
    x.view(-1, 32)[2] = 0.0  # a flat row
    make = lambda: _FixedOut(kernels.create("layernorm", "fqvit", norm=norm), out_scale)  # noqa: E731
    _compare(make, lambda b, s: _fqvit_layernorm_graph(norm, b, s, out_scale), x, in_scale,
             params=(norm.weight, norm.bias))


class _FixedOut(nn.Module):
    """The FQ-ViT LayerNorm with the next quantizer's scale given (as the wiring passes it)."""

    def __init__(self, kernel: nn.Module, out_scale: torch.Tensor) -> None:
        super().__init__()
        self.kernel, self.out_scale = kernel, out_scale

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernel(x, s, out_scale=self.out_scale)


def test_row_max_is_torch_max() -> None:
    """Values and first-maximum indices as ``torch.max`` (ties, ``-inf`` rows, one-element rows)."""
    from policysearch.kernels._common import row_max

    g = torch.Generator().manual_seed(12)
    for shape in [(50, 7), (4, 3, 384), (5, 1)]:
        x = torch.randint(-3, 3, shape, generator=g).float()
        x.view(-1, shape[-1])[0] = float("-inf")
        top, idx = row_max(x)
        ref = x.max(dim=-1, keepdim=True)
        assert torch.equal(top, ref.values) and torch.equal(idx, ref.indices)

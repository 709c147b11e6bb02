import decimal

import numpy as np
import pytest
import torch

from policysearch.quant import PTFQuant, QuantAct, create_observer, dyadic_params, quantize_weight, requantize


def _frexp_reference(ratio: float) -> tuple[float, float]:
    """HAWQ's batch_frexp for one value, written out with Decimal ROUND_HALF_UP."""
    m, e = np.frexp(ratio)
    m = float(decimal.Decimal(m * 2**31).quantize(decimal.Decimal("1"), rounding=decimal.ROUND_HALF_UP))
    return m, 31.0 - e


@pytest.mark.parametrize("ratio", [0.2, 0.012345, 1.0, 3.75, 1 / 3, 7.1e-5])
def test_dyadic_params_match_frexp_half_up(ratio):
    m, e = dyadic_params(torch.tensor([ratio], dtype=torch.float64))
    rm, re = _frexp_reference(ratio)
    assert float(m) == rm and float(e) == re
    assert abs(float(m) / 2 ** float(e) - ratio) <= ratio * 2**-30


def test_requantize_hand_case_and_clamp():
    # s_in = 0.01, s_out = 0.05: integers 30, -31, 100 move to 6, -6, 20; 1000 clamps to 127
    x = torch.tensor([0.30, -0.31, 1.00, 10.0])
    q = requantize(x, torch.tensor(0.01), torch.tensor(0.05), 8)
    assert q.tolist() == [6.0, -6.0, 20.0, 127.0]


def test_quant_act_grid_range_and_ste():
    act = QuantAct()
    x = torch.linspace(-3, 5, 101, requires_grad=True)
    y, s = act(x, 8)
    assert s == pytest.approx(5 / 127)
    q = y / s
    assert torch.allclose(q, q.round(), atol=1e-4) and q.min() >= -128 and q.max() <= 127
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_calibrated_range_is_static():
    act = QuantAct()
    act.calibrating = True
    act(torch.tensor([-1.0, 2.0]), 8)
    act.calibrating = False
    _, s = act(torch.tensor([100.0]), 8)
    assert s == pytest.approx(2 / 127)
    y, _ = act(torch.tensor([100.0]), 8)
    assert y.item() == pytest.approx(2.0, rel=1e-6)  # clamped to the calibrated range


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile"])
def test_observers(name):
    obs = create_observer(name, per_channel=True)
    torch.manual_seed(0)
    for _ in range(3):
        obs.update(torch.randn(4, 8, 16))
    assert obs.ready and obs.min_val < 0 < obs.max_val
    assert obs.ch_min.shape == (16,)
    obs.update(torch.full((2, 16), float("nan")))  # ignored, stays finite
    assert torch.isfinite(obs.min_val)


def test_ema_momentum():
    obs = create_observer("ema")
    obs.update(torch.tensor([0.0, 1.0]))
    obs.update(torch.tensor([0.0, 3.0]))
    assert float(obs.max_val) == pytest.approx(0.95 * 1 + 0.05 * 3)


def test_ptf_factors_are_powers_of_two_and_fit_channels():
    torch.manual_seed(0)
    x = torch.randn(64, 8) * torch.tensor([0.1, 0.1, 0.5, 0.5, 1, 1, 4, 4])
    ptf = PTFQuant()
    ptf.calibrating = True
    ptf(x, 8)
    ptf.calibrating = False
    y, s = ptf(x, 8)
    ratio = s / s.min()
    assert torch.allclose(torch.log2(ratio), torch.log2(ratio).round())
    assert ratio.max() <= 8
    assert s[0] < s[-1]  # small channels get the finer scale
    assert ((y - x).abs() <= s * 0.5 + 1e-6).float().mean() > 0.95


def test_weight_quantization_per_channel():
    w = torch.randn(6, 10) * torch.arange(1, 7).unsqueeze(1)
    wq, s = quantize_weight(w, 8)
    assert s.shape == (6,)
    q = wq / s.unsqueeze(1)
    assert torch.allclose(q, q.round(), atol=1e-4) and q.abs().max() <= 127 + 1e-4
    assert ((wq - w).abs() <= s.unsqueeze(1) / 2 + 1e-6).all()


# -- the paper wiring's quantizers ---------------------------------------------------------------

def _calibrated_act(lo: float, hi: float, bits: int = 8):
    from policysearch.quant import IntAct

    act = IntAct(bits=bits)
    act.calibrating = True
    act(torch.tensor([lo, hi]))
    act.calibrating, act.enabled = False, True
    return act


def test_int_act_requantizes_onto_its_grid_and_adds_residuals_as_integers():
    act = _calibrated_act(-4.0, 4.0, bits=16)
    s_in = torch.tensor(0.001)
    x = torch.round(torch.randn(1000) * 1000) * s_in  # an accumulator on the grid s_in
    ident = torch.round(torch.randn(1000) * 500) * 0.002
    y, s = act(x, s_in, ident, torch.tensor(0.002))
    assert s == pytest.approx(4.0 / 32767)
    q = y / s
    assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 2**15
    # I-ViT's QuantAct(identity): each operand requantized, then the integers added and clamped
    expect = (torch.round(x / s) + torch.round(ident / s)).clamp(-(2**15), 2**15 - 1)
    assert torch.equal(q.round(), expect)
    # disabled (float mode) and calibrating: the float sum, no scale
    act.enabled = False
    y, s = act(x, s_in, ident, None)
    assert s is None and torch.equal(y, x + ident)


def test_int_act_float32_simulation_matches_the_dyadic_multiply():
    from policysearch.quant import IntAct

    torch.manual_seed(0)
    act = _calibrated_act(-6.0, 6.0)
    s_in = torch.tensor(3.1e-4)
    x = torch.round(torch.randn(200_000) * 4000) * s_in
    fast, s = act(x, s_in)
    IntAct.exact = True
    try:
        exact, _ = act(x, s_in)
    finally:
        IntAct.exact = False
    ref = requantize(x, s_in, s, 8)  # HAWQ: float64, 31-bit mantissa
    assert torch.equal(torch.round(exact / s), ref)
    differ = (torch.round(fast / s) != ref).float()
    assert differ.mean() < 1e-4 and (torch.round(fast / s) - ref).abs().max() <= 1


def test_requantize_without_clamp():
    x = torch.tensor([10.0])
    assert requantize(x, torch.tensor(0.01), torch.tensor(0.05), None).item() == 200.0


def test_int_linear_integer_path_equals_the_dequantized_product():
    from policysearch.quant import IntLinear

    torch.manual_seed(0)
    lin = IntLinear(torch.nn.Linear(64, 16))
    lin.enabled = True
    s = torch.tensor(0.02)
    x = torch.round(torch.randn(4, 10, 64) * 40).clamp(-128, 127) * s
    with torch.no_grad():
        y, s_acc = lin(x, s)
    w_int, s_w = lin._weight_int()
    acc = torch.round(x / s) @ w_int.T + torch.round(lin.bias / (s * s_w))
    assert torch.equal(torch.round(y / s_acc), acc)
    wq, _ = lin._weight()
    torch.testing.assert_close(y, torch.nn.functional.linear(x, wq, lin.bias), atol=1e-4, rtol=1e-4)
    xg = x.clone().requires_grad_(True)  # with autograd: the dequantized product, gradients flow
    yg, _ = lin(xg, s)
    yg.sum().backward()
    torch.testing.assert_close(yg.detach(), y, atol=1e-4, rtol=1e-4)
    assert xg.grad is not None and lin.weight.grad is not None

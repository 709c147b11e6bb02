"""FQ-ViT integer operators (Lin et al. 2022): Log-Int-Softmax and the PTF LayerNorm.

Reference: megvii-research/FQ-ViT @ 5daf5915, ``models/ptq/layers.py`` (``QIntSoftmax`` with
``log_i_softmax=True``, ``QIntLayerNorm`` in ``'int'`` mode). FQ-ViT has no integer GELU.
Design input precision: softmax from a uint8 activation; LayerNorm from a uint8 Power-of-Two-Factor
(per-channel ``s * 2^alpha``) activation. Constants: i-exp as I-BERT (``n = 30``, no 16-bit
requantization); LIS output ``bits = 4``, ``log_round`` threshold ``1.5 * 2^f``; ``get_MN`` with
an 8-bit ``M`` and ``N <= 31``.

Output representation: the LIS output ``2^-qlog`` (codes 0..15, masked = 0) is expressed on the
uniform grid ``out_scale = 2^-(2^bits - 1)`` with ``q_out = 2^(2^bits - 1 - qlog)``, so
``y = q_out * out_scale`` is exactly the reference's ``y``; :func:`log2_codes` recovers the codes.
Only ``bits = 4`` is offered: 8-bit LIS (``BIT_TYPE_S = uint8``) would need ``out_scale = 2^-255``
and values down to ``2^-255``, which float32 cannot hold (the reference's own ``2^-qlog`` flushes
to 0 for ``qlog > 149``).

Deviations, each tested:

* Softmax: an entry whose ``exp_int`` is 0 (coarse scales only: ``s > 1.67`` gives
  ``c_int = 0``) gives ``S / 0 = inf`` (or ``0 / 0 = NaN`` when the whole row is 0) in the
  reference's ratio; here it is masked directly (code >= 16, value 0), which is what the
  reference's mask does with that ``inf``. A row that is entirely ``-inf`` (NaN in the reference)
  gives finite codes; ``-inf`` or ``-100``-masked entries of a row with a finite maximum are
  clamped as in the reference.
* LayerNorm: ``out_scale`` (the next activation quantizer's scale in the reference) is an
  optional argument; without it, it is derived from this call as ``max|LayerNorm(x)| / 127``.
  A constant row (``std = 0``, or a negative one-pass variance from float32 cancellation, both
  NaN in the reference, FQ-ViT #31) outputs the bias quantized to ``out_scale``, as a float
  LayerNorm with any eps gives. ``in_scale_expand`` (Swin PatchMerging) is the caller's job: pass
  the tiled (C,) scale. ``out_scale`` may be () / (1,) / (C,), as the reference's reshape allows.
* LayerNorm: the spread ``C * sum(x_q^2) - sum(x_q)^2`` is formed exactly (float64, an integer
  below 2^53; the reference's float32 one rounds beyond 2^24 in the library's summation order) and
  its root and ``get_MN``'s ``log2`` are the correctly rounded float32 values (through float64):
  torch 2.14's float32 ``sqrt`` and ``log2`` on CPU are not correctly rounded (``sqrt`` off by one
  ulp on about 20 % of random inputs), ONNX Runtime's are, and one ulp of ``std`` moves ``M``, ``B``
  or a rounding. So the integers do not depend on the library (the ONNX export agrees bit-exactly;
  numerics 2026.12.4); they differ from the reference's only where its float32 rounding did.

Gradients with ``ste_gradients("reference")`` (``_common``): FQ-ViT is post-training only (no
QAT code), so its operators get the rule of I-BERT's and I-ViT's: the integer computation's own
graph with every round and floor straight through, scales fixed. Softmax: i-exp as I-BERT's graph,
``round_ste`` on ``sum / exp``, and the log2 code passes the gradient of ``log2(ratio)`` (the
``log_round`` of a value, like a rounding), so ``2^-code`` differentiates as ``exp / sum``.
LayerNorm: the per-token ``mean`` / ``std`` (float in the reference) carry gradient, the 8-bit
``M`` of ``get_MN`` passes that of ``|A| * 2^N`` (a floor), ``N`` and the sign are held fixed; the
weight reaches the output through ``A`` and ``B``, the bias through ``B``. Both gradients are
computed in closed form (equal to the op-by-op graphs up to float rounding, tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.kernels._common import (
    as_scale,
    exp2_int,
    exp2_int_traceable,
    i_exp_poly,
    i_exp_poly_parts,
    reference_grad,
    softmax_front,
    softmax_grad,
    with_ste,
)

__all__ = ["FQViTLayerNorm", "FQViTSoftmax", "layernorm", "log2_codes", "log_round_power", "log_round_power_traceable", "softmax"]


def log_round(ratio: torch.Tensor) -> torch.Tensor:
    """FQ-ViT's ``log_round``: ``floor(log2 r)``, plus 1 where ``r >= 1.5 * 2^floor(log2 r)``.

    The reference's float32 ``log2`` rounds up to ``k`` just below ``r = 2^k``; the exact exponent
    used here then gives ``k - 1`` plus the ``+1`` of the midpoint test: the same code.
    """
    return torch.frexp(log_round_power(ratio)).exponent.to(ratio.dtype) - 1


def log_round_power(ratio: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``2^log_round(r)`` for finite float32 ``r >= 1`` (``inf`` for ``inf``), from the float bits.

    With ``r = 1.f * 2^e``, ``r >= 1.5 * 2^e`` is the leading fraction bit, so adding it to the
    bits carries into the exponent exactly when the midpoint test adds 1; clearing the fraction
    leaves ``2^code``. Integer adds and masks only, no ``log2`` or ``frexp`` (both slow on CPU).
    ``inplace=True`` overwrites a contiguous ``ratio``. (ONNX export swaps in a traceable twin.)
    """
    bits = ratio.view(torch.int32) if inplace else ratio.contiguous().view(torch.int32).clone()
    return bits.add_(1 << 22).bitwise_and_(-(1 << 23)).view(torch.float32)


def log_round_power_traceable(ratio: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """:func:`log_round_power` from ``frexp`` instead of the float32 bits, for ONNX export (the
    catalogue's ``onnx_swaps``): the same values (``r = m * 2^e``: code ``e - 1``, plus 1 where
    ``m >= 0.75``). Ratios are capped at ``2^100`` first (``inf`` has no exponent), which keeps
    every masked code masked."""
    m, e = torch.frexp(torch.clamp(ratio, max=2.0**100))
    code = (e.to(ratio.dtype) - 1) + (m >= 0.75).to(ratio.dtype)
    return exp2_int_traceable(code)


def log2_codes(y: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Codes ``qlog`` of a LIS output (``2^bits`` stands for a masked, zero entry)."""
    return torch.where(y > 0, -torch.log2(y), torch.full_like(y, 2**bits))


class FQViTSoftmax(nn.Module):
    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = bits

    @staticmethod
    def row_local() -> bool:
        """Its reductions are the row's maximum and sum: slices of a batch give the same integers."""
        return True

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = as_scale(scale, x)
        out_scale = torch.tensor(2.0 ** -(2**self.bits - 1), device=x.device)
        if reference_grad(x):
            return self._forward_reference(x, s.detach(), out_scale), out_scale
        with torch.no_grad():
            x_int = x.detach() / s
            x_int = x_int.sub_(x_int.amax(dim=-1, keepdim=True)).nan_to_num_(nan=0.0, neginf=-3.0e38)
            exp_int, _ = i_exp_poly(x_int, s, inplace=True)
            y = self._output(exp_int, out_scale)
        return with_ste(x, y, lambda: x.softmax(-1)), out_scale

    def _output(self, exp_int: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
        """``2^-log_round(round(sum / exp))`` on the output grid (overwrites ``exp_int``)."""
        total = exp_int.sum(dim=-1, keepdim=True).clamp_(min=1.0)  # 0 only when every exp is
        # ratio = round(sum / exp) >= 1, inf where exp_int = 0 (the reference's inf, masked)
        ratio = (total / exp_int).round_()
        # 2^(top - code) for code <= top, and floor(2^top / 2^code) = 0 for code > top (the
        # reference's mask, qlog >= 2^bits) and for ratio = inf: one pass each, no bool mask
        power = log_round_power(ratio, inplace=True)
        return power.reciprocal_().mul_(2.0 ** (2**self.bits - 1)).floor_().mul_(out_scale)

    def _forward_reference(self, x: torch.Tensor, s: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
        """The integer pass (the same operations on the same integers) with the integer
        computation's straight-through gradient (module docstring) in closed form
        (:func:`softmax_grad`): ``y = 2^(top - code)``, ``code`` passing ``d log2(ratio)``, gives
        ``dy/dratio = -y / ratio``, and ``ratio = round_ste(S / d)`` (``d = exp``, or 1 where ``exp =
        0``) sends ``1/d`` of that to the row sum ``S`` and ``-S / d^2`` to its own non-zero entry; the
        clamp of ``code`` to ``[0, top]`` passes for ``0 < code < top`` (``torch.clamp``'s gradient
        is 0 at its bounds). Equal to the op-by-op graph up to float rounding (tested)."""
        top = 2**self.bits - 1
        with torch.no_grad():
            u, du, idx = softmax_front(x.detach(), s)
            e, de = i_exp_poly_parts(u, s, inplace=True)
            total = e.sum(dim=-1, keepdim=True)
            zero = (e == 0).to(e.dtype)
            denom = e.add_(zero)  # exp, or 1 where exp = 0
            ratio = torch.clamp(torch.round(total / denom), min=1.0)
            y = log_round_power(ratio).reciprocal_().mul_(2.0**top).floor_().mul_(1.0 - zero)  # 2^(top - code)
            # the integer pass's output: its ratio is the same where exp > 0 (then sum >= exp >= 1),
            # and it gives 0 where exp = 0 (ratio = inf), as the masked 2^(top - code) here
            out = y * out_scale
            # the clamp of code to [0, top] passes for 0 < code < top, i.e. 2 <= y <= 2^(top - 1)
            y_passing = y.mul_(((y > 1.0) & (y < 2.0**top)).to(y.dtype)).mul_(out_scale)
            d = y_passing.div_(ratio).div_(denom)  # y / (ratio d)
            a = (d * total).div_(denom).mul_(1.0 - zero)
            d = d.neg_()
            du = du.mul_(de)
        return softmax_grad(x, out, a.mul_(du), du, d, idx)


def get_mn(a: torch.Tensor, bit: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``a ~= M / 2^N`` with an 8-bit ``M`` (FQ-ViT ``get_MN``).

    ``floor(log2 a)`` is of the float32 ``log2`` as in the reference (correctly rounded, through
    float64: module docstring), not the exact exponent: for
    the float just below ``2^k`` (k >= 3) ``log2`` rounds up to ``k``, and the reference then uses
    ``(M, N) = (127, 7 - k)`` where the exact exponent would give ``(255, 8 - k)``.
    """
    m, n, _ = _mn_and_power(a, bit)
    return m, n


def _mn_and_power(a: torch.Tensor, bit: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`get_mn` and ``2^N``, which the LayerNorm needs too (computed once)."""
    n = torch.clamp_(bit - 1 - torch.floor_(torch.log2(a.double()).float()), 0, 31)  # a = 0 -> N = 31, M = 0
    p2n = exp2_int(n)
    m = torch.clamp_(torch.floor_(a * p2n), 0, 2**bit - 1)
    return m, n, p2n


class FQViTLayerNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def _float(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        return F.layer_norm(x, n.normalized_shape, n.weight, n.bias, n.eps)

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor, *, out_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.norm.weight.detach(), self.norm.bias.detach()
        with torch.no_grad():
            if out_scale is None:
                out_scale = (self._float(x.detach()).abs().max() / 127).clamp(min=1e-8)
            out_scale = as_scale(out_scale, x)
            in_scale = as_scale(scale, x)
            channels = x.shape[-1]
            x_q = torch.round(x.detach() / in_scale)
            s1 = in_scale.min()
            x_q = x_q * torch.round(in_scale / s1)
            mean = x_q.mean(dim=-1) * s1
            xq64 = x_q.double()  # the spread exactly (an integer below 2^53), its root correctly rounded
            spread = channels * (xq64**2).sum(dim=-1) - xq64.sum(dim=-1) ** 2
            std = (s1 / channels) * torch.sqrt(spread).float()
            flat = ~(std > 0)
            std = torch.where(flat, torch.ones_like(std), std)
            a = (s1 / std).unsqueeze(-1) * weight / out_scale
            m, _, p2n = _mn_and_power(a.abs())
            b = torch.round_((bias - (mean / std).unsqueeze(-1) * weight) / out_scale * p2n)
            # sign(a) is sign(weight): s1 / std and out_scale are positive (a per-channel vector)
            out_int = torch.round_((torch.sign(weight / out_scale) * m * x_q + b) / p2n)
            # a constant row is rare: skip the select on CPU when there is none (off the CPU the
            # check would cost a sync; in an ONNX trace the select must stay in the graph)
            if torch.jit.is_tracing() or x.device.type != "cpu" or bool(flat.any()):
                out_int = torch.where(flat.unsqueeze(-1), torch.round(bias / out_scale).expand_as(out_int), out_int)
        return with_ste(x, out_int * out_scale, lambda: self._float(x),
                        lambda: self._reference_graph(x, in_scale, out_scale),
                        params=(self.norm.weight, self.norm.bias)), out_scale

    def _reference_graph(self, x: torch.Tensor, in_scale: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
        """``QIntLayerNorm`` ``'int'`` mode's straight-through gradient (module docstring) in closed
        form (:class:`_LayerNormGrad`), equal to the op-by-op graph up to float rounding (tested).

        The graph: ``x_q = round(x / s) R``, ``mean = avg(x_q) s1``, ``spread = C sum x_q^2 - (sum
        x_q)^2``, ``std = s1 / C sqrt(max(spread, 1))`` (1 on a flat row), ``a = s1 / std w / o``,
        ``m`` passing the gradient of ``|a| 2^N``, ``b = round((bias - mean / std w) / o 2^N)``,
        ``out = round((sign(a) m x_q + b) / 2^N) o`` (``round(bias / o) o`` on a flat row). Per
        element, ``d out`` sends ``g o / 2^N sign(a) m`` to ``x_q`` directly, ``g o x_q |sign(a)|``
        to ``a`` and ``g`` to ``b o / 2^N``; ``a`` and ``mean / std`` collect per row into ``std``
        and ``mean``, which return to ``x_q`` through the spread and the average."""
        weight, bias = self.norm.weight, self.norm.bias
        in_scale, out_scale = in_scale.detach(), out_scale.detach()
        with torch.no_grad():
            w = weight.detach()
            channels = x.shape[-1]
            s1 = in_scale.min()
            rep = torch.round(in_scale / s1)
            x_q = torch.round(x.detach() / in_scale) * rep
            total = x_q.sum(dim=-1, keepdim=True)
            mean = x_q.mean(dim=-1, keepdim=True) * s1
            spread = channels * (x_q**2).sum(dim=-1, keepdim=True) - total**2
            live = (spread > 0).to(x_q.dtype)  # 0 on a flat row: its output is the bias's
            root = torch.sqrt(torch.clamp(spread, min=1.0))
            std = torch.where(live > 0, (s1 / channels) * root, torch.ones_like(root))
            inv = s1 / std
            a = inv * w / out_scale
            m, _, p2n = _mn_and_power(a.abs())
            sign = a.sign()
            k_a = (x_q * out_scale).mul_(sign.abs()).mul_(live)  # d out / d a, per unit g
            k_std = (k_a * (w / out_scale)).mul_(-s1).add_(live * w * mean).div_(std).div_(std)
            k_mean = (live * w).div_(std).neg_()
            k_w = (k_a * inv / out_scale).sub_(live * (mean / std))
            d_in = rep / in_scale
            d_direct = (out_scale * live / p2n).mul_(sign).mul_(m).mul_(d_in)
            d_spread = (x_q * (2 * channels)).sub_(2 * total).mul_(
                ((s1 / channels) * 0.5 / root).mul_((spread > 1.0).to(root.dtype)).mul_(live)).mul_(d_in)
            d_mean = (s1 / channels) * d_in
        return _LayerNormGrad.apply(x, weight, bias, d_direct, d_spread, d_mean, k_std, k_mean, k_w)


class _LayerNormGrad(torch.autograd.Function):
    """Backward of :meth:`FQViTLayerNorm._reference_graph`: ``dx = g d_direct + (sum g k_std)
    d_spread + (sum g k_mean) d_mean`` (row sums), ``dw = sum_rows g k_w``, ``db = sum_rows g``;
    the forward returns ``d_direct`` (a surrogate value: ``with_ste`` forwards the integer pass)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(*parts)
        return parts[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        d_direct, d_spread, d_mean, k_std, k_mean, k_w = ctx.saved_tensors
        lead = tuple(range(grad.dim() - 1))
        g_w = (grad * k_w).sum(dim=lead) if ctx.needs_input_grad[1] else None
        g_b = grad.sum(dim=lead) if ctx.needs_input_grad[2] else None
        g_x = None
        if ctx.needs_input_grad[0]:
            g_std = (grad * k_std).sum(dim=-1, keepdim=True)
            g_mean = (grad * k_mean).sum(dim=-1, keepdim=True)
            g_x = (grad * d_direct).addcmul_(g_std, d_spread).addcmul_(g_mean, d_mean)
        return g_x, g_w, g_b, *([None] * 6)


# ---- kernel factories (the method catalogue's ``kernel``: policysearch.methods) ----
def softmax(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return FQViTSoftmax(bits)


def layernorm(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return FQViTLayerNorm(norm)

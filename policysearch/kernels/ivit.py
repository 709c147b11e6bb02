"""I-ViT integer operators (Li & Gu 2023): Shiftmax, ShiftGELU, I-LayerNorm.

Reference: zkkli/I-ViT @ 380ba991, ``models/quantization_utils/quant_modules.py``
(``IntSoftmax``, ``IntGELU``, ``IntLayerNorm``), the PyTorch modules (not the TVM variants).
Design input precision: softmax and GELU from 8-bit activations, LayerNorm from a 16-bit
activation (the Newton iteration needs it to converge). Constants: softmax ``n = 15``; GELU
``n = 23`` and 1.702; log2(e) ~ 1.0111b via ``x + floor(x/2) - floor(x/16)``; numerators
``2^31 - 1`` (2^31 in float32); Newton 10 iterations from 2^16; softmax output 16 bits in
ViT/DeiT and 8 bits in Swin (the caller passes ``bits``), scale ``1 / 2^(bits-1)``.

Deviations, each tested:

* LayerNorm: reduces over the last dim of any rank and computes ``dim_sqrt`` per call (the
  reference caches it from its first call and needs 3-D input). ``eps`` is ignored, as in the
  reference; a constant row gives ``std_int = 64`` (the Newton floor) and the bias, as there.
* Softmax: a row that is entirely ``-inf`` (NaN in the reference and in the float softmax) gives a
  uniform row. ``-inf`` or ``-100``-masked entries in a row with a finite maximum are clamped to
  ``n * x0_int`` exactly as in the reference (no deviation).
* ``out_scale`` is created on ``x.device`` (the reference calls ``.cuda()``).
* GELU: ``x_int = round(x / s)`` (the reference: ``x / s`` in float32, within 2^-23 of the
  integer), so the output ``sig_int * x_int`` lies exactly on its grid (the reference's is off it
  by up to ``|x_int| * 127 * 2^-23``; the next requantization rounds that away but for ties).

Not a deviation: at fine input scales a very negative GELU row makes ``2^(n - q)`` overflow to
``inf`` in the reference (its output is then 0 or garbage); the same ``inf`` is reproduced here.
GELU ``bits`` is the sigmoid's ``output_bit`` (8 only, the reference's default and wiring).

Gradients with ``ste_gradients("reference")`` (``_common``): the gradients of the graphs of the
reference's ``IntSoftmax``, ``IntGELU`` and ``IntLayerNorm`` with their ``floor_ste`` /
``round_ste`` (the LayerNorm's Newton steps pass straight through), computed in closed form
(equal to the op-by-op graphs up to float rounding, tested). Deviations: the exponent
``n - q`` is capped at 127 in the graph (no NaN gradient where the integers saturate to ``inf``),
and the LayerNorm bias gets its gradient (``IntSqrtLayerNorm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.kernels._common import (
    IntSqrtLayerNorm,
    as_scale,
    reference_grad,
    row_max,
    shift_exp,
    shift_exp_parts,
    softmax_front,
    softmax_grad,
    with_ste,
)

__all__ = ["IViTGELU", "IViTLayerNorm", "IViTSoftmax", "gelu", "layernorm", "softmax"]

_NUMERATOR = 2**31 - 1


class IViTSoftmax(nn.Module):
    N = 15

    def __init__(self, output_bit: int = 8) -> None:
        super().__init__()
        self.output_bit = output_bit

    @staticmethod
    def row_local() -> bool:
        """Its reductions are the row's maximum and sum: slices of a batch give the same integers."""
        return True

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = as_scale(scale, x)
        out_scale = torch.tensor(1.0 / 2 ** (self.output_bit - 1), device=x.device)
        if reference_grad(x):
            return self._forward_reference(x, s.detach(), out_scale), out_scale
        with torch.no_grad():
            x_int = x.detach() / s
            x_int = x_int.sub_(x_int.amax(dim=-1, keepdim=True))
            x_int = torch.nan_to_num_(x_int, nan=0.0, neginf=-3.0e38)
            exp_int, _ = shift_exp(x_int, s, self.N, inplace=True)
            total = torch.clamp(exp_int.sum(dim=-1, keepdim=True), max=_NUMERATOR)
            factor = torch.floor(_NUMERATOR / total)
            out_int = torch.floor_(exp_int.mul_(factor).mul_(2.0 ** (self.output_bit - 32)))
        return with_ste(x, out_int.mul_(out_scale), lambda: x.softmax(-1)), out_scale

    def _forward_reference(self, x: torch.Tensor, s: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
        """The integer pass (the same operations on the same integers: ``x / s - max <= 0`` never
        reaches :func:`shift_exp_parts`' exponent cap) with ``IntSoftmax.forward``'s straight-through
        gradient (``e = int_exp_shift(x / s - max)``, ``T = min(sum e, NUM)``, ``f = floor(NUM / T)``,
        ``floor(e f 2^(b-32))``; floors passing) in closed form (:func:`softmax_grad`): ``dy_i/de_i =
        c f`` and ``dy_i/de_j`` gains ``-c e_i NUM / T^2`` where ``sum e < NUM`` (the clamp's open
        bound). Equal to the op-by-op graph up to float rounding (tested)."""
        with torch.no_grad():
            u, du, idx = softmax_front(x.detach(), s)
            e, de = shift_exp_parts(u, s, self.N, inplace=True, nonpositive=True)
            total = e.sum(dim=-1, keepdim=True)
            passes = torch.sub(_NUMERATOR, total).sign_().clamp_(min=0.0)  # total < NUM: float passes only
            total = torch.clamp_(total, max=_NUMERATOR)
            factor = torch.floor(_NUMERATOR / total)
            y = torch.floor_(e.mul(factor).mul_(2.0 ** (self.output_bit - 32))).mul_(out_scale)
            c = out_scale / 2 ** (32 - self.output_bit)
            d = e.mul_(((-_NUMERATOR / total) / total).mul_(passes).mul_(c))
            du = du.mul_(de)
        return softmax_grad(x, y, du.mul(factor.mul_(c)), du, d, idx)


class IViTGELU(nn.Module):
    N = 23
    SIGMOID_K = 1.702

    @staticmethod
    def row_local() -> bool:
        """Its one reduction is the row maximum: slices of a batch give the same integers."""
        return True

    def __init__(self, output_bit: int = 8) -> None:
        super().__init__()
        self.output_bit = output_bit

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = as_scale(scale, x)
        out_scale = s / 2 ** (self.output_bit - 1)
        if reference_grad(x):
            return self._forward_reference(x, s.detach()), out_scale
        with torch.no_grad():
            pre_x_int = torch.div(x.detach(), s).round_()  # the integers (see the deviation)
            s_sig = s * self.SIGMOID_K
            x_max = pre_x_int.amax(dim=-1, keepdim=True)
            exp_int, _ = shift_exp(pre_x_int - x_max, s_sig, self.N, inplace=True)
            y = self._sigmoid_times_x(pre_x_int, exp_int, shift_exp(-x_max, s_sig, self.N)[0], out_scale)
        return with_ste(x, y, lambda: F.gelu(x)), out_scale

    def _sigmoid_times_x(self, pre_x_int: torch.Tensor, exp_int: torch.Tensor, exp_max: torch.Tensor,
                         out_scale: torch.Tensor) -> torch.Tensor:
        """The integer pass after its two exps, in one new buffer."""
        total = torch.clamp_(exp_max + exp_int, max=_NUMERATOR)
        factor = torch.floor_(total.reciprocal_().mul_(_NUMERATOR))  # NUM / total, as torch forms it
        sig_int = torch.floor_(factor.mul_(exp_int).mul_(2.0 ** (self.output_bit - 32)))  # (e * f) * 2^-k
        return sig_int.mul_(pre_x_int).mul_(out_scale)

    def _forward_reference(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The integer pass (the same operations on the same integers: ``x_int - x_max <= 0`` never
        reaches :func:`shift_exp_parts`' exponent cap) with ``IntGELU.forward``'s straight-through
        gradient (floors pass; the row maximum and ``e^(-x_max)`` carry gradient as there; ``x_int``
        rounded straight through, as forward) in closed form (:class:`_GELUGrad`): equal to the
        op-by-op graph up to float rounding (tested)."""
        with torch.no_grad():
            pre = torch.div(x.detach(), s).round_()
            s_sig = s * self.SIGMOID_K
            x_max, idx = row_max(pre)
            e, de = shift_exp_parts(pre - x_max, s_sig, self.N, inplace=True, nonpositive=True)
            y = self._sigmoid_times_x(pre, e, shift_exp(-x_max, s_sig, self.N)[0], s / 2 ** (self.output_bit - 1))
            d, w = self._gradient_parts(pre, x_max, e, de, s)
        return _GELUGrad.apply(x, y, d, w, idx)

    def _gradient_parts(self, pre: torch.Tensor, x_max: torch.Tensor, e: torch.Tensor, de: torch.Tensor,
                        s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``dy_i/dx_i = d`` and ``dy_j/dx_max = s w_j`` (``x_max`` at the ``max``'s index) from the
        graph's values (``e^(-x_max)`` with the exponent capped, as :func:`shift_exp_ste`); may
        overwrite ``pre`` and ``e``.

        With ``u = x_int - x_max``, ``e = exp(u)``, ``m = exp(-x_max)``, ``t = min(e + m, NUM)``,
        ``f = floor(NUM / t)``, ``sig = floor(e f 2^-k)`` and ``y = x_int sig c``: ``dy/dx_int = c sig
        + c x_int (f 2^-k + T) e'(u)`` with ``T = -e 2^-k NUM / t^2`` (where ``e + m < NUM``, the
        clamp's open bound), and ``dy/dx_max = -c x_int ((f 2^-k + T) e'(u) + T m'(-x_max))``."""
        shift, out_scale = 2.0 ** (self.output_bit - 32), s / 2 ** (self.output_bit - 1)
        s_sig = s * self.SIGMOID_K
        m, dm = shift_exp_parts(-x_max, s_sig, self.N)
        total = e + m
        passes = torch.sub(_NUMERATOR, total).sign_().clamp_(min=0.0)  # total < NUM: float passes only
        total = torch.clamp_(total, max=_NUMERATOR)
        factor = torch.floor(_NUMERATOR / total)
        t_coef = e.mul(-shift * _NUMERATOR).div_(total).div_(total).mul_(passes)
        sig = torch.floor_(e.mul_(factor).mul_(shift))  # floor((e * factor) * shift), in e's buffer
        c_pre = pre.mul_(out_scale)  # c * x_int
        q = factor.mul_(shift).add_(t_coef).mul_(de).mul_(c_pre)
        w = t_coef.mul_(dm).mul_(c_pre).add_(q).neg_().div_(s)
        d = sig.mul_(out_scale).add_(q).div_(s)
        return d, w


class _GELUGrad(torch.autograd.Function):
    """Forward ``y`` (the integer pass); backward ``dx_i = g_i d_i + [i = idx] sum_j g_j w_j``
    (:meth:`IViTGELU._gradient_parts`; the ``1 / s`` of ``x / s`` is in ``d`` and ``w``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor, w: torch.Tensor,  # noqa: ANN001
                idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(d, w, idx)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        d, w, idx = ctx.saved_tensors
        row = (grad * w).sum(dim=-1, keepdim=True)
        return (grad * d).scatter_add_(-1, idx, row), None, None, None, None


class IViTLayerNorm(IntSqrtLayerNorm):
    NUMERATOR = _NUMERATOR  # 2^31 - 1, i.e. 2^31 once it meets float32
    ITERATIONS = 10

    @classmethod
    def newton_sqrt(cls, var_int: torch.Tensor) -> torch.Tensor:
        """I-ViT's integer square root: 10 Newton steps from 2^16 (floors at 64 for small inputs)."""
        k = torch.full_like(var_int, 2.0**16)
        for _ in range(cls.ITERATIONS):
            k = torch.floor((k + torch.floor(var_int / k)) / 2)
        return k

    def std_int(self, y_int: torch.Tensor) -> torch.Tensor:
        return self.newton_sqrt((y_int.double() ** 2).sum(dim=-1, keepdim=True).float())

    def std_int_grad(self, y_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph's Newton root of ``sum y^2`` and its straight-through derivative: each step
        ``k' = floor((k + floor(v / k)) / 2)`` passes ``dk' = (dk + 1 / k - v dk / k^2) / 2``."""
        var = (y_int**2).sum(dim=-1, keepdim=True)
        k = torch.full_like(var, 2.0**16)
        dk = torch.zeros_like(var)
        for _ in range(self.ITERATIONS):
            dk = (dk + (1.0 / k - var * dk / k**2)) / 2
            k = torch.floor((k + torch.floor(var / k)) / 2)
        return k, (2.0 * y_int).mul_(dk)


# ---- kernel factories (the method catalogue's ``kernel``: policysearch.methods) ----
def softmax(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return IViTSoftmax(bits)


def gelu(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return IViTGELU(bits)


def layernorm(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return IViTLayerNorm(norm)

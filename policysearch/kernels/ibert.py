"""I-BERT integer operators (Kim et al. 2021): i-exp softmax, i-GELU, integer-sqrt LayerNorm.

Reference: kssteven418/I-BERT, branch ``ibert`` @ 1b09c759,
``fairseq/quantization/utils/quant_modules.py`` (``IntSoftmax``, ``IntGELU``, ``IntLayerNorm``).
Design input precision: softmax and GELU take the int32 matmul accumulator (scales ~1e-5..1e-3);
LayerNorm takes a 22-bit activation. Constants: exp ``x0 = -0.6931``, ``n = 30``,
``(a, b, c) = (0.35815147, 0.96963238, 1)``; GELU ``k = 1.4142``, ``n = 14``,
``(a, b, c) = (-0.2888, -1.769, 1)``; numerators 2^32 (softmax) and 2^31 (LayerNorm).

Deviations, each tested:

* Softmax: the reference requantizes ``exp_int`` to 16 bits through a ``QuantAct`` that keeps an
  EMA range across calls (and is never frozen, I-BERT #10). Here every call computes what a
  *freshly built* module computes on its first call: the range is this call's min/max of
  ``exp_int``. No state leaks between calls.
* Softmax at fine input scales: the 16-bit requantisation (the reference's ``FixedPointMul``)
  computes ``z_int = round(exp_int / exp_scale)`` in float32, which is ``c_int * 2^30 / (a s^2 /
  2^30)`` on the row maximum, growing as ``s^-4``: it overflows float32 (``inf``, then clamped to
  32767) for ``s`` below about 1.28e-5, so the reference's softmax is wrong there (max error 0.10
  at ``s = 1e-5``, 0.62 at 5e-6). (``c_int = floor(2.792115 / s^2)``, 2.8e10 at 1e-5, is a float
  as in the reference: no int32 overflow, and its float32 rounding is harmless.) Here, for
  ``s < SOFTMAX_MIN_SCALE = 2e-5``, i-exp runs on a coarser grid: ``x_int`` (after the row maximum
  is subtracted) is shifted right by the least ``k`` with ``s * 2^k >= 2e-5``, i.e. the result is
  the reference's on ``floor(x_int / 2^k)`` at scale ``s * 2^k``. For ``s >= 2e-5`` nothing
  changes (bit-identical to the reference).
* Softmax: ``out_scale`` is a tensor on ``x.device`` (the reference returns a Python float, I-BERT #4).
* Softmax: a row that is entirely ``-inf`` (NaN in the reference and in the float softmax) gives a
  uniform row; ``-inf`` entries in a row with a finite maximum are clamped to ``30 * x0_int``
  exactly as in the reference.
* GELU: ``x_int = round(x / s)`` (the reference: ``x / s`` in float32, within 2^-23 of the
  integer), so the output lies exactly on its grid. Its integers are about ``max|x| / out_scale``
  with ``out_scale ~ s^3``: 2^32 at ``s = 1e-4``, 6.8e9 on fmnist_vit: past int32, they need 64-bit
  registers (the reference, too, forms them in float32: beyond 2^24 they are float32-rounded).
* GELU: the reference's output scale is negative (``s * a * s_e^2 * 2^14 / 2`` with ``a < 0``);
  here ``out_scale`` is its absolute value and the integers are negated, so ``y`` is identical.
* LayerNorm: the reference's overflow ``shift`` is a buffer that only grows (and stops updating
  after ``fix()``); here it is the shift a fresh, unfixed module sets on this call (0 without
  overflow). A constant row gives ``std_int = 0`` and NaN in the reference (open PR #30); here
  ``std_int`` is clamped to at least 1, so the output is the bias. ``eps`` is ignored, as in the
  reference.
* LayerNorm: ``std_int`` is the exact integer square root of the exact sum of squares (float64,
  below 2^53; the overflow shift from it by ``frexp``), as the paper's integer Newton root; the
  reference sums in float32 (rounded beyond 2^24, in an order the library chooses) and takes
  ``floor(torch.sqrt)``, whose float32 root is not correctly rounded on every CPU (torch 2.14's
  AVX-512 kernel is off by one ulp on about 9 % of rows of fmnist_swin, ONNX Runtime is not), so
  its ``std_int`` can differ by one. Here the integers do not depend on the library (the ONNX
  export agrees bit-exactly, numerics 2026.12.4).
  ``dim_sqrt`` is computed per call from the last dim (the reference caches it and needs 3-D input);
  any rank works, reduced over the last dim.

Gradients with ``ste_gradients("reference")`` (``_common``): the gradients of the graphs of
``IntSoftmax``, ``IntGELU`` and ``IntLayerNorm`` with their ``floor_ste`` / ``round_ste``, computed
in closed form (equal to the op-by-op graphs up to float rounding, tested), on this module's
integers (so with the deviations above: the coarsened grid, this call's 16-bit range). The 16-bit
requantisation passes ``1 / act_sf`` backward, as the reference's ``fixedpoint_mul`` does. Guards
the reference lacks: the LayerNorm's ``sqrt`` sees ``var_int >= 1`` (a constant row has no
infinite gradient); the LayerNorm bias gets its gradient (see ``IntSqrtLayerNorm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.kernels._common import (
    IntSqrtLayerNorm,
    as_scale,
    exp2_int,
    i_exp_poly,
    i_exp_poly_parts,
    i_exp_scale,
    reference_grad,
    softmax_front,
    softmax_grad,
    with_grad_coef,
    with_ste,
)

__all__ = ["IBertGELU", "IBertLayerNorm", "IBertSoftmax", "gelu", "layernorm", "softmax"]

_EXP_BITS = 16
#: Softmax input scales below this go through i-exp on a coarser grid (module docstring).
SOFTMAX_MIN_SCALE = 2e-5
#: elements per slice of the float64 requantization on CPU (2 MiB of float64: stays in cache)
_F64_SLICE = 2**18


def _frexp31(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mantissa, exponent = torch.frexp(ratio.double())
    return torch.floor(mantissa * 2.0**31 + 0.5), 31.0 - exponent.double()


def _min_mask(x: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``torch.minimum(x, bound)``'s gradient for ``x``: 1 below, 1/2 at a tie, 0 above."""
    return (bound - x).sign_().add_(1.0).mul_(0.5)


class IBertSoftmax(nn.Module):
    def __init__(self, output_bit: int = 8) -> None:
        super().__init__()
        self.output_bit = output_bit

    def row_local(self) -> bool:
        """Row-local although the 16-bit requantization takes the range of the whole tensor: every
        row holds a 0 after its maximum is subtracted (a row of NaN/inf becomes 0s), and i-exp is
        largest there (``q = 0``, ``r = 0``: ``z = c_int``; elsewhere ``r (r + b_int) <= 0`` as
        ``-b_int < x0_int <= r <= 0``, and ``q >= 1`` halves the power), with ``exp_int >= 0``; so
        the range is ``[0, exp_int(0)]``, a function of the scale alone, for any batch. A subclass
        with another exponential (``fit_exp``) does not inherit this."""
        return type(self) is IBertSoftmax

    @staticmethod
    def _coarsen(x_int: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Below :data:`SOFTMAX_MIN_SCALE`, ``(floor(x_int / 2^k), s * 2^k)`` with the least ``k``
        bringing the scale to at least that; the same values otherwise. May overwrite ``x_int``.

        On CPU (one scale, not tracing) ``k`` is read and only the needed branch runs; elsewhere
        both are formed and selected by ``torch.where`` (no device sync, a traceable graph)."""
        k = torch.clamp(torch.ceil(torch.log2(SOFTMAX_MIN_SCALE / s)), 0.0, 126.0)
        if k.dim() == 0 and x_int.device.type == "cpu" and not torch.jit.is_tracing():
            if float(k) > 0:
                x_int = x_int.mul_(exp2_int(-k)).floor_()  # arithmetic right shift by k
            return x_int, s * exp2_int(k)
        coarse = torch.floor(x_int * exp2_int(-k))  # arithmetic right shift by k
        return torch.where(k > 0, coarse, x_int), s * exp2_int(k)

    @staticmethod
    def _requant16(exp_int: torch.Tensor, exp_scale: torch.Tensor) -> torch.Tensor:
        """The internal ``QuantAct(16)`` on its first call (see the module docstring); overwrites
        ``exp_int`` (the same operations in place: a float32 division and rounding, the dyadic
        multiply and its rounding and clamp in float64, the float32 ``(out * sf) / sf``)."""
        lo, hi = torch.aminmax(exp_int)
        act_sf = torch.clamp(torch.maximum(lo.abs(), hi.abs()), min=1e-8) / (2 ** (_EXP_BITS - 1) - 1)
        z_int = exp_int.div_(exp_scale).round_()
        m, e = _frexp31(exp_scale.double() / act_sf.float().double())
        # (z * m) / 2^e == z * (m * 2^-e) in float64: scaling by a power of two commutes with rounding
        ratio = m * 2.0**-e
        lim = 2 ** (_EXP_BITS - 1)
        if z_int.is_contiguous() and z_int.device.type == "cpu" and not torch.jit.is_tracing():
            # in cache-sized slices; the clamp after the cast to float32 gives the same values
            # (the cast is monotone and exact on the integers within the clamp)
            for zc in z_int.view(-1).split(_F64_SLICE):
                zc.copy_(zc.double().mul_(ratio).round_())
            z_int = z_int.clamp_(-lim, lim - 1)
        else:
            z_int.copy_(z_int.double().mul_(ratio).round_().clamp_(-lim, lim - 1))
        return z_int.mul_(act_sf).div_(act_sf)

    def _output(self, exp_int: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
        """``floor(z floor(2^32 / sum z) 2^(b-32)) out_scale`` of the requantized ``z`` (overwritten)."""
        total = exp_int.sum(dim=-1, keepdim=True)
        factor = torch.floor_(2**32 / total)
        # floor(exp_int * factor / 2^(32 - bits)): the division by a power of two is exact
        return torch.floor_(exp_int.mul_(factor).mul_(2.0 ** (self.output_bit - 32))).mul_(out_scale)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = as_scale(scale, x)
        out_scale = torch.tensor(1.0 / 2**self.output_bit, device=x.device)
        if reference_grad(x):
            return self._forward_reference(x, s.detach(), out_scale), out_scale
        with torch.no_grad():
            x_int = x.detach() / s
            x_int = x_int.sub_(x_int.amax(dim=-1, keepdim=True))
            x_int = torch.nan_to_num_(x_int, nan=0.0, neginf=-3.0e38)
            x_int, s_exp = self._coarsen(x_int, s)
            exp_int, exp_scale = i_exp_poly(x_int, s_exp, inplace=True)
            y = self._output(self._requant16(exp_int, exp_scale), out_scale)
        return with_ste(x, y, lambda: x.softmax(-1)), out_scale

    def _forward_reference(self, x: torch.Tensor, s: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
        """The integer pass (the same operations on the same integers up to i-exp, then the
        requantization on a copy) with ``IntSoftmax.forward``'s straight-through gradient (``x / s``
        minus the row maximum, the coarsening shift, i-exp, the 16-bit requantization ``clamp(round(e
        / act_sf))`` with this call's ``act_sf`` fixed, ``f = floor(2^32 / sum z)``, ``floor(z f
        2^(b-32))``; every floor and round passing) in closed form (:func:`softmax_grad`): ``dy_i/dz_i
        = c f``, ``dy_i/dz_j`` gains ``-c z_i 2^32 / T^2``, ``dz/de = 1 / act_sf`` inside the clamp's
        open bounds. Equal to the op-by-op graph up to float rounding (tested)."""
        with torch.no_grad():
            u, du, idx = softmax_front(x.detach(), s)
            k = torch.clamp(torch.ceil(torch.log2(SOFTMAX_MIN_SCALE / s)), 0.0, 126.0)
            du = du.mul_(torch.where(k > 0, exp2_int(-k), torch.ones_like(k)))
            u, s_exp = self._coarsen(u, s)
            e, de = i_exp_poly_parts(u, s_exp, inplace=True)
            y = self._output(self._requant16(e.clone(), i_exp_scale(s_exp)), out_scale)
            lim = 2 ** (_EXP_BITS - 1)
            act_sf = torch.clamp(e.abs().max(), min=1e-8) / (lim - 1)
            z = torch.round_(e.div_(act_sf))
            du = du.mul_(de).mul_(((z > -lim) & (z < lim - 1)).to(z.dtype)).div_(act_sf)  # the clamp's open bounds
            z = z.clamp_(-lim, lim - 1)
            total = z.sum(dim=-1, keepdim=True)
            factor = torch.floor(2**32 / total)
            c = out_scale / 2 ** (32 - self.output_bit)
            d = z.mul_(((-(2**32) / total) / total).mul_(c))
            a = du.mul(factor.mul_(c))
        return softmax_grad(x, y, a, du, d, idx)


class IBertGELU(nn.Module):
    K = 1.4142
    N = 14
    COEF = (-0.2888, -1.769, 1.0)

    @staticmethod
    def row_local() -> bool:
        """Elementwise: slices of a batch give the same integers (``QuantSite.row_local``)."""
        return True

    def _int_erf(self, x_int: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(floor(sign(x) ((min(|x|, -b) + b)^2 + c) / 2^N), scale * 2^N)``: the reference's
        operations in its order, on one new buffer (``x_int`` is kept)."""
        a, b, c = self.COEF
        b_int = torch.floor(b / s)
        c_int = torch.floor((c / a) / s**2)
        y_int = torch.minimum(x_int.abs(), -b_int) if b_int.dim() else x_int.abs().clamp_(max=-b_int)
        y_int = y_int.add_(b_int)
        y_int = y_int.mul_(y_int).add_(c_int).mul_(torch.sign(x_int))  # ** 2 is x * x in torch
        scale = s**2 * a
        # the division by 2^N is exact (a power of two; y_int is 0 or at least 1 in magnitude)
        return torch.floor_(y_int.mul_(2.0**-self.N)), scale * 2**self.N

    def _reference_graph(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``IntGELU.forward``'s straight-through gradient (``sign``, ``b_int``, ``c_int`` and
        ``shift_int`` held fixed, ``floor_ste`` on the 2^14 shift, ``round_ste`` on ``x / s``) in
        closed form: with ``m = min(|x_int|, -b_int)`` (``torch.minimum``: half the gradient at a
        tie), ``d out / dx = c (y_int + shift_int + x_int 2^(1-N) (m + b_int) [|x_int| < -b_int]) / s``,
        ``c = s sig_scale / 2``. Equal to the op-by-op graph up to float rounding (tested)."""
        a, b, c = self.COEF
        with torch.no_grad():
            s_e = s / self.K
            x_int = torch.round(x.detach() / s)
            b_int = torch.floor(b / s_e)
            mag = x_int.abs()
            passes = _min_mask(mag, -b_int)
            mn = torch.minimum(mag, -b_int).add_(b_int)
            y_int = torch.sign(x_int).mul_(mn * mn + torch.floor((c / a) / s_e**2))
            sig_scale = s_e**2 * a * 2**self.N
            y_int = torch.floor_(y_int.div_(2**self.N)).add_(torch.floor(1.0 / sig_scale))
            coef = mn.mul_(passes).mul_(x_int).mul_(2.0 ** (1 - self.N)).add_(y_int).mul_(s * sig_scale / 2).div_(s)
        return with_grad_coef(x, coef, coef)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = as_scale(scale, x)
        with torch.no_grad():
            x_int = torch.div(x.detach(), s).round_()  # the integers (see the deviation)
            sig_int, sig_scale = self._int_erf(x_int, s / self.K)
            shift_int = torch.floor(1.0 / sig_scale)
            out_int = sig_int.add_(shift_int).mul_(x_int)  # x_int * (sig_int + shift_int)
            out_scale = s * sig_scale / 2  # negative, as in the reference
            y = out_int.mul_(out_scale)
        return with_ste(x, y, lambda: F.gelu(x), lambda: self._reference_graph(x, s.detach())), out_scale.abs()


class IBertLayerNorm(IntSqrtLayerNorm):
    NUMERATOR = 2**31

    @staticmethod
    def _squares(y_int: torch.Tensor) -> torch.Tensor:
        """The exact row sums of squares (float64: below 2^53), ``(..., 1)``."""
        return y_int.double().square_().sum(dim=-1, keepdim=True)

    @staticmethod
    def _shift(y_int: torch.Tensor, squares: torch.Tensor | None = None) -> torch.Tensor:
        """The overflow shift a fresh reference module sets on this call (0 without overflow), from
        the rows' exact sums of squares (``squares``, computed here when not given)."""
        # The reference takes max over rows of ceil(log2(sqrt(var / 2^32))) when max(var) >= 2^32;
        # the functions are monotone, so this is the same on the largest row, and it is <= 0 (so
        # clamped to 0) exactly when there is no overflow: no branch, no device sync.
        # ceil(log2(sqrt(v / 2^32))) = ceil((ceil(log2 v) - 32) / 2), from the exact sum (float64)
        sq = IBertLayerNorm._squares(y_int) if squares is None else squares
        mant, exp = torch.frexp(sq.max())
        return torch.clamp(torch.ceil((exp - (mant == 0.5).to(exp.dtype) - 32) / 2), min=0).float()

    def std_int(self, y_int: torch.Tensor) -> torch.Tensor:
        """``floor(sqrt(var))``, exact (module docstring), at least 1 (PR #30: no NaN). Without
        overflow (shift 0, read on the CPU) the sums of squares that gave the shift are ``var``."""
        squares = self._squares(y_int)
        shift = self._shift(y_int, squares)
        if y_int.device.type == "cpu" and not torch.jit.is_tracing() and float(shift) == 0.0:
            var = squares  # floor(y / 2^0) = y: the same sums
        else:
            var = self._squares(torch.floor(y_int / 2**shift))  # exact: < 2^53
        r = torch.floor(torch.sqrt(var))  # within one of the root: corrected to the integer root
        r = torch.where(r * r > var, r - 1, r)
        r = torch.where((r + 1) * (r + 1) <= var, r + 1, r)
        return torch.clamp(r.float() * 2**shift, min=1.0)

    def std_int_grad(self, y_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The graph's ``floor(sqrt(max(sum floor(y / 2^shift)^2, 1))) 2^shift`` and its derivative
        ``floor(y_i / 2^shift) / sqrt(var)`` (0 where ``var <= 1``: the clamp's bound); the
        reference's graph with ``floor_ste``, its ``sqrt`` guarded by the clamp (module docstring)."""
        shift = self._shift(y_int)
        fy = torch.floor(y_int / 2**shift)
        var = (fy**2).sum(dim=-1, keepdim=True)
        root = torch.sqrt(torch.clamp(var, min=1.0))
        dstd = fy.mul_((var > 1.0).to(var.dtype) / root)
        return torch.floor(root) * 2**shift, dstd


# ---- kernel factories (the method catalogue's ``kernel``: policysearch.methods) ----
def softmax(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return IBertSoftmax(bits)


def gelu(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return IBertGELU()


def layernorm(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return IBertLayerNorm(norm)

"""Quantized Linear / Conv2d: symmetric per-output-channel weights, per-tensor input activations.

The output is the dequantized integer accumulator ``(q_x * q_w) * (s_x * s_w[c]) + bias``, with the
bias quantized to 32 bits on the accumulator scale (as in I-ViT / HAWQ-V3). ``acc_scale`` gives
``s_x * s_w`` so a following I-BERT kernel can consume the accumulator directly.

:class:`IntLinear` / :class:`IntConv2d` are the ``paper`` wiring's versions (I-ViT's
``QuantLinear`` / ``QuantConv2d``): they take an input already on its grid, ``(x, s)``, and return
``(acc * s_acc, s_acc)`` with ``s_acc = s * s_w[c]``. The accumulator ``acc`` (integer
products plus the int32 bias) is computed exactly by the integer engine
(:mod:`policysearch.quant.intmm`: an int8 x int8 -> int32 GEMM, a convolution as a GEMM over its
patches; wider operands by an exact float64 GEMM), without autograd and with it: in QAT the value
is the same integer result and the gradient is the float straight-through graph's. The
dequantized hand-over ``acc * s_acc`` is float32, so accumulators beyond 2^24 reach the next
quantizer rounded to float32 (relative 2^-24), like its own float32 requantization.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.quant.act import QuantAct
from policysearch.quant.intmm import exact_matmul, get_engine, int8_fits, int_matmul, to_float32
from policysearch.quant.ste import ste

__all__ = ["IntConv2d", "IntLinear", "QuantConv2d", "QuantLinear", "quantize_weight"]


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale ``max|w_c| / (2^(b-1) - 1)``."""
    m = w.detach().abs().reshape(w.shape[0], -1).amax(1)
    return (m / (2 ** (bits - 1) - 1)).clamp(min=1e-8)


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_q * s, s)``: symmetric per-output-channel fake quantization with STE."""
    s = weight_scale(w, bits)
    shape = (-1,) + (1,) * (w.dim() - 1)
    lim = 2 ** (bits - 1) - 1
    q = torch.clamp(torch.round(w.detach() / s.view(shape)), -lim, lim)
    return ste(w, q * s.view(shape)), s


def bias_int(b: torch.Tensor, acc_scale: torch.Tensor) -> torch.Tensor:
    """The int32 bias on the accumulator scale (as I-ViT / HAWQ-V3)."""
    return torch.clamp(torch.round(b.detach() / acc_scale), -(2**31), 2**31 - 1)


def quantize_bias(b: torch.Tensor | None, acc_scale: torch.Tensor) -> torch.Tensor | None:
    if b is None:
        return None
    return ste(b, bias_int(b, acc_scale) * acc_scale)


class _QuantBase(nn.Module):
    """Shared state: input quantizer, bit widths, float/quant switch."""

    def __init__(self, observer: str) -> None:
        super().__init__()
        self.act = QuantAct(observer)
        self.enabled = False  # False: exact float op of the wrapped module
        self.weight_bits = 8
        self.act_bits = 8
        self._wcache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized weight; cached while the weight is unchanged and no gradient is needed."""
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return quantize_weight(w, self.weight_bits)
        key = (self.weight_bits, w._version, w.data_ptr(), w.device)
        if self._wcache is None or self._wcache[0] != key:
            with torch.no_grad():
                self._wcache = (key, quantize_weight(w, self.weight_bits))
        return self._wcache[1]

    def _weight_int(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_int, s_w)``: the integer weights (float32) and their per-channel scales (cached)."""
        w = self.weight
        key = (self.weight_bits, w._version, w.data_ptr(), w.device)
        cache = getattr(self, "_icache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                s = weight_scale(w, self.weight_bits)
                shape = (-1,) + (1,) * (w.dim() - 1)
                lim = 2 ** (self.weight_bits - 1) - 1
                q = torch.clamp(torch.round(w.detach() / s.view(shape)), -lim, lim)
            self._icache = cache = (key, (q, s))
        return cache[1]

    def integer_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w_int, s_w)``: the integer weights (float32 values) and their per-channel scales."""
        return self._weight_int()

    def last_int_params(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(s_acc, bias_int)`` of the last integer forward (None before one; ``paper`` wiring)."""
        cached = getattr(self, "_pcache", None)
        return None if cached is None else (cached[2], cached[3])

    def _int_params(self, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(w_int, s_acc, bias_int)`` for the input scale ``scale`` (cached while both the weights
        and the scale object are unchanged: an upstream quantizer hands the same cached scale)."""
        w_int, s_w = self._weight_int()
        b = self.bias
        key = (self._icache[0], b._version if b is not None else None)
        cached = getattr(self, "_pcache", None)
        if cached is None or cached[0] != key or cached[1] is not scale:
            with torch.no_grad():
                s_acc = scale * s_w
                cached = self._pcache = (key, scale, s_acc, bias_int(b, s_acc) if b is not None else None)
        return w_int, cached[2], cached[3]

    def _inputs(
        self, x: torch.Tensor, pre_scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        xq, s_x = self.act(x, self.act_bits, pre_scale)
        wq, s_w = self._weight()
        return xq, s_x, wq, s_w


class QuantLinear(_QuantBase):
    def __init__(self, linear: nn.Linear, observer: str = "minmax") -> None:
        super().__init__(observer)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.last_acc_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, pre_scale: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled or self.act.calibrating:
            if self.act.calibrating:
                self.act.observer.update(x)
            return F.linear(x, self.weight, self.bias)
        xq, s_x, wq, s_w = self._inputs(x, pre_scale)
        acc_scale = s_x * s_w
        self.last_acc_scale = acc_scale.detach()
        return F.linear(xq, wq, quantize_bias(self.bias, acc_scale))


class QuantConv2d(_QuantBase):
    def __init__(self, conv: nn.Conv2d, observer: str = "minmax") -> None:
        super().__init__(observer)
        self.conv = conv
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.act.calibrating:
            if self.act.calibrating:
                self.act.observer.update(x)
            return self.conv(x)
        xq, s_x, wq, s_w = self._inputs(x, None)
        bias = quantize_bias(self.bias, s_x * s_w)
        c = self.conv
        return F.conv2d(xq, wq, bias, c.stride, c.padding, c.dilation, c.groups)


def _needs_grad(*ts: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _bits_of(source: list, q: torch.Tensor) -> int:
    """The signed width of the integers ``q``: the handing quantizer's ``bits``, else measured."""
    if source:
        return source[0].bits
    m = int(q.detach().abs().amax()) if q.numel() else 0
    return max(m.bit_length() + 1, 2)


def _patches(q: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, tuple[int, int]]:
    """im2col: ``(B * L, C * kh * kw)`` rows in the weight's ``(C, kh, kw)`` order, and ``(Ho, Wo)``."""
    B, C, H, W = q.shape
    kh, kw = conv.kernel_size
    if tuple(conv.stride) == (kh, kw) and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1) \
            and H % kh == 0 and W % kw == 0:  # non-overlapping patches (a patch embedding): a reshape
        Ho, Wo = H // kh, W // kw
        rows = q.reshape(B, C, Ho, kh, Wo, kw).permute(0, 2, 4, 1, 3, 5).reshape(B * Ho * Wo, C * kh * kw)
        return rows, (Ho, Wo)
    cols = F.unfold(q.to(torch.float32) if q.dtype == torch.int8 else q, (kh, kw), conv.dilation, conv.padding,
                    conv.stride)
    Ho = (H + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
    Wo = (W + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
    rows = cols.transpose(1, 2).reshape(B * Ho * Wo, -1)
    return (rows.to(q.dtype) if q.dtype == torch.int8 else rows), (Ho, Wo)


class _IntGemm:
    """The integer weights of an Int layer in GEMM form, cached until the weight changes:
    ``w_kn`` ``(K, N)`` int8 contiguous (``weight_bits <= 8``) or the integer values in float64,
    and the int32 bias on the accumulator grid with its bound."""

    def __init__(self, w_int: torch.Tensor, weight_bits: int) -> None:
        w2 = w_int.reshape(w_int.shape[0], -1)
        self.K, self.N = w2.shape[1], w2.shape[0]
        self.wmax = 2 ** (weight_bits - 1) - 1
        self.w_kn = (w2.t().to(torch.int8) if int8_fits(weight_bits) else w2.t().to(torch.float64)).contiguous()

    def acc(self, rows: torch.Tensor, bits: int, b_int: torch.Tensor | None) -> torch.Tensor:
        """The exact integer accumulators ``rows @ w + b``: int32 (int8 operands, when the bound
        ``K * 2^(bits-1) * wmax + max|b|`` fits int32), else int64."""
        if self.w_kn.dtype == torch.int8 and int8_fits(bits):
            acc = int_matmul(rows.to(torch.int8), self.w_kn)
            if b_int is None:
                return acc
            bound = self.K * 2 ** (bits - 1) * self.wmax + float(b_int.abs().amax())
            return acc.add_(b_int.to(torch.int32)) if bound < 2**31 else acc.to(torch.int64).add_(b_int.to(torch.int64))
        acc = exact_matmul(rows, self.w_kn, 2 ** (bits - 1), self.wmax).to(torch.int64)
        return acc if b_int is None else acc.add_(b_int.to(torch.int64))


class _STEGemm(torch.autograd.Function):
    """QAT: the value is the integer engine's exact output ``value_fn()``; the gradient is that
    of the float op ``op`` on the STE-quantized operands (``x``, ``wq``, ``bq``)."""

    @staticmethod
    def forward(ctx, x, wq, bq, value_fn, op):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, wq)
        ctx.op, ctx.has_bias = op, bq is not None
        return value_fn()

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, wq = ctx.saved_tensors
        gx, gw, gb = ctx.op.grads(x, wq, gy, ctx.needs_input_grad)
        return gx, gw, (gb if ctx.has_bias and ctx.needs_input_grad[2] else None), None, None


class _LinearGrads:
    @staticmethod
    def grads(x, wq, gy, need):  # noqa: ANN001, ANN205
        g2 = gy.reshape(-1, gy.shape[-1])
        gx = (gy @ wq) if need[0] else None
        gw = (g2.t() @ x.reshape(-1, x.shape[-1])) if need[1] else None
        return gx, gw, g2.sum(0)


class _ConvGrads:
    def __init__(self, conv: nn.Conv2d) -> None:
        self.c = conv

    def grads(self, x, wq, gy, need):  # noqa: ANN001, ANN205
        c = self.c
        args = (c.stride, c.padding, c.dilation, c.groups)
        gx = torch.nn.grad.conv2d_input(x.shape, wq, gy, *args) if need[0] else None
        gw = torch.nn.grad.conv2d_weight(x, wq.shape, gy, *args) if need[1] else None
        return gx, gw, gy.sum((0, 2, 3))


class _IntMixin:
    """The integer accumulator of an Int layer (shared by :class:`IntLinear` and :class:`IntConv2d`)."""

    def _gemm(self) -> _IntGemm:
        w_int, _ = self._weight_int()
        key = self._icache[0]
        cached = getattr(self, "_gcache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self._gcache = (key, _IntGemm(w_int, self.weight_bits))
        return cached[1]

    def _int_acc(self, q: torch.Tensor, bits: int, b_int: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _exact_acc(self, q: torch.Tensor, bits: int, b_int: torch.Tensor | None) -> torch.Tensor:
        """The exact accumulator, as float32 (the dequantized hand-over's dtype)."""
        return to_float32(self._int_acc(q, bits, b_int))

    def int_accumulator(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The exact integer accumulator (int32 or int64, bias included) for ``x`` on the grid
        ``scale``: what :meth:`forward` dequantizes (tests, export checks)."""
        with torch.no_grad():
            _, s_acc, b = self._int_params(scale)
            q = torch.div(x, scale).round_()
            return self._int_acc(q, _bits_of([], q), b)

    def _qat(self, x: torch.Tensor, scale: torch.Tensor, op: object, float_op) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        """QAT forward: the exact integer value, the float STE graph's gradient."""
        wq, s_w = self._weight()
        s_acc = (scale * s_w).detach()
        bq = quantize_bias(self.bias, s_acc)
        if get_engine() == "float":
            return float_op(x, wq, bq), s_acc

        def value() -> torch.Tensor:
            with torch.no_grad():
                q = torch.div(x.detach(), scale).round_()
                b = bias_int(self.bias, s_acc) if self.bias is not None else None
                return self._exact_acc(q, _bits_of([], q), b).mul_(self._acc_view(s_acc))

        return _STEGemm.apply(x, wq, bq, value, op), s_acc


class IntLinear(_IntMixin, QuantLinear):
    """A Linear of the ``paper`` wiring: ``forward(x, scale) -> (acc * s_acc, s_acc)``.

    ``x`` lies on the grid ``scale`` (an :class:`~policysearch.quant.act.IntAct` output);
    ``s_acc = scale * s_w`` per output channel. A float input (``scale`` None) is quantized here to
    ``act_bits`` first. The accumulator is an exact integer GEMM (:mod:`policysearch.quant.intmm`),
    the same value with autograd (QAT: float STE gradient). Disabled: the float linear and ``None``.
    """

    #: the quantizer handing over the input (``IntAct``), whose kept integers are used; set by the wiring
    source: list = []

    @staticmethod
    def _acc_view(s_acc: torch.Tensor) -> torch.Tensor:
        return s_acc

    def _int_acc(self, q: torch.Tensor, bits: int, b_int: torch.Tensor | None) -> torch.Tensor:
        g = self._gemm()
        acc = g.acc(q.reshape(-1, q.shape[-1]), bits, b_int)
        return acc.view(*q.shape[:-1], g.N)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, *,
                ints: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``ints``: the integers of ``x`` on ``scale`` where the caller already has them (a slice
        of what the quantizer before kept); else they come from ``source`` or are divided out."""
        if not self.enabled or self.act.calibrating:
            return F.linear(x, self.weight, self.bias), None
        if scale is None:
            x, scale = self.act(x, self.act_bits)
        if _needs_grad(x, self.weight, self.bias):
            return self._qat(x, scale, _LinearGrads, F.linear)
        w_int, s_acc, b = self._int_params(scale)
        if ints is not None:
            q = ints
        else:
            q = self.source[0].ints_of(x, scale) if self.source else torch.div(x, scale).round_()
        if get_engine() == "float":  # the old float32 simulation (benchmarks, tests)
            return F.linear(q.to(w_int.dtype), w_int, b).mul_(s_acc), s_acc
        return self._exact_acc(q, _bits_of(self.source, q), b).mul_(s_acc), s_acc


class IntConv2d(_IntMixin, QuantConv2d):
    """The patch-embedding Conv2d of the ``paper`` wiring: ``forward(x, scale) -> (y, s_acc)``,
    ``y`` NCHW with the per-channel ``s_acc = scale * s_w`` (shape ``(C,)``) along dim 1. The
    accumulator is an integer GEMM over the patches (im2col), exact as :class:`IntLinear`'s."""

    source: list = []  # as IntLinear.source

    @staticmethod
    def _acc_view(s_acc: torch.Tensor) -> torch.Tensor:
        return s_acc.view(1, -1, 1, 1)

    def _int_acc(self, q: torch.Tensor, bits: int, b_int: torch.Tensor | None) -> torch.Tensor:
        c = self.conv
        if c.groups != 1:  # grouped: no GEMM form; float64 is exact for these widths
            y = F.conv2d(q.double(), self._weight_int()[0].double(), None, c.stride, c.padding, c.dilation, c.groups)
            return (y if b_int is None else y + b_int.double().view(1, -1, 1, 1)).to(torch.int64)
        g = self._gemm()
        B = q.shape[0]
        q8 = q.to(torch.int8) if int8_fits(bits) and g.w_kn.dtype == torch.int8 else q
        rows, (Ho, Wo) = _patches(q8, c)
        acc = g.acc(rows, bits, b_int)
        # contiguous NCHW, as F.conv2d's: the downstream kernels' float reductions follow the layout
        return acc.view(B, Ho, Wo, g.N).permute(0, 3, 1, 2).contiguous()

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.conv
        if not self.enabled or self.act.calibrating:
            return c(x), None
        if scale is None:
            x, scale = self.act(x, self.act_bits)
        if _needs_grad(x, self.weight, self.bias):
            def conv(x_, w_, b_):  # noqa: ANN001, ANN202
                return F.conv2d(x_, w_, b_, c.stride, c.padding, c.dilation, c.groups)
            return self._qat(x, scale, _ConvGrads(c), conv)
        w_int, s_acc, b = self._int_params(scale)
        q = self.source[0].ints_of(x, scale) if self.source else torch.div(x, scale).round_()
        if get_engine() == "float":  # the old float32 simulation (benchmarks, tests)
            y = F.conv2d(q.to(w_int.dtype), w_int, b, c.stride, c.padding, c.dilation, c.groups)
            return y.mul_(s_acc.view(1, -1, 1, 1)), s_acc
        y = self._exact_acc(q, _bits_of(self.source, q), b)
        return y.mul_(s_acc.view(1, -1, 1, 1)), s_acc

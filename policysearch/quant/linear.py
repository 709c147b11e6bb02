"""Quantized Linear / Conv2d: symmetric per-output-channel weights, per-tensor input activations.

The output is the dequantized integer accumulator ``(q_x * q_w) * (s_x * s_w[c]) + bias``, with the
bias quantized to 32 bits on the accumulator scale (as in I-ViT / HAWQ-V3). ``acc_scale`` gives
``s_x * s_w`` so a following I-BERT kernel can consume the accumulator directly.

:class:`IntLinear` / :class:`IntConv2d` are the ``paper`` wiring's versions (I-ViT's
``QuantLinear`` / ``QuantConv2d``): they take an input already on its grid, ``(x, s)``, and return
``(acc * s_acc, s_acc)`` with ``s_acc = s * s_w[c]``. Without autograd the accumulator is computed
on the integers themselves (``round(x / s)`` times the integer weights, plus the int32 bias), which
float32 holds exactly while partial sums stay below 2^24 (8-bit operands up to 1040 input
channels); with autograd (QAT) it is the dequantized product, with STE weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.quant.act import QuantAct
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


class IntLinear(QuantLinear):
    """A Linear of the ``paper`` wiring: ``forward(x, scale) -> (acc * s_acc, s_acc)``.

    ``x`` lies on the grid ``scale`` (an :class:`~policysearch.quant.act.IntAct` output);
    ``s_acc = scale * s_w`` per output channel. A float input (``scale`` None) is quantized here to
    ``act_bits`` first. Disabled: the float linear and ``None``.
    """

    #: the quantizer handing over the input (``IntAct``), whose kept integers are used; set by the wiring
    source: list = []

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.enabled or self.act.calibrating:
            return F.linear(x, self.weight, self.bias), None
        if scale is None:
            x, scale = self.act(x, self.act_bits)
        if _needs_grad(x, self.weight, self.bias):
            wq, s_w = self._weight()
            s_acc = scale * s_w
            return F.linear(x, wq, quantize_bias(self.bias, s_acc)), s_acc
        w_int, s_acc, b = self._int_params(scale)
        q = self.source[0].ints_of(x, scale) if self.source else torch.div(x, scale).round_()
        return F.linear(q, w_int, b).mul_(s_acc), s_acc


class IntConv2d(QuantConv2d):
    """The patch-embedding Conv2d of the ``paper`` wiring: ``forward(x, scale) -> (y, s_acc)``,
    ``y`` NCHW with the per-channel ``s_acc = scale * s_w`` (shape ``(C,)``) along dim 1."""

    source: list = []  # as IntLinear.source

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        c = self.conv
        if not self.enabled or self.act.calibrating:
            return c(x), None
        if scale is None:
            x, scale = self.act(x, self.act_bits)
        if _needs_grad(x, self.weight, self.bias):
            wq, s_w = self._weight()
            s_acc = scale * s_w
            y = F.conv2d(x, wq, quantize_bias(self.bias, s_acc), c.stride, c.padding, c.dilation, c.groups)
            return y, s_acc
        w_int, s_acc, b = self._int_params(scale)
        q = self.source[0].ints_of(x, scale) if self.source else torch.div(x, scale).round_()
        y = F.conv2d(q, w_int, b, c.stride, c.padding, c.dilation, c.groups)
        return y.mul_(s_acc.view(1, -1, 1, 1)), s_acc

"""Quantized Linear / Conv2d: symmetric per-output-channel weights, per-tensor input activations.

The output is the dequantized integer accumulator ``(q_x * q_w) * (s_x * s_w[c]) + bias``, with the
bias quantized to 32 bits on the accumulator scale (as in I-ViT / HAWQ-V3). ``acc_scale`` gives
``s_x * s_w`` so a following I-BERT kernel can consume the accumulator directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.quant.act import QuantAct
from policysearch.quant.ste import ste

__all__ = ["QuantConv2d", "QuantLinear", "quantize_weight"]


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


def quantize_bias(b: torch.Tensor | None, acc_scale: torch.Tensor) -> torch.Tensor | None:
    if b is None:
        return None
    q = torch.clamp(torch.round(b.detach() / acc_scale), -(2**31), 2**31 - 1)
    return ste(b, q * acc_scale)


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

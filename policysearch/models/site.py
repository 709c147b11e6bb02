"""QuantSite: one Softmax / GELU / LayerNorm of a model, running the method its Choice names."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from policysearch import kernels
from policysearch.models.precision import input_precision, softmax_output_bits
from policysearch.policy import Choice
from policysearch.quant import PTFQuant, QuantAct, symmetric_scale
from policysearch.quant.observers import create_observer

__all__ = ["QuantSite", "Recorder"]

#: ``recorder(site_name, kernel_input, output)``: sees what the kernel got and gave (dequantized).
Recorder = Callable[[str, torch.Tensor, torch.Tensor], None]


class QuantSite(nn.Module):
    """A non-linear site. In float mode it is exactly the original operator.

    ``forward(x, scale=None, mask=None)``: ``x`` is the dequantized input as the model produces it
    (for softmax the ``q·kᵀ`` accumulator, with its ``scale``; for GELU the fc1 accumulator, whose
    scale is that of the producing ``QuantLinear``, ``producer``). ``mask`` (Swin's shifted-window mask) is added after input
    quantization, as the references do.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        float_op: nn.Module | None,
        *,
        family: str,
        observer: str = "minmax",
        producer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.site_name = name
        self.kind = kind
        self.family = family
        self.float_op = float_op  # nn.GELU / nn.LayerNorm / None for softmax
        self.act = QuantAct(observer)
        self.ptf = PTFQuant(observer) if kind == "layernorm" else None
        self.out_obs = create_observer(observer) if kind == "layernorm" else None
        # kept in a list: not a submodule (no duplicate state), and deepcopy maps it to the copy
        self._producer = [producer] if producer is not None else []
        self.choice = Choice(method="fp32")
        self.act_bits = 8
        self.enabled = False
        self.calibrating = False
        self.recorder: Recorder | None = None
        self._kernels: dict[str, nn.Module] = {}
        self.last_out_scale: torch.Tensor | None = None  # grid of the last output (None: float)

    def extra_repr(self) -> str:
        return f"{self.site_name!r}, kind={self.kind}, choice={self.choice}, enabled={self.enabled}"

    # -- float reference -----------------------------------------------------------------------
    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "softmax":
            return x.softmax(dim=-1)
        return self.float_op(x)

    # -- kernels -----------------------------------------------------------------------------
    def kernel(self, method: str) -> nn.Module:
        k = self._kernels.get(method)
        if k is None:
            bits = softmax_output_bits(method, self.family) if self.kind == "softmax" else None
            norm = self.float_op if self.kind == "layernorm" else None
            k = kernels.create(self.kind, method, bits=bits, norm=norm)
            self._kernels[method] = k
        return k

    def _quant_input(
        self, x: torch.Tensor, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        prec = input_precision(self.kind, self.choice.method, bits=self.choice.bits, act_bits=self.act_bits)
        if prec.source == "float":
            return x, None
        if prec.source == "accumulator":
            if scale is None and self._producer:
                scale = self._producer[0].last_acc_scale
            if scale is None:  # no integer producer upstream: quantize at high precision
                return self.act(x, 16)
            return x, scale
        if prec.source == "ptf":
            return self.ptf(x, prec.bits)
        # the accumulator is requantized by rounding x / s_out: HAWQ's dyadic multiply gives the
        # same integers except at exact ties, at several times the cost on these large tensors
        return self.act(x, prec.bits)

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.calibrating:
            self.act.observer.update(x)
            if self.ptf is not None:
                self.ptf.observer.update(x)
            y = self.float_forward(x if mask is None else x + mask)
            if self.out_obs is not None:
                self.out_obs.update(y)
            return y
        self.last_out_scale = None
        if not self.enabled or self.choice.method == "fp32":
            xin = x if mask is None else x + mask
            y = self.float_forward(xin)
        else:
            xq, s = self._quant_input(x, scale)
            xin = xq if mask is None else xq + mask
            y = self._run_kernel(xin, s)
        if self.recorder is not None:
            self.recorder(self.site_name, xin, y)
        return y

    def _run_kernel(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        kern = self.kernel(self.choice.method)
        if self.kind == "layernorm" and self.choice.method == "fqvit":
            out_scale = None
            if self.out_obs is not None and self.out_obs.ready:
                out_scale = symmetric_scale(self.out_obs.min_val, self.out_obs.max_val, self.act_bits)
            y, out = kern(x, s, out_scale=out_scale)
        else:
            y, out = kern(x, s)
        self.last_out_scale = out.detach() if isinstance(out, torch.Tensor) else None
        return y


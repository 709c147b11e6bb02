"""QuantSite: one Softmax / GELU / LayerNorm of a model, running the method its Choice names."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from policysearch import kernels
from policysearch.models.precision import expects, input_precision, widen_to_accumulator
from policysearch.policy import Choice
from policysearch.quant import IntAct, PTFQuant, QuantAct, symmetric_scale
from policysearch.quant.observers import create_observer

__all__ = ["QuantSite", "Recorder", "is_gelu"]

#: ``recorder(site_name, site_input, output, valid)``: what the site was handed and what it gave
#: (dequantized); ``valid`` is None or a boolean tensor broadcasting to the input (False: a masked
#: attention entry, to leave out of any comparison). See ``wiring.record_sites``.
Recorder = Callable[[str, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def is_gelu(m: nn.Module) -> bool:
    """Whether ``m`` is a float GELU: ``nn.GELU`` or timm's own ``GELU`` module."""
    return isinstance(m, nn.GELU) or (type(m).__name__ == "GELU" and "timm" in type(m).__module__)


class QuantSite(nn.Module):
    """A non-linear site. In float mode it is exactly the original operator.

    ``native`` wiring: ``forward(x, scale=None, mask=None) -> y``. ``x`` is the dequantized input as
    the model produces it (for softmax the ``q·kᵀ`` accumulator, with its ``scale``; for GELU the
    fc1 accumulator, whose scale is that of the producing ``QuantLinear``, ``producer``); the site
    quantizes it as its method's reference does (``precision.input_precision``). The recorder sees
    the kernel's input.

    ``paper`` wiring: ``forward(x, scale, mask=None) -> (y, out_scale)``. ``x`` is the tensor the
    integer pipeline hands over (on the grid ``scale``), the same for every method; the method's
    own conversion (``precision``: a finer power-of-two grid for I-BERT's accumulator form, FQ-ViT's
    PTF quantization for its LayerNorm) happens here, inside the operator wrapper. The recorder sees
    the handed tensor, before any conversion. With a ``Choice.bits`` a LayerNorm first requantizes
    the handed tensor to that width (``in_act``), for this site only.

    ``mask`` (Swin's shifted-window mask, 0 / -100) is added after input quantization, in float, as
    the references do (I-ViT and FQ-ViT add it after their last QuantAct; every kernel clamps the
    masked entries). It is passed to the recorder as ``valid = (mask == 0)``.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        float_op: nn.Module | None,
        *,
        softmax_bits: Mapping[str, int],
        observer: str = "minmax",
        producer: nn.Module | None = None,
        wiring: str = "native",
    ) -> None:
        super().__init__()
        self.site_name = name
        self.kind = kind
        self.softmax_bits = dict(softmax_bits)  # method -> kernel output bits (the family's)
        self.wiring = wiring
        self.float_op = float_op  # nn.GELU / nn.LayerNorm / None for softmax
        self.act = QuantAct(observer)
        self.ptf = PTFQuant(observer) if kind == "layernorm" else None
        self.out_obs = create_observer(observer) if kind == "layernorm" and wiring == "native" else None
        # paper LayerNorm: requantizes the handed tensor to Choice.bits when that is set
        self.in_act = IntAct(observer, bits=16, role="site") if kind == "layernorm" and wiring == "paper" else None
        # kept in lists: not submodules (no duplicate state), and deepcopy maps them to the copies
        self._producer = [producer] if producer is not None else []
        self._input_act: list[IntAct] = []  # paper softmax/GELU: the quantizer handing the input
        self._out_act: list[IntAct] = []  # paper LayerNorm: the quantizer after it (FQ-ViT's output grid)
        self.choice = Choice(method="fp32")
        self.act_bits = 8
        self.enabled = False
        self.calibrating = False
        self.recorder: Recorder | None = None
        self._kernels: dict[str, nn.Module] = {}
        self.last_out_scale: torch.Tensor | None = None  # grid of the last output (None: float)
        self._widened: tuple[torch.Tensor, torch.Tensor] | None = None
        #: (min, max) of the input (softmax: of ``x - rowmax`` on unmasked entries) over the
        #: calibration batches: data-aware kernels (``kernels.data_aware``) fit their constants to it
        self.fit_range: tuple[float, float] | None = None

    def extra_repr(self) -> str:
        return f"{self.site_name!r}, kind={self.kind}, choice={self.choice}, enabled={self.enabled}, wiring={self.wiring}"

    # -- float reference -----------------------------------------------------------------------
    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "softmax":
            return x.softmax(dim=-1)
        return self.float_op(x)

    # -- kernels -----------------------------------------------------------------------------
    def kernel(self, method: str) -> nn.Module:
        k = self._kernels.get(method)
        if k is None:
            bits = self.softmax_bits.get(method) if self.kind == "softmax" else None
            norm = self.float_op if self.kind == "layernorm" else None
            k = kernels.create(self.kind, method, bits=bits, norm=norm)
            self._kernels[method] = k
        if hasattr(k, "fit") and self.fit_range is not None and k.fitted_range != self.fit_range:
            k.fit(*self.fit_range)  # deterministic in the calibration data (already fingerprinted)
        return k

    def row_local(self) -> bool:
        """Whether the output's every row (last dim) depends on that input row alone, so that the
        site may run on slices of a batch with the same result: not while calibrating or
        recording, and only for a method whose kernel says so (``row_local()``; e.g. not I-BERT's
        softmax, which requantizes by a statistic of the whole tensor)."""
        if self.calibrating or self.recorder is not None:
            return False
        if not self.enabled or self.choice.method == "fp32":
            return self.kind != "layernorm"  # the float GELU and softmax (a LayerNorm may requantize first)
        k = self.kernel(self.choice.method)
        local = getattr(k, "row_local", None)
        return bool(local()) if callable(local) else False

    def fitted_constants(self) -> dict[str, float]:
        """The constants the current method fitted here (data-aware methods; else empty)."""
        if not self.enabled or self.choice.method == "fp32":
            return {}
        k = self.kernel(self.choice.method)
        return dict(k.constants()) if hasattr(k, "constants") else {}

    def _observe_fit_range(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.kind == "layernorm":
            return
        if self.kind == "softmax":
            xm = x if mask is None else x + mask
            x = xm - xm.amax(dim=-1, keepdim=True)
            if mask is not None:
                x = x[(mask == 0).expand_as(x)]
        x = x[torch.isfinite(x)]
        if x.numel():
            lo, hi = float(x.min()), float(x.max())
            old = self.fit_range
            self.fit_range = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    def _record(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        if self.recorder is not None:
            self.recorder(self.site_name, x, y, None if mask is None else mask == 0)

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        if self.wiring == "paper":
            return self._forward_paper(x, scale, mask)
        return self._forward_native(x, scale, mask)

    # -- native wiring -------------------------------------------------------------------------
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

    def _forward_native(
        self, x: torch.Tensor, scale: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self.calibrating:
            self._observe_fit_range(x, mask)
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
            y = self._run_kernel(xin, s, self._native_out_scale() if self.choice.method == "fqvit" else None)
        self._record(xin, y, mask)
        return y

    def _native_out_scale(self) -> torch.Tensor | None:
        if self.out_obs is not None and self.out_obs.ready:
            return symmetric_scale(self.out_obs.min_val, self.out_obs.max_val, self.act_bits)
        return None

    def _run_kernel(self, x: torch.Tensor, s: torch.Tensor, ln_out_scale: torch.Tensor | None) -> torch.Tensor:
        kern = self.kernel(self.choice.method)
        if self.kind == "layernorm" and self.choice.method == "fqvit":
            y, out = kern(x, s, out_scale=ln_out_scale)
        else:
            y, out = kern(x, s)
        self.last_out_scale = out.detach() if isinstance(out, torch.Tensor) else None
        return y

    # -- paper wiring --------------------------------------------------------------------------
    def _forward_paper(
        self, x: torch.Tensor, scale: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.calibrating:
            self._observe_fit_range(x, mask)
            if self.ptf is not None:
                self.ptf.observer.update(x)
            if self.in_act is not None:
                self.in_act.observer.update(x)
            return self.float_forward(x if mask is None else x + mask), None
        self.last_out_scale = None
        if self.in_act is not None and self.enabled and self.choice.bits is not None:
            x, scale = self.in_act(x, scale)
        method = self.choice.method
        if not self.enabled or method == "fp32":
            y = self.float_forward(x if mask is None else x + mask)
        else:
            if scale is None:  # nothing quantized upstream (a wiring with quantizers switched off)
                x, scale = self.act(x, 16)
            xk, sk = self._convert(x, scale)
            y = self._run_kernel(xk if mask is None else xk + mask, sk, self._paper_out_scale(x))
        self._record(x, y, mask)
        return y, self.last_out_scale

    def _convert(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The method-specific form of the handed ``(x, scale)`` (``precision``, paper table)."""
        source = expects(self.kind, self.choice.method)
        if source == "accumulator":
            cached = self._widened
            if cached is None or cached[0] is not scale:  # the upstream's scale object is cached
                cached = self._widened = (scale, widen_to_accumulator(scale))
            return x, cached[1]
        if source == "ptf":
            return self.ptf(x, self.choice.bits if self.choice.bits is not None else self.act_bits)
        return x, scale

    def _paper_out_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """FQ-ViT's LayerNorm writes on the next quantizer's grid (its ``out_quantizer.scale``)."""
        if self.kind == "layernorm" and self._out_act:
            return self._out_act[0].static_scale(x.device)
        return None

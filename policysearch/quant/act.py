"""Activation quantizers: symmetric per-tensor (I-ViT / I-BERT QuantAct) and FQ-ViT's PTF.

Every quantizer owns an :class:`~policysearch.quant.observers.Observer`. Three modes:
``calibrate`` (observe, pass the float tensor through), ``quant`` (quantize with the observed
range) and, when nothing was observed yet, *dynamic* quantization from each tensor's own range
(so an uncalibrated model still runs; calibrate for real results). Bits are set per call by the
wiring from the policy, so one calibration serves every policy and bit width.
"""
from __future__ import annotations

import torch
from torch import nn

from policysearch.quant.dyadic import requantize
from policysearch.quant.observers import Observer, create_observer
from policysearch.quant.ste import ste

__all__ = ["PTFQuant", "QuantAct", "symmetric_scale"]

_EPS = torch.finfo(torch.float32).eps


def symmetric_scale(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """``max(|lo|, |hi|) / (2^(b-1) - 1)``, at least float32 eps (I-ViT's QuantAct)."""
    return (torch.maximum(lo.abs(), hi.abs()) / (2 ** (bits - 1) - 1)).clamp(min=_EPS).reshape(())


class QuantAct(nn.Module):
    """Symmetric per-tensor activation quantizer: ``clamp(round(x/s), -2^(b-1), 2^(b-1)-1)``."""

    def __init__(self, observer: str = "minmax") -> None:
        super().__init__()
        self.observer: Observer = create_observer(observer)
        self.calibrating = False

    def scale(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if self.observer.ready:
            return symmetric_scale(self.observer.min_val, self.observer.max_val, bits)
        d = x.detach()
        d = d[torch.isfinite(d)] if not bool(torch.isfinite(d).all()) else d
        if d.numel() == 0:
            return torch.tensor(1.0, device=x.device)
        return symmetric_scale(d.min(), d.max(), bits)

    def forward(
        self, x: torch.Tensor, bits: int, pre_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(q * s, s)``; with ``pre_scale`` (x on an integer grid) requantize dyadically."""
        if self.calibrating:
            self.observer.update(x)
            return x, None
        s = self.scale(x, bits)
        if pre_scale is not None:
            q = requantize(x, pre_scale, s, bits)
        else:
            lim = 2 ** (bits - 1)
            q = torch.div(x.detach(), s).round_().clamp_(-lim, lim - 1)
        return ste(x, q.mul_(s)), s


class PTFQuant(nn.Module):
    """FQ-ViT's Power-of-Two-Factor quantizer for LayerNorm inputs (``observer/ptf.py``).

    Asymmetric ``b``-bit with one zero point; per channel the scale is ``s8 / 8 * 2^alpha`` with
    ``alpha`` in {0, 1, 2, 3} chosen to minimise the L2 quantization error on the last calibration
    batch, where ``s8 = (max - min) / (2^b - 1)`` and the zero point is computed with ``s8``
    (as the official code does; FQ-ViT issue #34). Returns the signed ``(q - zp) * s_c`` and the
    per-channel scales ``s_c``.
    """

    def __init__(self, observer: str = "minmax") -> None:
        super().__init__()
        self.observer: Observer = create_observer(observer, per_channel=True)
        self.calibrating = False
        self._alpha_cache: dict[int, torch.Tensor] = {}

    def _base(self, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        qmax = 2**bits - 1
        s8 = ((hi - lo) / qmax).clamp(min=_EPS)
        zp = torch.clamp(-torch.round(lo / s8), 0, qmax)
        return s8, zp

    @staticmethod
    def _quant(x: torch.Tensor, s: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
        q = torch.clamp(torch.round(x / s + zp), 0, 2**bits - 1)
        return (q - zp) * s

    def _alpha(self, x: torch.Tensor, s8: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1])
        errs = []
        for a in range(4):
            s = s8 / 8 * 2**a
            errs.append(((self._quant(flat, s, zp, bits) - flat) ** 2).sum(0))
        return torch.stack(errs).argmin(0).to(x.dtype)

    def scales(self, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        obs = self.observer
        if obs.ready and obs.last is not None:
            s8, zp = self._base(obs.min_val, obs.max_val, bits)
            if bits not in self._alpha_cache:
                self._alpha_cache[bits] = self._alpha(obs.last.to(x.device), s8, zp, bits)
            alpha = self._alpha_cache[bits].to(x.device)
        else:  # dynamic: this tensor's own range and its own alpha search
            d = torch.nan_to_num(x.detach())
            s8, zp = self._base(d.min(), d.max(), bits)
            alpha = self._alpha(d, s8, zp, bits)
        return s8 / 8 * torch.pow(2.0, alpha), zp

    def forward(self, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.calibrating:
            self.observer.update(x)
            self._alpha_cache.clear()
            return x, None
        s, zp = self.scales(x, bits)
        return ste(x, self._quant(x.detach(), s, zp, bits)), s

"""Activation quantizers: symmetric per-tensor (I-ViT / I-BERT QuantAct), FQ-ViT's PTF, and
:class:`IntAct`, I-ViT's QuantAct as the ``paper`` wiring places it between modules.

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

__all__ = ["IntAct", "PTFQuant", "QuantAct", "onto_grid", "symmetric_scale"]

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
        self._scale_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

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
        if obs.ready and (obs.last is not None or bits in self._alpha_cache):  # alphas loaded: no batch
            key = (bits, obs.version, x.device)
            cached = self._scale_cache.get(key)
            if cached is None:
                s8, zp = self._base(obs.min_val, obs.max_val, bits)
                if bits not in self._alpha_cache:
                    self._alpha_cache[bits] = self._alpha(obs.last.to(x.device), s8, zp, bits)
                alpha = self._alpha_cache[bits].to(x.device)
                cached = self._scale_cache[key] = ((s8 / 8 * torch.pow(2.0, alpha)).to(x.device), zp.to(x.device))
            return cached
        # dynamic: this tensor's own range and its own alpha search
        d = torch.nan_to_num(x.detach())
        s8, zp = self._base(d.min(), d.max(), bits)
        alpha = self._alpha(d, s8, zp, bits)
        return s8 / 8 * torch.pow(2.0, alpha), zp

    def alphas(self) -> dict[int, torch.Tensor]:
        """The per-channel power-of-two exponents found so far, by bit width (a saved artifact)."""
        return dict(self._alpha_cache)

    def load_alphas(self, alphas: dict[int, torch.Tensor]) -> None:
        """Use these exponents (from :meth:`alphas`) instead of searching a calibration batch."""
        self._alpha_cache = {int(b): a.clone() for b, a in alphas.items()}
        self._scale_cache.clear()

    def forward(self, x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.calibrating:
            self.observer.update(x)
            self._alpha_cache.clear()
            self._scale_cache.clear()
            return x, None
        s, zp = self.scales(x, bits)
        # _quant's arithmetic, in place: (clamp(round(x / s + zp), 0, 2^b - 1) - zp) * s
        q = torch.div(x.detach(), s).add_(zp).round_().clamp_(0, 2**bits - 1).sub_(zp).mul_(s)
        return ste(x, q), s


def _dynamic_scale(t: torch.Tensor, bits: int) -> torch.Tensor:
    d = t.detach()
    if not bool(torch.isfinite(d).all()):
        d = d[torch.isfinite(d)]
    if d.numel() == 0:
        return torch.tensor(1.0, device=t.device)
    return symmetric_scale(d.min(), d.max(), bits)


def onto_grid(t: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``t`` rounded onto the grid ``scale`` and clamped to signed ``bits`` (STE): e.g. the class
    token joining the patch tokens' grid, as I-ViT's ``torch.cat`` shares the patches' scale."""
    lim = 2 ** (bits - 1)
    return ste(t, torch.div(t.detach(), scale).round_().clamp_(-lim, lim - 1).mul_(scale))


class IntAct(nn.Module):
    """I-ViT's ``QuantAct`` between two modules of the ``paper`` wiring.

    ``forward(x, scale=None, identity=None, identity_scale=None) -> (y, out_scale)``. ``x`` is the
    dequantized output of the upstream module (an integer accumulator ``acc * scale``, a kernel's
    ``q * scale``, or a float tensor when ``scale`` is None); the result is ``q * out_scale`` with
    ``q`` a signed ``bits``-bit integer and ``out_scale = max|range| / (2^(bits-1) - 1)`` per tensor
    from the calibrated range (dynamic from this tensor's own range when nothing was observed).
    With ``identity`` (the residual add, I-ViT's ``QuantAct(16)(x, s, identity, s_id)``), both
    operands are requantized to ``out_scale`` and the integers are added, then clamped; the range
    is that of the float sum.

    Requantization is HAWQ's dyadic rescale (``policysearch.quant.dyadic``): the integers of ``x``
    times the ratio ``scale / out_scale`` written as ``m / 2^e`` with a 31-bit ``m``, rounded. The
    reference forms that product in float64; here it is simulated in float32 as
    ``round(x / out_scale)`` (the dequantized ``x`` already is ``z * scale``), which gives the same
    integers except where the exact product lies within float32 rounding (relative 2^-23) of a
    half-integer, where the two may differ by one. :attr:`exact` (class-wide; tests) runs the
    float64 dyadic multiply instead, at many times the cost.

    Deviation from I-ViT's ``QuantAct``: the requantized integers are clamped to the signed
    ``bits`` range at every width; I-ViT clamps after ``fixedpoint_mul`` only at 4, 8, 16 and 32
    bits, so its 6-bit (or 10-bit...) requantizations hand on integers beyond their width.

    ``bits`` is set by the wiring (the policy's ``act_bits``, 16 for the residual stream, the
    site's ``Choice.bits`` for a site's input). Disabled (float mode) and while calibrating it
    returns the float ``x`` (+ ``identity``) and ``None``; calibrating also observes it.
    """

    #: use the float64 dyadic multiply (bit-exact HAWQ) instead of the float32 simulation
    exact = False

    def __init__(self, observer: str = "minmax", *, bits: int = 8, role: str = "act") -> None:
        super().__init__()
        self.observer: Observer = create_observer(observer)
        self.bits = bits
        #: "act" (bits = the policy's act_bits), "residual" (fixed 16) or "site" (a site's input)
        self.role = role
        self.enabled = False
        self.calibrating = False
        self._cache: tuple[tuple, torch.Tensor] | None = None
        #: set by the wiring when the consumer works on the integers (a linear, a matmul): the last
        #: output's integers are kept for it, so it need not divide them out again (:meth:`ints_of`)
        self.keep_ints = False
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, role={self.role}"

    def ints_of(self, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The integers of ``y`` on the grid ``scale``: those this quantizer kept if ``y`` is its
        last output (handed over once; int8 at up to 8 bits), else ``round(y / scale)`` (float)."""
        last = self._last
        if last is not None and last[0] is y:
            self._last = None
            return last[1]
        return torch.div(y, scale).round_()

    def static_scale(self, device: torch.device | None = None) -> torch.Tensor | None:
        """The calibrated output scale at the current ``bits`` (None before calibration)."""
        obs = self.observer
        if not obs.ready:
            return None
        key = (self.bits, obs.version, device)
        if self._cache is None or self._cache[0] != key:
            s = symmetric_scale(obs.min_val, obs.max_val, self.bits)
            self._cache = (key, s if device is None else s.to(device))
        return self._cache[1]

    def forward(
        self,
        x: torch.Tensor,
        scale: torch.Tensor | None = None,
        identity: torch.Tensor | None = None,
        identity_scale: torch.Tensor | None = None,
        *,
        owned: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``owned=True``: ``x`` is a temporary the caller gives up (a GEMM's fresh output); without
        autograd it is quantized in its own buffer, which the output then reuses (same values)."""
        if self.calibrating or not self.enabled:
            t = x if identity is None else x + identity
            if self.calibrating:
                self.observer.update(t)
            return t, None
        s = self.static_scale(x.device)
        if s is None:
            s = _dynamic_scale(x if identity is None else x + identity, self.bits)
        lim = 2 ** (self.bits - 1)
        grad = torch.is_grad_enabled() and (x.requires_grad or (identity is not None and identity.requires_grad))
        if self.exact and scale is not None:
            q = requantize(x, scale, s, None)
        elif owned and not grad:
            q = x.detach().div_(s).round_()
        else:
            q = torch.div(x.detach(), s).round_()
        if identity is not None:
            if self.exact and identity_scale is not None:
                q.add_(requantize(identity, identity_scale, s, None))
            else:
                q.add_(torch.div(identity.detach(), s).round_())
        q.clamp_(-lim, lim - 1)
        if grad:
            return ste(x if identity is None else x + identity, q.mul_(s)), s
        if self.keep_ints:
            # the consumer's integers: int8 when they fit (its GEMM operand), else the float values
            ints = q.to(torch.int8) if self.bits <= 8 else q.clone()
            y = q.mul_(s)
            self._last = (y, ints)
            return y, s
        return q.mul_(s), s

"""Dyadic requantization (HAWQ-V3 ``batch_frexp`` / ``fixedpoint_mul``, as used by I-BERT and I-ViT).

A ratio of scales ``s_in / s_out`` is written as ``m / 2^e`` with a 31-bit integer mantissa ``m``
(frexp in float64, mantissa rounded half-up to 31 bits, ``e = 31 - exp``), so that requantizing
``z = round(x / s_in)`` to the output grid is one integer multiply and one shift:
``round(z * m / 2^e)``. Like the reference, the product is formed in float64.
"""
from __future__ import annotations

import torch

__all__ = ["dyadic_params", "requantize"]

_MANTISSA_BITS = 31


def dyadic_params(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, e)`` float64 tensors with ``ratio ~= m / 2^e`` and ``m < 2^31``.

    Matches HAWQ's ``batch_frexp``: the ratio is taken in float64 from the float32 scales, the
    mantissa in [0.5, 1) is scaled by 2^31 and rounded half-up (``Decimal`` ROUND_HALF_UP in the
    reference; ``floor(v + 0.5)`` here, identical for the non-negative values that occur).
    """
    r = ratio.detach().to(torch.float64)
    mantissa, exponent = torch.frexp(r)
    m = torch.floor(mantissa * 2.0**_MANTISSA_BITS + 0.5)
    e = _MANTISSA_BITS - exponent.to(torch.float64)
    return m, e


def requantize(
    x: torch.Tensor,
    s_in: torch.Tensor,
    s_out: torch.Tensor,
    bits: int | None,
    *,
    signed: bool = True,
) -> torch.Tensor:
    """Integers of ``x`` (on the ``s_in`` grid) moved to the ``s_out`` grid, clamped to ``bits``.

    Returns the integer tensor (float32). ``s_in`` may be per-tensor or broadcastable (per-channel).
    ``bits=None`` leaves the result unclamped (the caller clamps, e.g. after adding a residual).
    """
    z = torch.round(x.detach() / s_in).to(torch.float64)
    m, e = dyadic_params(s_in.to(torch.float64) / s_out.to(torch.float64))
    # z * m / 2^e == z * (m * 2^-e) exactly while |z * m| < 2^53 (|z| < 2^22: int32 accumulators of
    # 8-bit products); one multiply instead of a multiply and a division
    out = torch.round(z * (m * torch.pow(2.0, -e)))
    if bits is None:
        return out.to(torch.float32)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return out.clamp_(lo, hi).to(torch.float32)

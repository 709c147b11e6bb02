"""What precision each method's input arrives at: the one place that documents the wiring.

Each integer method is fed the way its official reference was designed for
(``../shared/references/integer-kernels.md`` §7.1):

=========  ==========================================  =============================================
kind       method                                      input
=========  ==========================================  =============================================
softmax    ``ibert``                                   the int32 accumulator of ``q·kᵀ`` (``q``, ``k``
                                                       quantized to ``bits``), scale ``s_q·s_k·d^-½``
softmax    ``ivit``, ``fqvit``                         that accumulator requantized (dyadic) to a
                                                       ``bits``-bit symmetric per-tensor activation
gelu       ``ibert``                                   the fc1 int32 accumulator, per-channel scale
                                                       ``s_x·s_w[c]`` (fc1's input at ``bits``)
gelu       ``ivit``, ``relu``                          fc1's accumulator requantized to ``bits``
layernorm  ``ibert``                                   the residual stream quantized to 22 bits
layernorm  ``ivit``                                    the residual stream quantized to 16 bits
layernorm  ``fqvit``                                   the residual stream, PTF ``bits``-bit (uint8
                                                       asymmetric with power-of-two channel factors)
any        ``fp32``                                    the float (dequantized) tensor, unchanged
=========  ==========================================  =============================================

``bits`` is the site's ``Choice.bits`` when set, else the policy's ``act_bits``. A ``Choice.bits``
on an ``ibert``/``ivit`` LayerNorm overrides its 22/16-bit design precision.

Deviations from the references, and why: FQ-ViT feeds its softmax from a uint8 *asymmetric*
activation; here it is symmetric signed, like I-ViT: the zero point cancels in the softmax's
row-max subtraction, so only the range use differs. The residual stream is kept as the float sum
of dequantized branches and quantized at the LayerNorm's input (I-ViT quantizes the sum itself
with the same 16-bit QuantAct before the norm).

Kernel output bits (``kernels.create(..., bits=)``): I-BERT softmax 8; I-ViT softmax 16 in
ViT/DeiT and 8 in Swin (as I-ViT's own wiring); FQ-ViT softmax 4-bit log2.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["InputPrecision", "input_precision", "softmax_output_bits"]

#: LayerNorm input bits of the methods whose reference fixes them.
_LN_BITS = {"ibert": 22, "ivit": 16}


@dataclass(frozen=True, kw_only=True)
class InputPrecision:
    """``source``: 'float' | 'accumulator' | 'requant' | 'ptf'; ``bits``: the relevant width."""

    source: str
    bits: int | None


def input_precision(kind: str, method: str, *, bits: int | None, act_bits: int) -> InputPrecision:
    b = bits if bits is not None else act_bits
    if method == "fp32":
        return InputPrecision(source="float", bits=None)
    if kind in ("softmax", "gelu"):
        return InputPrecision(source="accumulator" if method == "ibert" else "requant", bits=b)
    if method == "fqvit":
        return InputPrecision(source="ptf", bits=b)
    return InputPrecision(source="requant", bits=bits if bits is not None else _LN_BITS[method])


def softmax_output_bits(method: str, family: str) -> int | None:
    if method == "ivit":
        return 8 if family == "swin" else 16
    return None  # the kernel's default (ibert 8, fqvit 4)

"""What each method's operator is fed, in each wiring: the one place that documents it.

What an operator consumes is its catalogue entry's ``expects`` (:mod:`policysearch.methods`):
``float``, ``accumulator``, ``requant`` or ``ptf``. The wirings turn that into an input.

``paper`` wiring (the default; ``policysearch.models.paper``): every method at a site receives the
same tensor, the one the integer pipeline hands over there (I-ViT's reference wiring,
``../shared/references/integer-kernels.md`` §5.5): the softmax the 8-bit requantized
``q·kᵀ·d^-½`` (Swin: plus the quantized relative-position bias), the GELU the 8-bit requantized
fc1 output, a LayerNorm the 16-bit residual stream (Swin's ``patch_embed.norm``: the 8-bit
patch-embedding output; a block after patch merging: the 8-bit reduction output, as
``swin_quant.py``). ``Choice.bits`` sets the width of that tensor (the site's input quantizer;
for a LayerNorm an extra requantization of the residual stream seen by that site only). A method
converts inside its operator wrapper (``QuantSite``) when it expects another form:

=============  ============================================================================
expects        conversion of the handed ``(x, s)`` inside the operator wrapper
=============  ============================================================================
``requant``    none: the kernel gets ``(x, s)`` (I-ViT, FQ-ViT softmax, I-BERT LayerNorm, ReLU)
``accumulator`` the same integers re-expressed on a finer power-of-two grid: ``(x, s / 2^k)``
               with the smallest ``k >= 0`` such that ``s / 2^k <= 2^-12``, the magnitude of
               the int32 ``q·kᵀ`` / fc1 accumulator scales I-BERT is designed for (~1e-5 to
               1e-3). The values are unchanged; the kernel's integers are ``x_int * 2^k``, so
               its polynomial constants (``floor(b / s)``, ``floor(c / s^2)``) and its
               ``2^14`` GELU shift work at their design precision (I-BERT softmax, GELU)
``ptf``        FQ-ViT's Power-of-Two-Factor quantization of the handed tensor to ``bits``
               (uint8 asymmetric, per-channel ``s8 / 8 * 2^alpha``; FQ-ViT LayerNorm)
``float``      the handed tensor through the float operator (``fp32``)
=============  ============================================================================

``native`` wiring: each method is fed the way its official reference was designed for (§7.1):

=========  ==========================================  =============================================
kind       expects                                     input
=========  ==========================================  =============================================
softmax    ``accumulator`` (``ibert``)                 the int32 accumulator of ``q·kᵀ`` (``q``, ``k``
                                                       quantized to ``bits``), scale ``s_q·s_k·d^-½``
softmax    ``requant`` (``ivit``, ``fqvit``)           that accumulator requantized (dyadic) to a
                                                       ``bits``-bit symmetric per-tensor activation
gelu       ``accumulator`` (``ibert``)                 the fc1 int32 accumulator, per-channel scale
                                                       ``s_x·s_w[c]`` (fc1's input at ``bits``)
gelu       ``requant`` (``ivit``, ``relu``)            fc1's accumulator requantized to ``bits``
layernorm  ``requant``                                 the float residual stream quantized to the
                                                       method's design width (I-BERT 22, I-ViT 16)
layernorm  ``ptf`` (``fqvit``)                         the residual stream, PTF ``bits``-bit
any        ``float`` (``fp32``)                        the float (dequantized) tensor, unchanged
=========  ==========================================  =============================================

``bits`` is the site's ``Choice.bits`` when set, else the policy's ``act_bits``. A ``Choice.bits``
on a ``requant`` LayerNorm overrides its design width. Native deviations, and why: FQ-ViT feeds
its softmax from a uint8 *asymmetric* activation; here it is symmetric signed, like I-ViT: the
zero point cancels in the softmax's row-max subtraction, so only the range use differs. The
residual stream is kept as the float sum of dequantized branches and quantized at the LayerNorm's
input (I-ViT quantizes the sum itself with the same 16-bit QuantAct before the norm).

Kernel output bits (``kernels.create(..., bits=)``), both wirings, from the catalogue
(``default_bits``, ``family_out_bits``): I-BERT softmax 8; I-ViT softmax 16 in ViT/DeiT and 8 in
Swin (as I-ViT's own wiring); FQ-ViT softmax 4-bit log2. The ``native`` LayerNorm widths above
are the catalogue's ``native_in_bits``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from policysearch.methods import catalogue, get_method

__all__ = [
    "ACCUMULATOR_LOG2_SCALE",
    "InputPrecision",
    "expects",
    "input_precision",
    "native_layernorm_bits",
    "widen_to_accumulator",
]

#: ``paper`` wiring, ``expects="accumulator"``: the handed grid is refined to at most 2^-12.
ACCUMULATOR_LOG2_SCALE = -12

@dataclass(frozen=True, kw_only=True)
class InputPrecision:
    """``source``: 'float' | 'accumulator' | 'requant' | 'ptf'; ``bits``: the relevant width."""

    source: str
    bits: int | None


def expects(kind: str, method: str) -> str:
    """What ``kind``/``method``'s operator consumes (the catalogue's ``expects``)."""
    return get_method(kind, method).expects


def native_layernorm_bits(method: str) -> int | None:
    """The ``native`` wiring's LayerNorm input width of a ``requant`` method (the catalogue's
    ``native_in_bits``: its reference's); ``None`` for a method fed another way."""
    return get_method("layernorm", method).native_in_bits


def input_precision(kind: str, method: str, *, bits: int | None, act_bits: int) -> InputPrecision:
    """The ``native`` wiring's input of ``kind``/``method`` (see the module docstring)."""
    desc = get_method(kind, method)
    if desc.float_reference:
        return InputPrecision(source="float", bits=None)
    if bits is None:  # the reference's own width where the method fixes one (a requant LayerNorm)
        bits = desc.native_in_bits if desc.native_in_bits is not None else act_bits
    return InputPrecision(source=desc.expects, bits=bits)


def widen_to_accumulator(scale: torch.Tensor) -> torch.Tensor:
    """``scale / 2^k``, the smallest ``k >= 0`` with ``scale / 2^k <= 2^ACCUMULATOR_LOG2_SCALE``.

    A power-of-two refinement: ``x / (scale / 2^k) = (x / scale) * 2^k`` exactly, so the same
    values are seen as integers ``2^k`` times larger (see the module docstring).
    """
    k = torch.clamp(torch.ceil(torch.log2(scale) - ACCUMULATOR_LOG2_SCALE), min=0)
    return scale * torch.exp2(-k)


def softmax_output_bits(family: str) -> dict[str, int]:
    """``{method: kernel output bits}`` at the softmax sites of a model of ``family``: each
    descriptor's ``family_out_bits`` (else its ``default_bits``); methods without a width are absent."""
    widths = {d.name: d.output_bits(family) for d in catalogue() if d.kind == "softmax"}
    return {name: bits for name, bits in widths.items() if bits is not None}

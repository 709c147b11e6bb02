"""The numerics version: part of every run's fingerprint.

Bump :data:`NUMERICS_VERSION` in any change that alters the integers a kernel, a quantizer or the
wiring produces (or the SQNR measurement), so that a resumed run never reuses results computed by
older numerics. Tests pin kernels against the official operators; this string pins stored results.
"""
from __future__ import annotations

__all__ = ["NUMERICS_VERSION"]

#: 2026.12.3: the ``paper`` wiring's linear layers and attention matmuls run on the exact integer
#: engine (``quant.intmm``; the float32 simulation rounded partial sums beyond 2^24, K > 1040), and
#: I-BERT's / I-ViT's GELU take ``x_int = round(x / s)`` (their outputs lie exactly on their grids)
#: 2026.12.4: the integer LayerNorms no longer depend on float rounding that differs between
#: libraries, so the ONNX export reproduces them bit-exactly: I-BERT / I-ViT take
#: ``x_int = round(x / s)`` (exact integers: order-free reductions), sum squares exactly (float64)
#: and I-BERT's ``std_int`` is the exact integer root (torch's float32 ``sqrt`` on CPU is not
#: correctly rounded); FQ-ViT's spread is exact and its root and ``log2`` correctly rounded
NUMERICS_VERSION = "2026.12.4"

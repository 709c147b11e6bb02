"""The numerics version: part of every run's fingerprint.

Bump :data:`NUMERICS_VERSION` in any change that alters the integers a kernel, a quantizer or the
wiring produces (or the SQNR measurement), so that a resumed run never reuses results computed by
older numerics. Tests pin kernels against the official operators; this string pins stored results.
"""
from __future__ import annotations

__all__ = ["NUMERICS_VERSION"]

NUMERICS_VERSION = "2026.12.2"

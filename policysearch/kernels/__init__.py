"""Integer-only non-linear operators, one module per method.

``create(kind, method, *, bits=None, norm=None)`` returns a fresh module with
``module(x, scale) -> (y, out_scale)``: ``x`` is the dequantized input (``q * scale``), ``y`` the
dequantized output ``q_out * out_scale`` (``out_scale`` is ``None`` for ``fp32``). Each method
computes what its official reference computes; deviations are listed in each module's docstring.
"""
from __future__ import annotations

from torch import nn

from policysearch.kernels import fqvit, ibert, ivit, reference, relu  # noqa: F401  (registration)
from policysearch.kernels._common import KERNELS
from policysearch.registry import UnknownNameError
from policysearch.spaces.site import KIND_METHODS

__all__ = ["create", "default_bits", "kinds", "methods"]


def kinds() -> list[str]:
    return sorted(KIND_METHODS)


def methods(kind: str) -> list[str]:
    if kind not in KIND_METHODS:
        raise UnknownNameError(f"unknown kind {kind!r}; valid: {', '.join(kinds())}")
    return [m for m in KIND_METHODS[kind] if f"{kind}/{m}" in KERNELS]


def _entry(kind: str, method: str):  # noqa: ANN202
    if method not in methods(kind):
        raise UnknownNameError(f"unknown {kind} method {method!r}; valid: {', '.join(methods(kind))}")
    return KERNELS.get(f"{kind}/{method}")


def default_bits(kind: str, method: str) -> int | None:
    return _entry(kind, method).default_bits


def create(kind: str, method: str, *, bits: int | None = None, norm: nn.LayerNorm | None = None) -> nn.Module:
    """A fresh kernel module for ``kind``/``method`` (``norm`` required for layernorm)."""
    entry = _entry(kind, method)
    if bits is not None and bits not in entry.bits:
        allowed = ", ".join(map(str, entry.bits)) or "none (this method has no output bit width)"
        raise ValueError(f"{kind}/{method}: bits={bits} not supported; allowed: {allowed}")
    if kind == "layernorm" and not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"layernorm/{method} needs norm=<the nn.LayerNorm it replaces>")
    kwargs = {"bits": bits} if bits is not None else {}
    return entry.factory(norm=norm, **kwargs)

"""Integer-only non-linear operators, one module per method.

``create(kind, method, *, bits=None, norm=None)`` returns a fresh module with
``module(x, scale) -> (y, out_scale)``: ``x`` is the dequantized input (``q * scale``), ``y`` the
dequantized output ``q_out * out_scale`` (``out_scale`` is ``None`` for ``fp32``). Each method
computes what its official reference computes; deviations are listed in each module's docstring.

The methods, their order and their output bits come from the catalogue
(:mod:`policysearch.methods`); each kernel module registers one factory per catalogue entry with
``register_kernel(kind, method, factory)`` (``factory(*, bits, norm)``), and registering one for a
method the catalogue does not declare is an error.
"""
from __future__ import annotations

from torch import nn

import policysearch.methods as _catalogue
from policysearch.kernels import data_aware, fqvit, ibert, ivit, reference, relu  # noqa: F401  (registration)
from policysearch.kernels._common import KERNELS, KernelEntry, register_kernel

__all__ = ["KERNELS", "create", "default_bits", "kinds", "methods", "register_kernel"]


def kinds() -> list[str]:
    """The non-linear kinds, in the catalogue's order (softmax, gelu, layernorm)."""
    return _catalogue.kinds()


def methods(kind: str) -> list[str]:
    """The method names of ``kind``, in the catalogue's order (unknown kinds list the valid ones)."""
    return _catalogue.methods(kind)


def _entry(kind: str, method: str) -> KernelEntry:
    spec = _catalogue.get_method(kind, method)
    if spec.key not in KERNELS:  # the catalogue declares it but no kernel module registered it
        raise LookupError(f"{spec.key} is in the method catalogue but no kernel is registered for it")
    return KERNELS.get(spec.key)


def default_bits(kind: str, method: str) -> int | None:
    """The output bit width ``create`` uses without ``bits`` (``None``: the method has none)."""
    return _catalogue.get_method(kind, method).default_bits


def create(kind: str, method: str, *, bits: int | None = None, norm: nn.LayerNorm | None = None) -> nn.Module:
    """A fresh kernel module for ``kind``/``method`` (``norm`` required for layernorm)."""
    entry = _entry(kind, method)
    spec = entry.spec
    if bits is not None and bits not in spec.out_bits:
        allowed = ", ".join(map(str, spec.out_bits)) or "none (this method has no output bit width)"
        raise ValueError(f"{kind}/{method}: bits={bits} not supported; allowed: {allowed}")
    if kind == "layernorm" and not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"layernorm/{method} needs norm=<the nn.LayerNorm it replaces>")
    return entry.factory(bits=spec.default_bits if bits is None else bits, norm=norm)

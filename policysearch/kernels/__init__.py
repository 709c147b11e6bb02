"""Integer-only non-linear operators, one module per method.

``create(kind, method, *, bits=None, norm=None)`` returns a fresh module with
``module(x, scale) -> (y, out_scale)``: ``x`` is the dequantized input (``q * scale``), ``y`` the
dequantized output ``q_out * out_scale`` (``out_scale`` is ``None`` for ``fp32``). Each method
computes what its official reference computes; deviations are listed in each module's docstring.

The methods, their order, their output bits and their kernel factories come from the catalogue
(:mod:`policysearch.methods`): a descriptor's ``kernel`` is a ``"module:attr"`` string naming
``factory(*, bits, norm) -> nn.Module``, imported here on first use.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from torch import nn

import policysearch.methods as _catalogue
from policysearch.errors import ConfigError

__all__ = ["create", "default_bits", "factory", "kinds", "methods"]

KernelFactory = Callable[..., nn.Module]


def kinds() -> list[str]:
    """The non-linear kinds, in the catalogue's order (softmax, gelu, layernorm)."""
    return _catalogue.kinds()


def methods(kind: str) -> list[str]:
    """The method names of ``kind``, in the catalogue's order (unknown kinds list the valid ones)."""
    return _catalogue.methods(kind)


@functools.cache
def _resolve(target: str) -> KernelFactory:
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"kernel factory {target!r} cannot be imported: {exc}") from None
    if not callable(obj):
        raise ConfigError(f"kernel factory {target!r} is not callable")
    return obj


def factory(kind: str, method: str) -> KernelFactory:
    """The kernel factory the catalogue names for ``kind``/``method``, imported on first use."""
    desc = _catalogue.get_method(kind, method)
    if desc.kernel is None:  # the catalogue declares the method but no kernel for it
        raise LookupError(f"{desc.key} is in the method catalogue but no kernel is registered for it")
    return _resolve(desc.kernel)


def default_bits(kind: str, method: str) -> int | None:
    """The output bit width ``create`` uses without ``bits`` (``None``: the method has none)."""
    return _catalogue.get_method(kind, method).default_bits


def create(kind: str, method: str, *, bits: int | None = None, norm: nn.LayerNorm | None = None) -> nn.Module:
    """A fresh kernel module for ``kind``/``method`` (``norm`` required for layernorm)."""
    make = factory(kind, method)
    desc = _catalogue.get_method(kind, method)
    if bits is not None and bits not in desc.out_bits:
        allowed = ", ".join(map(str, desc.out_bits)) or "none (this method has no output bit width)"
        raise ValueError(f"{kind}/{method}: bits={bits} not supported; allowed: {allowed}")
    if kind == "layernorm" and not isinstance(norm, nn.LayerNorm):
        raise ValueError(f"layernorm/{method} needs norm=<the nn.LayerNorm it replaces>")
    return make(bits=desc.default_bits if bits is None else bits, norm=norm)

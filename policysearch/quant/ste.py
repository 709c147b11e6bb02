"""Straight-through estimators: rounding in the forward pass, identity gradient backward.

Two forms, for two needs:

* :func:`ste` ``(x, y)``: the value of ``y``, the gradient of ``x``, as ``x + (y - x).detach()``
  (the quantizers' fake quantization: ``y`` is a quantized ``x``; no graph without autograd);
* :func:`floor_ste` / :func:`round_ste`: ``floor`` / ``round`` (half to even) whose forward value
  is exactly ``torch.floor`` / ``torch.round`` (no float re-association, which the integer kernels
  need to stay bit-exact), identity backward: I-BERT's and I-ViT's ``floor_ste`` / ``round_ste``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["floor_ste", "round_ste", "ste"]


def ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Value of ``y``, gradient of ``x`` (``y`` is a quantized version of ``x``)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return y
    return x + (y - x).detach()


def _straight_through(op: Callable[[torch.Tensor], torch.Tensor]) -> type[torch.autograd.Function]:
    """An autograd function whose forward is exactly ``op`` and whose backward is the identity."""

    class _STE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
            return op(x)

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
            return grad

    return _STE


_FloorSTE = _straight_through(torch.floor)
_RoundSTE = _straight_through(torch.round)


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.floor(x)`` exactly, identity gradient."""
    return _FloorSTE.apply(x)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.round(x)`` (half to even) exactly, identity gradient."""
    return _RoundSTE.apply(x)

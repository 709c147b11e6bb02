"""Straight-through estimators: round/floor in the forward pass, identity gradient backward."""
from __future__ import annotations

import torch

__all__ = ["floor_ste", "round_ste", "ste"]


def ste(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Value of ``y``, gradient of ``x`` (``y`` is a quantized version of ``x``)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return y
    return x + (y - x).detach()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return ste(x, torch.round(x))


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    return ste(x, torch.floor(x))

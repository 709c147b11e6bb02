"""``relu``: ReLU in place of GELU (Tayaranian et al. 2024, GELU-less Swin; no official code).

An integer ReLU is exact: ``out_int = max(x_int, 0)`` and ``out_scale = scale``, so ``y`` equals
``relu(x)``. The gradient is ReLU's own (the site's function really changes; recover accuracy
by distillation).
"""
from __future__ import annotations

import torch
from torch import nn

from policysearch.kernels._common import as_scale

__all__ = ["IntReLU", "gelu"]


class IntReLU(nn.Module):
    @staticmethod
    def row_local() -> bool:
        """Elementwise (``QuantSite.row_local``)."""
        return True

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(x), as_scale(scale, x)


# ---- kernel factories (the method catalogue's ``kernel``: policysearch.methods) ----
def gelu(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return IntReLU()

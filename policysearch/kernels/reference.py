"""``fp32``: the float operators themselves (no quantization); ``out_scale`` is ``None``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FloatGELU", "FloatLayerNorm", "FloatSoftmax", "gelu", "layernorm", "softmax"]


class FloatSoftmax(nn.Module):
    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return x.softmax(dim=-1), None


class FloatGELU(nn.Module):
    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return F.gelu(x), None


class FloatLayerNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None, **_: object) -> tuple[torch.Tensor, None]:
        n = self.norm
        return F.layer_norm(x, n.normalized_shape, n.weight, n.bias, n.eps), None


# ---- kernel factories (the method catalogue's ``kernel``: policysearch.methods) ----
def softmax(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return FloatSoftmax()


def gelu(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return FloatGELU()


def layernorm(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return FloatLayerNorm(norm)

"""``fp32``: the float operators themselves (no quantization); ``out_scale`` is ``None``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.kernels._common import register_kernel

__all__ = ["FloatGELU", "FloatLayerNorm", "FloatSoftmax"]


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


register_kernel("softmax", "fp32", lambda **_: FloatSoftmax())
register_kernel("gelu", "fp32", lambda **_: FloatGELU())
register_kernel("layernorm", "fp32", lambda norm, **_: FloatLayerNorm(norm))

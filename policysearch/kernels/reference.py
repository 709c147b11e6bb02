"""``fp32``: the float operators themselves (no quantization); ``out_scale`` is ``None``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.kernels._common import KERNELS, KernelEntry

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


KERNELS.register("softmax/fp32", KernelEntry(factory=lambda **_: FloatSoftmax()))
KERNELS.register("gelu/fp32", KernelEntry(factory=lambda **_: FloatGELU()))
KERNELS.register("layernorm/fp32", KernelEntry(factory=lambda norm, **_: FloatLayerNorm(norm)))

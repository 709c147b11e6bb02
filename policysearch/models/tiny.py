"""Tiny randomly initialised timm models for tests and quick checks (no weights, no network)."""
from __future__ import annotations

from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = ["tiny_swin", "tiny_vit"]


def tiny_vit(*, num_classes: int = 10, img_size: int = 32, in_chans: int = 3, distilled: bool = False) -> nn.Module:
    """A 2-block ViT (width 32, 2 heads, patch 8): 2 softmax, 2 GELU, 5 LayerNorm sites."""
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    return cls(
        img_size=img_size, patch_size=8, in_chans=in_chans, num_classes=num_classes,
        embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
    ).eval()


def tiny_swin(*, num_classes: int = 10, img_size: int = 32, in_chans: int = 3) -> nn.Module:
    """A 2-stage Swin (patch 2, window 4): 2 softmax, 2 GELU, 7 LayerNorm sites (patch merging incl.)."""
    return SwinTransformer(
        img_size=img_size, patch_size=2, in_chans=in_chans, num_classes=num_classes,
        embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, mlp_ratio=2.0,
    ).eval()

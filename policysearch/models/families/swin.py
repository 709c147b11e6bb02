"""Swin: timm ``SwinTransformer`` (stages of shifted-window blocks, patch merging between them)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
)
from torch import nn

from policysearch.models.attention import PaperWindowAttention, QuantWindowAttention
from policysearch.models.chain import Segment, halves, paper_halves, timm_head
from policysearch.models.families.base import AttentionSwap, Family
from policysearch.models.paper import PaperPatchMerging, PaperSwinBlock
from policysearch.quant import IntLinear

__all__ = ["SwinFamily"]


class SwinFamily(Family):
    name = "swin"
    title = "Swin"
    summary = "timm SwinTransformer (swin_*)"
    #: I-ViT's own Swin wiring: an 8-bit Shiftmax output
    state_tells_img_size = False  # no absolute position embedding to count tokens from

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, SwinTransformer)

    def attentions(self) -> tuple[AttentionSwap, ...]:
        return (AttentionSwap(source=WindowAttention, native=QuantWindowAttention, paper=PaperWindowAttention),)

    # -- native ---------------------------------------------------------------------------------
    def segments(self, model: nn.Module) -> list[Segment]:
        return [*_stages(model, _block), timm_head(model)]

    # -- paper ----------------------------------------------------------------------------------
    def paper_problems(self, model: nn.Module) -> list[str]:
        problems = []
        for j, stage in enumerate(model.layers):
            if type(stage) is not SwinTransformerStage:
                problems.append(f"layers.{j} ({type(stage).__name__})")
                continue
            if not isinstance(stage.downsample, (nn.Identity, PatchMerging)):
                problems.append(f"layers.{j}.downsample ({type(stage.downsample).__name__})")
            for k, b in enumerate(stage.blocks):
                if type(b) is not SwinTransformerBlock:
                    problems.append(f"layers.{j}.blocks.{k} ({type(b).__name__})")
        pool = getattr(getattr(model.head, "global_pool", None), "pool_type", None)
        if pool not in ("avg",):
            problems.append(f"head pooling {pool!r}")
        return problems

    def paper_blocks(self) -> tuple[tuple[type[nn.Module], Callable[[nn.Module, str], nn.Module]], ...]:
        return ((SwinTransformerBlock, PaperSwinBlock), (PatchMerging, PaperPatchMerging))

    def prepare_paper_ends(self, model: nn.Module, observer: str) -> None:
        if isinstance(model.head.fc, nn.Linear):
            model.head.fc = IntLinear(model.head.fc, observer)

    def paper_segments(self, model: nn.Module) -> list[Segment]:
        m = model
        head = Segment(name="head", prefixes=("norm", "head"), fn=lambda carry: m.paper_head.run_swin(m, carry))
        return [*_stages(m, paper_halves), head]


def _second(b: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def second(x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = x.reshape(B, -1, C)
        y = y + b.drop_path2(b.mlp(b.norm2(y)))
        return y.reshape(B, H, W, C)

    return second


def _block(name: str, b: nn.Module) -> list[Segment]:
    if type(b) is not SwinTransformerBlock:
        return [Segment(name=name, prefixes=(name,), fn=b)]
    return halves(name, b, lambda x: x + b.drop_path1(b._attn(b.norm1(x))), _second(b))


def _stages(m: nn.Module, block_segments: Callable[[str, nn.Module], list[Segment]]) -> list[Segment]:
    """Stem, then per stage its patch merging (if any) and its blocks' segments."""
    out = [Segment(name="stem", prefixes=("patch_embed",), fn=m.patch_embed)]
    for j, stage in enumerate(m.layers):
        if not isinstance(stage.downsample, nn.Identity):
            name = f"layers.{j}.downsample"
            out.append(Segment(name=name, prefixes=(name,), fn=stage.downsample))
        for k, block in enumerate(stage.blocks):
            out += block_segments(f"layers.{j}.blocks.{k}", block)
    return out

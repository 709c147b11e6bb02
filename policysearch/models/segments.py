"""A model's forward pass as a chain of segments (stem, each block's two halves, head).

The evaluator caches each segment's input for a policy; a policy that first differs at a site in
segment ``k`` restarts from segment ``k``'s cached input instead of recomputing the whole forward.
A segment's output may depend only on the sites inside it and on the model-wide bit widths.

``native`` wiring: segments call timm's modules and pass tensors. ``paper`` wiring: they pass the
pipeline's ``(x, scale)`` pair (the stem takes the image, the head returns the logits), and the
paper-wired model's ``forward`` is exactly this chain, so a restart from a cached input computes
what a full forward computes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from policysearch.models.wiring import model_family

__all__ = ["Segment", "segments"]


@dataclass(frozen=True, kw_only=True)
class Segment:
    name: str
    prefixes: tuple[str, ...]  # site names starting with one of these belong here
    fn: Callable[[torch.Tensor], torch.Tensor]

    def owns(self, site: str) -> bool:
        return any(site == p or site.startswith(p + ".") for p in self.prefixes)


def segments(model: nn.Module) -> list[Segment]:
    family = model_family(model)
    info = getattr(model, "_policysearch", None)
    if getattr(info, "wiring", None) == "paper" or hasattr(model, "paper_head"):
        return _paper_vit(model) if family == "vit" else _paper_swin(model)
    return _vit(model) if family == "vit" else _swin(model)


def _head(model: nn.Module) -> Segment:
    return Segment(
        name="head",
        prefixes=("norm", "fc_norm", "head", "head_dist"),
        fn=lambda x: model.forward_head(model.norm(x)),
    )


def _halves(name: str, block: nn.Module, first: Callable, second: Callable) -> list[Segment]:
    """A pre-norm block as two segments (attention half, MLP half): a change in the MLP half
    restarts after the attention half."""
    return [
        Segment(name=f"{name}.attn", prefixes=(f"{name}.norm1", f"{name}.attn"), fn=first),
        Segment(name=f"{name}.mlp", prefixes=(f"{name}.norm2", f"{name}.mlp"), fn=second),
    ]


def _vit_block(name: str, b: nn.Module) -> list[Segment]:
    from timm.models.vision_transformer import Block

    if type(b) is not Block:  # other block types: one segment, their own forward
        return [Segment(name=name, prefixes=(name,), fn=b)]
    return _halves(name, b,
                   lambda x: x + b.drop_path1(b.ls1(b.attn(b.norm1(x)))),
                   lambda x: x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))))


def _swin_second(b: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def second(x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = x.reshape(B, -1, C)
        y = y + b.drop_path2(b.mlp(b.norm2(y)))
        return y.reshape(B, H, W, C)

    return second


def _swin_block(name: str, b: nn.Module) -> list[Segment]:
    from timm.models.swin_transformer import SwinTransformerBlock

    if type(b) is not SwinTransformerBlock:
        return [Segment(name=name, prefixes=(name,), fn=b)]
    return _halves(name, b, lambda x: x + b.drop_path1(b._attn(b.norm1(x))), _swin_second(b))


def _vit(m: nn.Module) -> list[Segment]:
    stem = Segment(
        name="stem",
        prefixes=("patch_embed", "norm_pre"),
        fn=lambda x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))),
    )
    blocks = [seg for i, b in enumerate(m.blocks) for seg in _vit_block(f"blocks.{i}", b)]
    return [stem, *blocks, _head(m)]


def _swin_stages(m: nn.Module, block_segments: Callable[[str, nn.Module], list[Segment]]) -> list[Segment]:
    """Stem, then per stage its patch merging (if any) and its blocks' segments."""
    out = [Segment(name="stem", prefixes=("patch_embed",), fn=m.patch_embed)]
    for j, stage in enumerate(m.layers):
        if not isinstance(stage.downsample, nn.Identity):
            name = f"layers.{j}.downsample"
            out.append(Segment(name=name, prefixes=(name,), fn=stage.downsample))
        for k, block in enumerate(stage.blocks):
            out += block_segments(f"layers.{j}.blocks.{k}", block)
    return out


def _swin(m: nn.Module) -> list[Segment]:
    return [*_swin_stages(m, _swin_block), _head(m)]


def _paper_halves(name: str, block: nn.Module) -> list[Segment]:
    return _halves(name, block, block.attn_half, block.mlp_half)


def _paper_vit(m: nn.Module) -> list[Segment]:
    stem = Segment(name="stem", prefixes=("patch_embed", "norm_pre"), fn=lambda img: m.paper_stem.run(m, img))
    blocks = [seg for i, b in enumerate(m.blocks) for seg in _paper_halves(f"blocks.{i}", b)]
    head = Segment(name="head", prefixes=("norm", "fc_norm", "head", "head_dist"),
                   fn=lambda carry: m.paper_head.run_vit(m, carry))
    return [stem, *blocks, head]


def _paper_swin(m: nn.Module) -> list[Segment]:
    head = Segment(name="head", prefixes=("norm", "head"), fn=lambda carry: m.paper_head.run_swin(m, carry))
    return [*_swin_stages(m, _paper_halves), head]

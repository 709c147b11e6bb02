"""ViT / DeiT: timm ``VisionTransformer`` and its subclasses (distilled DeiT included)."""
from __future__ import annotations

from collections.abc import Callable

from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from policysearch.models.attention import PaperAttention, QuantAttention
from policysearch.models.chain import Segment, halves, paper_halves, timm_head
from policysearch.models.families.base import AttentionSwap, Family
from policysearch.models.paper import PaperStem, PaperViTBlock
from policysearch.quant import IntLinear

__all__ = ["ViTFamily"]


class ViTFamily(Family):
    name = "vit"
    title = "ViT/DeiT"
    summary = "timm VisionTransformer (vit_*, deit_*, including distilled)"
    #: I-ViT's own ViT/DeiT wiring: a 16-bit Shiftmax output
    state_tells_img_size = True  # the position embedding's token count

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def attentions(self) -> tuple[AttentionSwap, ...]:
        return (AttentionSwap(source=Attention, native=QuantAttention, paper=PaperAttention),)

    # -- native ---------------------------------------------------------------------------------
    def segments(self, model: nn.Module) -> list[Segment]:
        m = model
        stem = Segment(
            name="stem",
            prefixes=("patch_embed", "norm_pre"),
            fn=lambda x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))),
        )
        blocks = [seg for i, b in enumerate(m.blocks) for seg in _block(f"blocks.{i}", b)]
        return [stem, *blocks, timm_head(m)]

    # -- paper ----------------------------------------------------------------------------------
    def paper_problems(self, model: nn.Module) -> list[str]:
        problems = []
        if getattr(model, "attn_pool", None) is not None:
            problems.append("attn_pool (attention pooling)")
        if getattr(model, "global_pool", "token") not in ("token", "avg", ""):
            problems.append(f"global_pool={model.global_pool!r}")
        if getattr(model, "dynamic_img_size", False):
            problems.append("dynamic_img_size=True")
        for i, b in enumerate(model.blocks):
            if type(b) is not Block:
                problems.append(f"blocks.{i} ({type(b).__name__})")
        head_ok = (nn.Linear, nn.Identity)
        for name in ("head", "head_dist"):
            if hasattr(model, name) and not isinstance(getattr(model, name), head_ok):
                problems.append(f"{name} ({type(getattr(model, name)).__name__})")
        return problems

    def paper_blocks(self) -> tuple[tuple[type[nn.Module], Callable[[nn.Module, str], nn.Module]], ...]:
        return ((Block, PaperViTBlock),)

    def prepare_paper_ends(self, model: nn.Module, observer: str) -> None:
        for name in ("head", "head_dist"):
            if isinstance(getattr(model, name, None), nn.Linear):
                setattr(model, name, IntLinear(getattr(model, name), observer))
        model.paper_stem = PaperStem(model, observer)

    def paper_segments(self, model: nn.Module) -> list[Segment]:
        m = model
        stem = Segment(name="stem", prefixes=("patch_embed", "norm_pre"), fn=lambda img: m.paper_stem.run(m, img))
        blocks = [seg for i, b in enumerate(m.blocks) for seg in paper_halves(f"blocks.{i}", b)]
        head = Segment(name="head", prefixes=("norm", "fc_norm", "head", "head_dist"),
                       fn=lambda carry: m.paper_head.run_vit(m, carry))
        return [stem, *blocks, head]


def _block(name: str, b: nn.Module) -> list[Segment]:
    if type(b) is not Block:  # other block types: one segment, their own forward
        return [Segment(name=name, prefixes=(name,), fn=b)]
    return halves(name, b,
                  lambda x: x + b.drop_path1(b.ls1(b.attn(b.norm1(x)))),
                  lambda x: x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))))

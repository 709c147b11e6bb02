"""A model's forward pass as a chain of segments (stem, each block, head).

The evaluator caches each segment's input for a policy; a policy that first differs at a site in
segment ``k`` restarts from segment ``k``'s cached input instead of recomputing the whole forward.
A segment's output may depend only on the sites inside it and on the model-wide bit widths.
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
    return _vit(model) if family == "vit" else _swin(model)


def _head(model: nn.Module) -> Segment:
    return Segment(
        name="head",
        prefixes=("norm", "fc_norm", "head", "head_dist"),
        fn=lambda x: model.forward_head(model.norm(x)),
    )


def _vit(m: nn.Module) -> list[Segment]:
    stem = Segment(
        name="stem",
        prefixes=("patch_embed", "norm_pre"),
        fn=lambda x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x)))),
    )
    blocks = [Segment(name=f"blocks.{i}", prefixes=(f"blocks.{i}",), fn=b) for i, b in enumerate(m.blocks)]
    return [stem, *blocks, _head(m)]


def _swin(m: nn.Module) -> list[Segment]:
    out = [Segment(name="stem", prefixes=("patch_embed",), fn=m.patch_embed)]
    for j, stage in enumerate(m.layers):
        if not isinstance(stage.downsample, nn.Identity):
            name = f"layers.{j}.downsample"
            out.append(Segment(name=name, prefixes=(name,), fn=stage.downsample))
        for k, block in enumerate(stage.blocks):
            name = f"layers.{j}.blocks.{k}"
            out.append(Segment(name=name, prefixes=(name,), fn=block))
    return [*out, _head(m)]

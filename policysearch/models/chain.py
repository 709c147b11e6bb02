"""The pieces a forward chain is built from: :class:`Segment` and the halves of a pre-norm block.

A family (``policysearch.models.families``) cuts its models into segments with these;
``policysearch.models.segments`` explains what the chain is for.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Segment", "halves", "paper_halves", "timm_head"]


@dataclass(frozen=True, kw_only=True)
class Segment:
    name: str
    prefixes: tuple[str, ...]  # site names starting with one of these belong here
    fn: Callable[[torch.Tensor], torch.Tensor]

    def owns(self, site: str) -> bool:
        return any(site == p or site.startswith(p + ".") for p in self.prefixes)


def timm_head(model: nn.Module) -> Segment:
    """timm's own head (final norm, pooling, classifier): the ``native`` wiring's last segment."""
    return Segment(
        name="head",
        prefixes=("norm", "fc_norm", "head", "head_dist"),
        fn=lambda x: model.forward_head(model.norm(x)),
    )


def halves(name: str, block: nn.Module, first: Callable, second: Callable) -> list[Segment]:
    """A pre-norm block as two segments (attention half, MLP half): a change in the MLP half
    restarts after the attention half."""
    return [
        Segment(name=f"{name}.attn", prefixes=(f"{name}.norm1", f"{name}.attn"), fn=first),
        Segment(name=f"{name}.mlp", prefixes=(f"{name}.norm2", f"{name}.mlp"), fn=second),
    ]


def paper_halves(name: str, block: nn.Module) -> list[Segment]:
    """A ``paper`` block (``attn_half`` / ``mlp_half`` on ``(x, scale)``) as two segments."""
    return halves(name, block, block.attn_half, block.mlp_half)

"""A model's forward pass as a chain of segments (stem, each block's two halves, head).

The evaluator caches each segment's input for a policy; a policy that first differs at a site in
segment ``k`` restarts from segment ``k``'s cached input instead of recomputing the whole forward.
A segment's output may depend only on the sites inside it and on the model-wide bit widths.

``native`` wiring: segments call timm's modules and pass tensors. ``paper`` wiring: they pass the
pipeline's ``(x, scale)`` pair (the stem takes the image, the head returns the logits), and the
paper-wired model's ``forward`` is exactly this chain (:func:`paper_forward`), so a restart from a
cached input computes what a full forward computes. The model's family cuts the chain
(``Family.segments`` / ``Family.paper_segments``).
"""
from __future__ import annotations

import types

import torch
from torch import nn

from policysearch.models.chain import Segment
from policysearch.models.families import family_of

__all__ = ["Segment", "install_forward", "paper_forward", "segments"]


def segments(model: nn.Module) -> list[Segment]:
    family = family_of(model)
    info = getattr(model, "_policysearch", None)
    if getattr(info, "wiring", None) == "paper" or hasattr(model, "paper_head"):
        return family.paper_segments(model)
    return family.segments(model)


def paper_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The paper-wired model's ``forward``: its segments in order."""
    h = x
    for seg in segments(self):
        h = seg.fn(h)
    return h


def install_forward(model: nn.Module) -> None:
    """Make ``model(x)`` run the paper pipeline (an instance attribute; deepcopy rebinds it)."""
    model.forward = types.MethodType(paper_forward, model)

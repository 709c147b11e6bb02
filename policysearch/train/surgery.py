"""Small model surgery the training stage and the ReLU repair share: frozen teachers and the GELU
-> ReLU swap (torch only: the objectives layer uses these without importing the training stage)."""
from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from policysearch.models.site import is_gelu

__all__ = ["freeze", "frozen_copy", "is_gelu", "swap_to_relu"]


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring a gradient (a teacher); returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (the student keeps training; the copy never changes)."""
    return freeze(copy.deepcopy(model))


def swap_to_relu(model: nn.Module, paths: Sequence[str]) -> nn.Module:
    """Replace the GELUs at ``paths`` by ``nn.ReLU`` in place; returns ``model``."""
    for path in paths:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if not is_gelu(getattr(parent, attr)):
            raise ValueError(f"{path} is {type(getattr(parent, attr)).__name__}, not a GELU")
        setattr(parent, attr, nn.ReLU())
    return model

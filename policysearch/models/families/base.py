"""The contract of a model family: everything the wirings and the segment chain ask of one.

A family adapts one kind of timm model (``vit``: VisionTransformer, ``swin``: SwinTransformer).
Shared code (``wiring``, ``segments``, ``loading``) never tests which family a model is; it asks
the model's :class:`Family` object (``families.family_of``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from policysearch.errors import PolicySearchError
from policysearch.models.chain import Segment

__all__ = ["AttentionSwap", "Family", "UnsupportedModelError"]


class UnsupportedModelError(PolicySearchError, ValueError):
    """The model's structure cannot be wired; the message names the modules."""


@dataclass(frozen=True, kw_only=True)
class AttentionSwap:
    """A timm attention class a family wires (matched by exact type) and its replacement per wiring.

    ``native`` / ``paper`` are built as ``cls(timm_module, softmax_site, observer)``."""

    source: type[nn.Module]
    native: type[nn.Module]
    paper: type[nn.Module]


class Family(ABC):
    """One model family. Subclass it in ``families/<name>.py`` and register it (``register_family``)."""

    #: registry name, also ``WiringInfo.family`` and the zoo's ``ZooEntry.family``
    name: ClassVar[str]
    #: how people call it in messages ("ViT/DeiT", "Swin")
    title: ClassVar[str]
    #: the timm classes and model names it covers, for the error listing the supported families
    summary: ClassVar[str]
    #: whether a checkpoint's tensors tell the input size (else ``load_model`` says it builds the default)
    state_tells_img_size: ClassVar[bool] = True

    # -- identity -------------------------------------------------------------------------------
    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (exactly one family may match a model)."""

    # -- both wirings ---------------------------------------------------------------------------
    @abstractmethod
    def attentions(self) -> tuple[AttentionSwap, ...]:
        """The attention modules this family's models hold, with their quantized replacements."""

    # -- native wiring --------------------------------------------------------------------------
    @abstractmethod
    def segments(self, model: nn.Module) -> list[Segment]:
        """The ``native`` forward (timm's modules) as a chain of segments, stem to head."""

    # -- paper wiring ---------------------------------------------------------------------------
    @abstractmethod
    def paper_problems(self, model: nn.Module) -> list[str]:
        """What the ``paper`` wiring cannot rebuild in ``model`` (checked before anything changes)."""

    @abstractmethod
    def paper_blocks(self) -> tuple[tuple[type[nn.Module], Callable[[nn.Module, str], nn.Module]], ...]:
        """``(timm class, rebuild(module, observer))`` pairs, rebuilt in this order after the MLPs."""

    @abstractmethod
    def prepare_paper_ends(self, model: nn.Module, observer: str) -> None:
        """Rebuild the stem and classifier(s) around ``(x, scale)`` (before ``paper_head`` is added)."""

    @abstractmethod
    def paper_segments(self, model: nn.Module) -> list[Segment]:
        """The ``paper`` forward as a chain: image -> ``(x, scale)`` pairs -> logits."""

    # -- derived --------------------------------------------------------------------------------
    def attention_swap(self, module: nn.Module) -> AttentionSwap | None:
        """The swap for ``module`` (its exact type), or None when it is not an attention to wire."""
        return next((a for a in self.attentions() if type(module) is a.source), None)

    def native_attentions(self) -> tuple[type[nn.Module], ...]:
        return tuple(a.native for a in self.attentions())

    def paper_attentions(self) -> tuple[type[nn.Module], ...]:
        return tuple(a.paper for a in self.attentions())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

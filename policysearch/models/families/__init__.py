"""The model families policysearch wires, by name (a registry after timm's ``register_model``).

Each family is one module here (``vit``, ``swin``) with a :class:`Family` subclass, registered
below with :func:`register_family`. :func:`family_of` finds a model's family; a model no family
matches is one :class:`UnsupportedModelError` listing the supported families. How to add one:
``docs/architecture.md``, "A model family".
"""
from __future__ import annotations

from typing import TypeVar

from torch import nn

from policysearch.errors import PolicySearchError
from policysearch.models.families.base import AttentionSwap, Family, UnsupportedModelError
from policysearch.models.families.swin import SwinFamily
from policysearch.models.families.vit import ViTFamily
from policysearch.registry import Registry

__all__ = [
    "FAMILIES",
    "AttentionSwap",
    "Family",
    "SwinFamily",
    "UnsupportedModelError",
    "ViTFamily",
    "find_family",
    "family_of",
    "get_family",
    "list_families",
    "register_family",
    "supported_families",
]

FAMILIES: Registry[Family] = Registry("model family")

F = TypeVar("F", Family, type[Family])


def register_family(family: F) -> F:
    """Register a :class:`Family` instance, or a subclass (instantiated; usable as a class decorator)."""
    instance = family() if isinstance(family, type) else family
    if not isinstance(instance, Family):
        raise TypeError(f"register_family takes a Family subclass or instance, not {family!r}")
    FAMILIES.register(instance.name, instance)
    return family


def list_families() -> list[str]:
    """The registered family names, sorted."""
    return FAMILIES.names()


def get_family(name: str) -> Family:
    """The family registered as ``name`` (``UnknownNameError`` lists the valid names)."""
    return FAMILIES.get(name)


def supported_families() -> str:
    """One line naming every family and what it covers (for error messages)."""
    return "; ".join(f"{f.name}: {f.summary}" for f in map(get_family, list_families()))


def find_family(model: nn.Module) -> Family | None:
    """``model``'s family, or None when no family matches it."""
    found = [f for f in map(get_family, list_families()) if f.matches(model)]
    if len(found) > 1:
        raise PolicySearchError(f"model class {type(model).__name__} matches several model families "
                                f"({', '.join(f.name for f in found)}); each family's matches() must "
                                "exclude the others")
    return found[0] if found else None


def family_of(model: nn.Module) -> Family:
    """``model``'s family; :class:`UnsupportedModelError` when none matches."""
    family = find_family(model)
    if family is None:
        raise UnsupportedModelError(
            f"model class {type(model).__name__} is not supported; policysearch supports these model "
            f"families: {supported_families()}. Pass one of those (a timm name or a zoo name, see "
            "`policysearch list models`), or add a family (docs/architecture.md, 'A model family')."
        )
    return family


register_family(ViTFamily)
register_family(SwinFamily)

"""Search spaces (torch-free); the sites they range over are :mod:`policysearch.sites`.

The site names are re-exported here; the space names load on first use (PEP 562).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from policysearch.sites import KIND_METHODS, KINDS, Site, check_method

if TYPE_CHECKING:
    from policysearch.spaces.space import (
        SPACES,
        SearchSpace,
        list_spaces,
        load_space,
    )

_LAZY = {name: "policysearch.spaces.space" for name in
         ("SPACES", "SearchSpace", "list_spaces", "load_space")}

__all__ = [
    "KINDS",
    "KIND_METHODS",
    "SPACES",
    "SearchSpace",
    "Site",
    "check_method",
    "list_spaces",
    "load_space",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Sites and search spaces (torch-free).

:mod:`policysearch.spaces.site` is imported eagerly; the space names load on first use
(PEP 562), so ``policysearch.policy`` may import ``policysearch.spaces.site`` while
``policysearch.spaces.space`` (which imports the policy module) is not loaded yet.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from policysearch.spaces.site import KIND_METHODS, KINDS, Site, check_method

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

"""policysearch: search per-layer integer-only quantization policies for vision transformers.

The package root imports lazily (PEP 562): ``import policysearch`` loads nothing heavy, and a name
below is imported from its module on first use, so ``policysearch.policy``, ``.spaces``,
``.strategies`` and ``.methods`` work without loading torch or optuna.

The main job in Python is :func:`search_policy` (docs/api.md). Its verb is not ``search``:
``policysearch.search`` stays the module of the search driver (``from policysearch.search import
search, SearchConfig``), which the import system binds to that package attribute.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from policysearch.registry import lazy_exports

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: public name -> the module that defines it
_LAZY: dict[str, str] = {
    "KIND_METHODS": "policysearch.sites",
    "Site": "policysearch.sites",
    "Choice": "policysearch.policy",
    "Policy": "policysearch.policy",
    "PolicyDocument": "policysearch.policy",
    "read_policy": "policysearch.policy",
    "write_policy": "policysearch.policy",
    "PolicyError": "policysearch.errors",
    "PolicySearchError": "policysearch.errors",
    "EvalResult": "policysearch.result",
    "SiteMetrics": "policysearch.result",
    "UnsupportedModelError": "policysearch.models.wiring",
    "PolicyResult": "policysearch.api",
    "search_policy": "policysearch.api",
    "SearchConfig": "policysearch.search",
    "apply_policy": "policysearch.models",
    "calibrate": "policysearch.models",
    "find_sites": "policysearch.models",
    "float_mode": "policysearch.models",
    "prepare": "policysearch.models",
    "record_sites": "policysearch.models",
}

if TYPE_CHECKING:
    from policysearch.api import PolicyResult, search_policy
    from policysearch.errors import PolicyError, PolicySearchError
    from policysearch.models import (
        apply_policy,
        calibrate,
        find_sites,
        float_mode,
        prepare,
        record_sites,
    )
    from policysearch.models.wiring import UnsupportedModelError
    from policysearch.policy import Choice, Policy, PolicyDocument, read_policy, write_policy
    from policysearch.result import EvalResult, SiteMetrics
    from policysearch.search import SearchConfig
    from policysearch.sites import KIND_METHODS, Site

__all__ = [
    "KIND_METHODS",
    "Choice",
    "EvalResult",
    "Policy",
    "PolicyDocument",
    "PolicyError",
    "PolicyResult",
    "PolicySearchError",
    "SearchConfig",
    "Site",
    "SiteMetrics",
    "UnsupportedModelError",
    "__version__",
    "apply_policy",
    "calibrate",
    "find_sites",
    "float_mode",
    "prepare",
    "read_policy",
    "record_sites",
    "search_policy",
    "write_policy",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)

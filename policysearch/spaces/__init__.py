"""Sites and search spaces (torch-free)."""
from policysearch.spaces.site import KIND_METHODS, KINDS, Site, check_method
from policysearch.spaces.space import (
    FALLBACK_ORDER,
    METHOD_ORDER,
    SPACES,
    SearchSpace,
    list_spaces,
    load_space,
)

__all__ = [
    "FALLBACK_ORDER",
    "KINDS",
    "KIND_METHODS",
    "METHOD_ORDER",
    "SPACES",
    "SearchSpace",
    "Site",
    "check_method",
    "list_spaces",
    "load_space",
]

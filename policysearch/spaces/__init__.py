"""Sites and search spaces (torch-free)."""
from policysearch.spaces.site import KIND_METHODS, KINDS, Site, check_method
from policysearch.spaces.space import SPACES, SearchSpace, list_spaces, load_space

__all__ = ["KINDS", "KIND_METHODS", "SPACES", "SearchSpace", "Site", "check_method", "list_spaces", "load_space"]

"""policysearch: search per-layer integer-only quantization policies for vision transformers."""
from __future__ import annotations

import logging

from policysearch.models import (
    UnsupportedModelError,
    apply_policy,
    calibrate,
    find_sites,
    float_mode,
    prepare,
    record_sites,
)
from policysearch.policy import (
    Choice,
    Policy,
    PolicyDocument,
    PolicyError,
    read_policy,
    write_policy,
)
from policysearch.result import EvalResult, SiteMetrics
from policysearch.spaces.site import KIND_METHODS, Site

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "KIND_METHODS",
    "Choice",
    "EvalResult",
    "Policy",
    "PolicyDocument",
    "PolicyError",
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
    "write_policy",
]

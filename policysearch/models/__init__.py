"""Site discovery and wiring for timm ViT/DeiT/Swin, plus the embedded model zoo."""
from policysearch.models.families import Family, family_of, get_family, list_families, register_family
from policysearch.models.precision import InputPrecision, input_precision
from policysearch.models.site import QuantSite
from policysearch.models.wiring import (
    UnsupportedModelError,
    WiringInfo,
    apply_policy,
    calibrate,
    find_sites,
    float_mode,
    model_family,
    prepare,
    record_sites,
    sites_of,
)

__all__ = [
    "Family",
    "InputPrecision",
    "QuantSite",
    "UnsupportedModelError",
    "WiringInfo",
    "apply_policy",
    "calibrate",
    "family_of",
    "find_sites",
    "float_mode",
    "get_family",
    "input_precision",
    "list_families",
    "model_family",
    "prepare",
    "record_sites",
    "register_family",
    "sites_of",
]

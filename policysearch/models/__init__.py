"""Site discovery and wiring for timm ViT/DeiT/Swin, plus the embedded model zoo."""
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
    "InputPrecision",
    "QuantSite",
    "UnsupportedModelError",
    "WiringInfo",
    "apply_policy",
    "calibrate",
    "find_sites",
    "float_mode",
    "input_precision",
    "model_family",
    "prepare",
    "record_sites",
    "sites_of",
]

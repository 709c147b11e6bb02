"""The compute device a run asks for, checked against this machine (low level: errors and torch only)."""
from __future__ import annotations

import re

import torch

from policysearch.errors import ConfigError

__all__ = ["DEVICE_PATTERN", "resolve_device"]

#: the device names the command line accepts
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> cuda when present, else cpu; an unknown or unavailable device is one clear error."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"--device {str(device)[:40]!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device

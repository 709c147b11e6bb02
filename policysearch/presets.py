"""Preset resolution shared by spaces, objectives and runners (ModelOpt style).

A name resolves as: an explicit existing path, then ``./<kind>/<name>.yaml`` in the working
directory, then the defaults built into the code, so the package runs with no preset file at all.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from policysearch.errors import ConfigError
from policysearch.registry import Registry

__all__ = ["read_yaml", "resolve_preset"]


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_preset(kind: str, name: str, builtins: Registry[Mapping[str, Any]]) -> tuple[dict[str, Any], str]:
    """``(data, name)`` for a preset of ``kind`` ('spaces', 'objectives', 'runners')."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{kind[:-1]} preset file {name!r} does not exist")
        return read_yaml(path), path.stem
    local = Path(kind) / f"{name}.yaml"
    if local.is_file():
        return read_yaml(local), name
    if name in builtins:
        return dict(builtins.get(name)), name
    available = sorted(set(builtins.names()) | {p.stem for p in Path(kind).glob("*.yaml")})
    raise ConfigError(f"unknown {kind[:-1]} {name!r}; available: {', '.join(available)}")

"""Preset resolution shared by spaces, objectives and runners (ModelOpt style).

The built-in presets are this package's YAML files, ``policysearch/presets/<kind>/<name>.yaml``
(the single definition of each). A name resolves as: an explicit existing path, then
``./<kind>/<name>.yaml`` in the working directory (the user's own), then the built-in file.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from policysearch.errors import ConfigError
from policysearch.registry import Registry

__all__ = ["KINDS", "builtin_presets", "read_yaml", "resolve_preset"]

#: the preset kinds: one folder of YAML files each, here and in a user's working directory
KINDS = ("spaces", "objectives", "runners")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def builtin_presets(kind: str) -> Registry[dict[str, Any]]:
    """The package's built-in presets of ``kind``, read from its YAML files (``name`` key removed)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown preset kind {kind!r}; valid: {', '.join(KINDS)}")
    registry: Registry[dict[str, Any]] = Registry(kind[:-1] if kind != "runners" else "runner preset")
    folder = resources.files(__name__) / kind
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        path = Path(str(entry))
        data = read_yaml(path)
        name = data.pop("name", path.stem)
        if name != path.stem:
            raise ConfigError(f"{path}: name {name!r} differs from the file name {path.stem!r}")
        registry.register(name, data)
    return registry


def resolve_preset(kind: str, name: str, builtins: Registry[dict[str, Any]]) -> tuple[dict[str, Any], str]:
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

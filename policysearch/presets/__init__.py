"""Preset resolution shared by spaces, objectives and runners (ModelOpt style).

The built-in presets are this package's YAML files, ``policysearch/presets/<kind>/<name>.yaml``
(the single definition of each). A name resolves as: an explicit existing path, then
``./<kind>/<name>.yaml`` in the working directory (the user's own), then the built-in file.
"""
from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from policysearch.errors import ConfigError
from policysearch.registry import Registry
from policysearch.safeload import MAX_DEPTH, check_tree, one_line, read_text

__all__ = ["KINDS", "builtin_presets", "read_yaml", "resolve_preset"]

#: the preset kinds: one folder of YAML files each, here and in a user's working directory
KINDS = ("spaces", "objectives", "runners")


#: the most values a preset may hold once its aliases are expanded (a real one has < 100)
MAX_PRESET_VALUES = 10_000
_BRACKETS = re.compile(r"[\[\]{}]")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML says keys are unique;
    PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _flow_depth(text: str) -> int:
    """The deepest nesting of flow brackets (``[`` ``{``), quotes ignored: an upper bound that
    a real preset stays far below."""
    depth = deepest = 0
    for m in _BRACKETS.finditer(text):
        depth = depth + 1 if m.group() in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def read_yaml(path: Path) -> dict[str, Any]:
    """A preset file as a mapping; bad YAML, duplicate keys, nesting or alias bombs are one line."""
    text = read_text(path, error=ConfigError, what="preset")
    if _flow_depth(text) > MAX_DEPTH:  # before parsing: PyYAML's flow scanner is quadratic in depth
        raise ConfigError(f"{path}: nested more than {MAX_DEPTH} levels deep")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(one_line(f"{path}: not valid YAML ({exc})")) from None
    except RecursionError:
        raise ConfigError(f"{path}: nested more than {MAX_DEPTH} levels deep") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a 5,000-digit integer, a 13th month
        why = "an integer with too many digits" if "digits" in str(exc) else one_line(exc, 120)
        raise ConfigError(f"{path}: a value cannot be read ({why})") from None
    check_tree(data, where=str(path), error=ConfigError, max_nodes=MAX_PRESET_VALUES)
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

"""JSON schemas shipped with the package; the policy schema's method enums mirror the catalogue.

``policy.schema.json`` is a committed file (other tools read it as is). Its ``kind`` enum and its
one ``oneOf`` branch per kind (``kind`` const + ``method`` enum) are generated from
:mod:`policysearch.methods`; a test keeps the file equal to the catalogue, and
``python -m policysearch.schema`` regenerates it (``--check`` only compares).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import policysearch.methods as _catalogue

__all__ = ["POLICY_SCHEMA", "build_policy_schema", "catalogue_enums", "load_policy_schema", "main",
           "policy_schema_path", "schema_enums"]

POLICY_SCHEMA = "policy.schema.json"


def policy_schema_path() -> Path:
    """The committed ``policy.schema.json`` of this package."""
    return Path(str(resources.files(__name__).joinpath(POLICY_SCHEMA)))


def load_policy_schema(path: str | Path | None = None) -> dict[str, Any]:
    return json.loads(Path(path or policy_schema_path()).read_text())


def catalogue_enums() -> dict[str, list[str]]:
    """``{kind: [method, ...]}`` in the catalogue's order."""
    return {kind: _catalogue.methods(kind) for kind in _catalogue.kinds()}


def _site_item(schema: dict[str, Any]) -> dict[str, Any]:
    return schema["properties"]["sites"]["items"]


def schema_enums(schema: dict[str, Any]) -> dict[str, list[str]]:
    """``{kind: [method, ...]}`` as a policy schema declares them (kind enum order)."""
    item = _site_item(schema)
    branches = {b["properties"]["kind"]["const"]: list(b["properties"]["method"]["enum"]) for b in item["oneOf"]}
    return {kind: branches.get(kind, []) for kind in item["properties"]["kind"]["enum"]}


def build_policy_schema(schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """``schema`` (default: the committed file) with its kind and method enums from the catalogue."""
    out = copy.deepcopy(schema if schema is not None else load_policy_schema())
    item = _site_item(out)
    enums = catalogue_enums()
    item["properties"]["kind"] = {"enum": list(enums)}
    item["oneOf"] = [{"properties": {"kind": {"const": kind}, "method": {"enum": names}}}
                     for kind, names in enums.items()]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m policysearch.schema",
        description="Regenerate policy.schema.json's kind/method enums from the method catalogue.")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the file is stale")
    parser.add_argument("--path", type=Path, default=None, help="the schema file (default: the package's)")
    args = parser.parse_args(argv)
    path = args.path or policy_schema_path()
    current = load_policy_schema(path)
    wanted = build_policy_schema(current)
    if args.check:
        if current != wanted:
            print(f"{path}: enums differ from the method catalogue; run `python -m policysearch.schema`",
                  file=sys.stderr)
            return 1
        print(f"{path}: up to date")
        return 0
    if current == wanted:
        print(f"{path}: up to date")
        return 0
    path.write_text(json.dumps(wanted, indent=2, ensure_ascii=False) + "\n")
    print(f"{path}: regenerated")
    return 0

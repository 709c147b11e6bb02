"""Reading untrusted JSON and YAML documents into bounded trees, every failure one project error.

The readers of policy files, run records and presets decode through here, so that no input makes
them recurse without bound, run out of memory on aliases, or raise anything but the caller's
:class:`~policysearch.errors.PolicySearchError` subclass with a one-line message. A decoded tree
is at most :data:`MAX_DEPTH` containers deep (every later walk, validation, repr and write-back
recurses far less than Python's limit), has no cycles, no lone UTF-16 surrogates in its strings,
no duplicate keys and, for YAML, at most ``max_nodes`` nodes once its aliases are expanded.
Imports nothing from the package but the errors.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from policysearch.errors import PolicySearchError

__all__ = ["MAX_DEPTH", "MAX_MESSAGE", "check_tree", "decode_json", "one_line", "read_text"]

#: the deepest nesting of objects/arrays any document of the project may have (they need < 10)
MAX_DEPTH = 64
#: the longest message a reader puts in an error (the offending value is shortened to fit)
MAX_MESSAGE = 300

_SURROGATE = re.compile("[\ud800-\udfff]")

ErrorType = Callable[[str], PolicySearchError]


class _Refused(Exception):
    """Raised inside the JSON decoder's hooks; turned into the caller's error."""


def one_line(text: object, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs become one space), shortened to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def read_text(path: str | Path, *, error: ErrorType, what: str) -> str:
    """The file as text: UTF-8 with or without a byte-order mark; unreadable or not UTF-8 is ``error``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({one_line(exc.strerror or exc)})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: the {what} is not UTF-8 text (byte {exc.start})") from None


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {one_line(repr(key), 80)}")
        out[key] = value
    return out


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # over Python's limit on integer digits
        raise _Refused(f"an integer of {len(text)} digits") from None


def decode_json(text: str, *, where: str, error: ErrorType, allow_nonfinite: bool = False,
                max_depth: int = MAX_DEPTH) -> Any:
    """Decode ``text`` (a leading BOM is ignored) into a checked tree (see :func:`check_tree`).

    Without ``allow_nonfinite``, ``NaN``/``Infinity`` literals and numbers that overflow a float
    are refused: the document must be strict JSON."""
    def constant(name: str) -> float:
        if not allow_nonfinite:
            raise _Refused(f"{name} is not JSON (write null)")
        return float(name)

    def number(s: str) -> float:
        value = float(s)
        if not allow_nonfinite and not math.isfinite(value):
            raise _Refused(f"the number {one_line(s, 40)} is too large for a float")
        return value

    try:
        data = json.loads(text.lstrip("\ufeff"), object_pairs_hook=_pairs, parse_constant=constant,
                          parse_float=number, parse_int=_int)
    except _Refused as exc:
        raise error(f"{where}: not valid JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON ({one_line(exc)})") from None
    except RecursionError:
        raise error(f"{where}: nested more than {max_depth} levels deep") from None
    check_tree(data, where=where, error=error, max_depth=max_depth)
    return data


def check_tree(data: Any, *, where: str, error: ErrorType, max_depth: int = MAX_DEPTH,
               max_nodes: int | None = None) -> None:
    """Refuse a tree deeper than ``max_depth``, with a cycle, a lone surrogate in a string, or (when
    given) more than ``max_nodes`` nodes counting each alias expanded. Iterative: never recurses."""
    sizes: dict[int, int] = {}  # id -> expanded node count, once a container is done
    active: set[int] = set()
    # (node, depth, children iterator or None); a container is "active" while on the stack
    stack: list[tuple[Any, int, Any]] = [(data, 1, None)]
    while stack:
        node, depth, children = stack[-1]
        if children is None:
            if isinstance(node, str):
                stack.pop()
                if _SURROGATE.search(node):
                    raise error(f"{where}: a string holds a lone UTF-16 surrogate: {one_line(ascii(node), 80)}")
                continue
            if not isinstance(node, (dict, list)):
                stack.pop()
                continue
            if id(node) in sizes:
                stack.pop()
                continue
            if id(node) in active:
                raise error(f"{where}: the document refers to itself (a cycle of aliases)")
            if depth > max_depth:
                raise error(f"{where}: nested more than {max_depth} levels deep")
            active.add(id(node))
            items = [x for kv in node.items() for x in kv] if isinstance(node, dict) else node
            stack[-1] = (node, depth, iter(items))
            continue
        child = next(children, _DONE)
        if child is _DONE:
            stack.pop()
            active.discard(id(node))
            items = [x for kv in node.items() for x in kv] if isinstance(node, dict) else node
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in items)
            if max_nodes is not None and sizes[id(node)] > max_nodes:
                raise error(f"{where}: more than {max_nodes} values once its aliases are expanded")
            continue
        stack.append((child, depth + 1, None))


_DONE = object()

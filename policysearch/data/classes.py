"""Matching a source's class names to a model's, ignoring case and punctuation.

``"T-shirt/top"``, ``"t_shirt_top"`` and ``"T shirt top"`` are one class; so are ``"Ankle boot"``
and ``"ankle-boot"``. A source whose classes all match the model's is labelled with the model's
class indices; without model class names a source keeps its own order.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from policysearch.data.base import DataError

__all__ = ["ClassMapping", "map_classes", "normalize_class_name"]


def normalize_class_name(name: str) -> str:
    """Lower case, with every character that is not a letter or a digit removed."""
    return re.sub(r"[\W_]+", "", str(name).casefold())


@dataclass(frozen=True, kw_only=True)
class ClassMapping:
    """Source class ``i`` gets label ``labels[i]``; ``names[label]`` names a label."""

    labels: tuple[int, ...]
    names: tuple[str, ...]
    note: str
    #: True when the labels are the model's class indices (matched by name)
    by_name: bool

    @property
    def identity(self) -> bool:
        return self.labels == tuple(range(len(self.labels)))


def _few(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(str(x)) for x in list(names)[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def map_classes(source: Sequence[str], model: Sequence[str] | None, *, what: str, noun: str,
                unmatched_fix: str, default_note: str, strict: bool = True) -> ClassMapping:
    """Map the ``source`` class names onto the ``model`` class names. ``what`` describes the source
    names in messages (e.g. "the class folders of X"), ``noun`` counts them ("class folders").

    Without ``model`` names the source keeps its order (``default_note`` says which). When every
    source class matches a model class the labels are the model's indices. When none or only some
    match, ``strict`` raises one :class:`DataError` naming a few of each and ``unmatched_fix``;
    otherwise the source keeps its order and the note says that the names did not match.
    """
    source = [str(s) for s in source]
    own = ClassMapping(labels=tuple(range(len(source))), names=tuple(source), note=default_note, by_name=False)
    if not model:
        return own
    model = [str(m) for m in model]
    index: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i, name in enumerate(model):
        key = normalize_class_name(name)
        if key in index:
            ambiguous.add(key)
        index.setdefault(key, i)
    keys = [normalize_class_name(s) for s in source]
    clashing = [s for s, k in zip(source, keys) if k in ambiguous]
    if clashing:
        raise DataError(f"{what}: {_few(clashing)} match more than one of the model's class names "
                        f"({_few(model, 10)}) once case and punctuation are ignored; rename them to be distinct")
    matched = [s for s, k in zip(source, keys) if k in index]
    unmatched = [s for s, k in zip(source, keys) if k not in index]
    if unmatched:
        if not strict:
            return ClassMapping(labels=own.labels, names=own.names, by_name=False,
                                note=f"{default_note}; the model's class names ({_few(model, 4)}) "
                                     f"do not match {what} ({_few(source, 4)})")
        if not matched:
            raise DataError(f"none of {what} ({_few(unmatched)}) match the model's class names "
                            f"({_few(model)}), even ignoring case and punctuation; {unmatched_fix}")
        raise DataError(f"{len(unmatched)} of {what} ({_few(unmatched)}) match none of the model's class "
                        f"names ({_few(model)}), while {_few(matched, 3)} do; {unmatched_fix}")
    labels = tuple(index[k] for k in keys)
    seen: dict[int, str] = {}
    for s, label in zip(source, labels):
        if label in seen:
            raise DataError(f"{what}: {seen[label]!r} and {s!r} both match the model's class "
                            f"{model[label]!r}; keep one of them")
        seen[label] = s
    missing = len(model) - len(source)
    note = (f"{len(source)} {noun} matched to the model's class names "
            "(case and punctuation ignored): labels are the model's class indices")
    if labels != tuple(range(len(source))):
        note += " (not the sorted order)"
    if missing:
        note += f"; {missing} of the model's {len(model)} classes have no images"
    return ClassMapping(labels=labels, names=tuple(model), note=note, by_name=True)

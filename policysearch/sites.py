"""Sites and the methods each kind may use (torch-free and below policies and spaces: strategies,
policies and spaces import this)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import policysearch.methods as _catalogue

__all__ = ["KIND_METHODS", "KINDS", "Site", "check_method"]


class _KindMethods(Mapping[str, tuple[str, ...]]):
    """``{kind: (method, ...)}``, a read-only view of the method catalogue (``policysearch.methods``)."""

    def __getitem__(self, kind: str) -> tuple[str, ...]:
        if kind not in KINDS:
            raise KeyError(kind)
        return tuple(_catalogue.methods(kind))

    def __iter__(self) -> Iterator[str]:
        return iter(KINDS)

    def __len__(self) -> int:
        return len(KINDS)

    def __repr__(self) -> str:
        return repr(dict(self))


#: The non-linear kinds, in the catalogue's order.
KINDS: tuple[str, ...] = tuple(_catalogue.kinds())
#: The methods per non-linear kind, in the catalogue's order (``fp32`` first); the kernel
#: registry (``policysearch.kernels``) implements exactly these.
KIND_METHODS: Mapping[str, tuple[str, ...]] = _KindMethods()


@dataclass(frozen=True, kw_only=True)
class Site:
    """One non-linear operator of a model: a stable dotted name plus its kind."""

    name: str
    kind: str

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"site name must be a non-empty string, got {self.name!r}")
        if self.kind not in KIND_METHODS:
            raise ValueError(
                f"site {self.name!r}: unknown kind {self.kind!r}; valid kinds: {', '.join(KINDS)}"
            )


def check_method(kind: str, method: str, *, where: str = "") -> None:
    """Raise ``ValueError`` naming the valid methods if ``method`` is not allowed for ``kind``."""
    allowed = KIND_METHODS.get(kind)
    if allowed is None:
        raise ValueError(f"{where}unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if method not in allowed:
        raise ValueError(
            f"{where}method {method!r} is not allowed for {kind}; valid: {', '.join(allowed)}"
        )

"""Sites and the methods each kind may use (torch-free: strategies and policies import this)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KIND_METHODS", "KINDS", "Site", "check_method"]

#: The integer-only methods per non-linear kind, as DESIGN.md's table lists them. The kernel
#: registry (``policysearch.kernels``) implements exactly these; a test checks they agree.
KIND_METHODS: dict[str, tuple[str, ...]] = {
    "softmax": ("fp32", "ibert", "fqvit", "ivit"),
    "gelu": ("fp32", "ibert", "ivit", "relu"),
    "layernorm": ("fp32", "ibert", "fqvit", "ivit"),
}
KINDS: tuple[str, ...] = tuple(KIND_METHODS)


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

"""The catalogue of non-linear methods: every method is declared here once (torch-free data).

Each entry says, for one ``(kind, name)``, what the operator consumes, which output bit widths
its kernel supports, whether it is integer-only, and holds a slot for a measured relative cost.
Everything else reads this one entry: the kernel registry (a kernel registers against an entry;
one for an undeclared method is an error), the search space's allowed lists
(``policysearch.sites.KIND_METHODS``), the policy schema's enums, the precision rules
(``expects``) and the cost profile. Adding a method is one kernel module plus one
:func:`register_method` line below; no list elsewhere needs editing.

``expects`` is what the method's operator is fed (see ``policysearch.models.precision``):

* ``"float"``: the float (dequantized) tensor, unchanged (``fp32``);
* ``"accumulator"``: the int32 accumulator of the preceding matmul / linear (I-BERT);
* ``"requant"``: that accumulator requantized (dyadic) to a symmetric ``bits``-bit activation;
* ``"ptf"``: FQ-ViT's Power-of-Two-Factor quantized residual stream (uint8 asymmetric with
  power-of-two channel factors).

This module imports neither torch nor optuna, nor anything of the package but ``errors``.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from policysearch.errors import ConfigError, UnknownNameError

__all__ = [
    "EXPECTS",
    "MethodSpec",
    "catalogue",
    "get_method",
    "kinds",
    "load_cost_profile",
    "methods",
    "register_method",
    "set_costs",
]

#: The non-linear kinds, in the order sites and listings use.
_KINDS: tuple[str, ...] = ("softmax", "gelu", "layernorm")
#: What an operator may consume.
EXPECTS: tuple[str, ...] = ("float", "accumulator", "requant", "ptf")


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One catalogue entry: a method for one kind of non-linear site."""

    kind: str  # "softmax" | "gelu" | "layernorm"
    name: str  # "fp32" | "ibert" | "fqvit" | "ivit" | "relu"
    expects: str  # what the operator consumes: "float" | "accumulator" | "requant" | "ptf"
    out_bits: tuple[int, ...]  # output bit widths the kernel supports (() = none)
    default_bits: int | None
    integer_only: bool
    summary: str = ""
    cost: float | None = None  # a measured relative cost (filled later from a latency profile)

    def __post_init__(self) -> None:
        where = f"method {self.kind}/{self.name}"
        if self.kind not in _KINDS:
            raise ValueError(f"{where}: unknown kind {self.kind!r}; valid kinds: {', '.join(_KINDS)}")
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"{where}: the name must be an identifier, got {self.name!r}")
        if self.expects not in EXPECTS:
            raise ValueError(f"{where}: expects={self.expects!r}; valid: {', '.join(EXPECTS)}")
        object.__setattr__(self, "out_bits", tuple(self.out_bits))
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.out_bits):
            raise ValueError(f"{where}: out_bits must be positive integers, got {self.out_bits!r}")
        if self.default_bits is None:
            if self.out_bits:
                raise ValueError(f"{where}: a method with out_bits {self.out_bits} needs default_bits")
        elif self.default_bits not in self.out_bits:
            raise ValueError(f"{where}: default_bits={self.default_bits} is not one of out_bits {self.out_bits}")
        if self.expects == "float" and self.integer_only:
            raise ValueError(f"{where}: a method that consumes floats cannot be integer-only")

    @property
    def key(self) -> str:
        """``"kind/name"``, the kernel registry's key."""
        return f"{self.kind}/{self.name}"


_CATALOGUE: dict[str, dict[str, MethodSpec]] = {k: {} for k in _KINDS}
#: the entries as registered (cost None): clearing a cost puts this very object back
_REGISTERED: dict[tuple[str, str], MethodSpec] = {}


def register_method(kind: str, name: str, *, expects: str, out_bits: tuple[int, ...] = (),
                    default_bits: int | None = None, integer_only: bool = True,
                    summary: str = "") -> MethodSpec:
    """Declare a method; its position in :func:`methods` is its registration order."""
    spec = MethodSpec(kind=kind, name=name, expects=expects, out_bits=tuple(out_bits),
                      default_bits=default_bits, integer_only=integer_only, summary=summary)
    if name in _CATALOGUE[kind]:
        raise ValueError(f"method {kind}/{name} is already in the catalogue")
    _CATALOGUE[kind][name] = spec
    _REGISTERED[(kind, name)] = spec
    return spec


def kinds() -> list[str]:
    """The non-linear kinds: softmax, gelu, layernorm."""
    return list(_KINDS)


def _kind(kind: str) -> dict[str, MethodSpec]:
    try:
        return _CATALOGUE[kind]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown kind {kind!r}; valid: {', '.join(_KINDS)}") from None


def methods(kind: str) -> list[str]:
    """The method names for ``kind``, in registration order (``fp32`` first)."""
    return list(_kind(kind))


def get_method(kind: str, name: str) -> MethodSpec:
    """The catalogue entry of ``kind``/``name``; unknown ones list the valid names."""
    entries = _kind(kind)
    try:
        return entries[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown {kind} method {name!r}; valid: {', '.join(entries)}") from None


def catalogue() -> list[MethodSpec]:
    """Every entry, kind by kind, each kind in registration order."""
    return [spec for kind in _KINDS for spec in _CATALOGUE[kind].values()]


def set_costs(costs: Mapping[tuple[str, str], float | None]) -> list[MethodSpec]:
    """Fill the ``cost`` slot of the entries ``(kind, name)`` (``None`` clears it); returns them.

    Entries are frozen: an entry with a cost is the registered one rebuilt with
    ``dataclasses.replace``, so read costs through :func:`get_method` / :func:`catalogue`, not from
    an entry object kept from before (the kernel registry keeps the registered object). Clearing a
    cost puts the registered object itself back. Every key is checked before any entry changes; a
    cost must be a positive finite number.
    """
    checked = []
    for (kind, name), cost in costs.items():
        spec = get_method(kind, name)
        if cost is not None:
            if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not (0 < cost < float("inf")):
                raise ConfigError(f"cost of {kind}/{name} must be a positive finite number, got {cost!r}")
            cost = float(cost)
        checked.append((spec, cost))
    updated = []
    for spec, cost in checked:
        registered = _REGISTERED[(spec.kind, spec.name)]
        new = spec if spec.cost == cost else registered if cost is None else dataclasses.replace(registered, cost=cost)
        _CATALOGUE[spec.kind][spec.name] = new
        updated.append(new)
    return updated


def load_cost_profile(path: str | Path) -> dict[tuple[str, str], float]:
    """Read a cost profile (``policysearch profile``, ``policysearch.profile/v1``) into the cost slots.

    The profile's ``methods`` section holds, per kind, each method's latency relative to ``fp32``
    summed over the profiled model's sites; methods the catalogue does not know are skipped (a
    profile from another version), and the mapping set is returned.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the cost profile {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != "policysearch.profile/v1" or \
            not isinstance(doc.get("methods"), dict):
        raise ConfigError(f"{path} is not a policysearch.profile/v1 cost profile (run `policysearch profile`)")
    costs = {(kind, name): cost for kind, per in doc["methods"].items() if kind in _CATALOGUE
             and isinstance(per, dict) for name, cost in per.items() if name in _CATALOGUE[kind]}
    set_costs(costs)
    return costs


# ---- the catalogue -------------------------------------------------------------------------------
# expects: as policysearch.models.precision wires each method (the official references' inputs).
register_method("softmax", "fp32", expects="float", integer_only=False,
                summary="float softmax (the reference)")
register_method("softmax", "ibert", expects="accumulator", out_bits=(8, 16), default_bits=8,
                summary="I-BERT: i-exp, 2nd-order polynomial, on the q·kᵀ accumulator")
register_method("softmax", "fqvit", expects="requant", out_bits=(4,), default_bits=4,
                summary="FQ-ViT Log-Int-Softmax: i-exp, 4-bit log2 output")
register_method("softmax", "ivit", expects="requant", out_bits=(8, 16), default_bits=8,
                summary="I-ViT Shiftmax: exp by bit shifts")

register_method("gelu", "fp32", expects="float", integer_only=False,
                summary="float GELU (the reference; FQ-ViT keeps it)")
register_method("gelu", "ibert", expects="accumulator",
                summary="I-BERT i-GELU: erf polynomial, on the fc1 accumulator")
register_method("gelu", "ivit", expects="requant", out_bits=(8,), default_bits=8,
                summary="I-ViT ShiftGELU: x·σ(1.702x) by bit shifts")
register_method("gelu", "relu", expects="requant",
                summary="ReLU in place of GELU (GELU-less Swin); recover accuracy by distillation")

register_method("layernorm", "fp32", expects="float", integer_only=False,
                summary="float LayerNorm (the reference)")
register_method("layernorm", "ibert", expects="requant",
                summary="I-BERT: integer std (float sqrt as the official code), 22-bit input")
register_method("layernorm", "fqvit", expects="ptf",
                summary="FQ-ViT Power-of-Two-Factor LayerNorm")
register_method("layernorm", "ivit", expects="requant",
                summary="I-ViT I-LayerNorm: integer std by shift Newton, 16-bit input")

"""The catalogue of non-linear methods: everything the code knows about a method, declared once.

One :class:`MethodDescriptor` per ``(kind, name)``, registered with :func:`register_method`, is
read by every part of the package (this module is torch-free data; nothing else keeps a list):

* the search space's allowed lists (``policysearch.sites.KIND_METHODS``), its uniform
  baselines (:func:`ordered`) and their fallbacks (:func:`fallback`): so every strategy,
  rule and ``exhaustive`` sees a new method as soon as it is registered;
* the policy schema's enums (``policysearch.schema``) and ``policysearch list methods``;
* the kernel factory (``kernel``, a ``"module:attr"`` string resolved by ``policysearch.kernels``
  on first use), its output bits (``out_bits`` / ``default_bits`` / ``family_out_bits``);
* the precision rules (``expects``, ``native_in_bits``: ``policysearch.models.precision``);
* the ONNX export (``onnx_swaps``), the float model's operator (``replaces_op``);
* the report's colour and order (``colour``, ``order``) and the cost slot (``cost``).

``expects`` is what the method's operator is fed (see ``policysearch.models.precision``):

* ``"float"``: the float (dequantized) tensor, unchanged (``fp32``, the float reference);
* ``"accumulator"``: the int32 accumulator of the preceding matmul / linear (I-BERT);
* ``"requant"``: that accumulator requantized (dyadic) to a symmetric ``bits``-bit activation;
* ``"ptf"``: FQ-ViT's Power-of-Two-Factor quantized residual stream (uint8 asymmetric with
  power-of-two channel factors).

This module imports neither torch nor optuna, nor anything of the package but ``errors``.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policysearch.errors import ConfigError, UnknownNameError

__all__ = [
    "EXPECTS",
    "REPLACEMENT_OPS",
    "MethodDescriptor",
    "catalogue",
    "colour",
    "fallback",
    "get_method",
    "kinds",
    "load_cost_profile",
    "methods",
    "ordered",
    "register_method",
    "set_costs",
    "unregister_method",
]

#: The non-linear kinds, in the order sites and listings use.
_KINDS: tuple[str, ...] = ("softmax", "gelu", "layernorm")
#: What an operator may consume.
EXPECTS: tuple[str, ...] = ("float", "accumulator", "requant", "ptf")
#: The float operators a method may stand for instead of a GELU (``replaces_op``): the float-model
#: machinery (``finetune.relu``, ``deploy.onnx_export.replace_gelu``) swaps ``nn.GELU`` for these.
REPLACEMENT_OPS: tuple[str, ...] = ("relu",)
#: Fields that belong to a method's name, not to one kind: equal in every kind that has the name.
_PER_NAME = ("order", "fallback", "colour")
_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")


@dataclass(frozen=True, kw_only=True)
class MethodDescriptor:
    """One method for one kind of non-linear site: everything the package knows about it."""

    kind: str  # "softmax" | "gelu" | "layernorm"
    name: str  # "fp32" | "ibert" | "fqvit" | "ivit" | "relu" | ...
    expects: str  # what the operator consumes: "float" | "accumulator" | "requant" | "ptf"
    #: display and uniform-baseline order across kinds (lower first; the same for one name)
    order: int
    #: where a uniform policy's method is not allowed at a site, the site takes the allowed
    #: method with the lowest rank (the same for one name)
    fallback: int
    colour: str  # "#rrggbb", the method's colour in every figure (the same for one name)
    #: ``"module:attr"`` of ``factory(*, bits, norm) -> nn.Module`` (None: no kernel yet)
    kernel: str | None = None
    out_bits: tuple[int, ...] = ()  # output bit widths the kernel supports (() = none)
    default_bits: int | None = None
    #: output width per model family where it is not ``default_bits`` (``"*"``: any other family)
    family_out_bits: tuple[tuple[str, int], ...] = ()
    #: the ``native`` wiring's input width when the method fixes one (a ``requant`` LayerNorm)
    native_in_bits: int | None = None
    integer_only: bool = True
    #: the float operator the method stands for instead of the site's own (``"relu"`` for
    #: ReLU-for-GELU): the float model changes there and is recovered by distillation
    replaces_op: str | None = None
    #: ``("module:attr", "module:attr")`` pairs: a function of the kernel that does not trace and
    #: the equal traceable one ``policysearch.deploy.onnx_export`` swaps in while exporting
    onnx_swaps: tuple[tuple[str, str], ...] = ()
    #: whether the kernel has its reference's own QAT graph for ``ste_gradients("reference")``
    #: (I-BERT, I-ViT; FQ-ViT by the same rule); without one (the float operators, ReLU, the
    #: post-training data-aware methods) both STE modes give the float operator's gradient
    reference_ste: bool = True
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
        for field in ("out_bits", "family_out_bits", "onnx_swaps"):
            object.__setattr__(self, field, tuple(tuple(v) if isinstance(v, list) else v
                                                  for v in getattr(self, field)))
        self._check_bits(where)
        self._check_wiring(where)
        for f in ("order", "fallback"):
            if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int):
                raise ValueError(f"{where}: {f} must be an integer rank, got {getattr(self, f)!r}")
        if not isinstance(self.colour, str) or not _COLOUR.match(self.colour):
            raise ValueError(f"{where}: colour must be '#rrggbb', got {self.colour!r}")
        targets = ([self.kernel] if self.kernel is not None else []) + [t for pair in self.onnx_swaps for t in pair]
        bad = [t for t in targets if not isinstance(t, str) or not _TARGET.match(t)]
        if bad or any(len(pair) != 2 for pair in self.onnx_swaps):
            raise ValueError(f"{where}: kernel and onnx_swaps must be 'module.path:attr' strings, got {bad or self.onnx_swaps!r}")

    def _check_bits(self, where: str) -> None:
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.out_bits):
            raise ValueError(f"{where}: out_bits must be positive integers, got {self.out_bits!r}")
        if self.default_bits is None:
            if self.out_bits:
                raise ValueError(f"{where}: a method with out_bits {self.out_bits} needs default_bits")
        elif self.default_bits not in self.out_bits:
            raise ValueError(f"{where}: default_bits={self.default_bits} is not one of out_bits {self.out_bits}")
        bad = [b for _, b in self.family_out_bits if b not in self.out_bits]
        if bad:
            raise ValueError(f"{where}: family_out_bits {bad} not in out_bits {self.out_bits}")

    def _check_wiring(self, where: str) -> None:
        if self.float_reference and self.integer_only:
            raise ValueError(f"{where}: a method that consumes floats cannot be integer-only")
        if self.replaces_op is not None and (self.kind != "gelu" or self.replaces_op not in REPLACEMENT_OPS):
            raise ValueError(f"{where}: replaces_op={self.replaces_op!r}; a gelu method may stand for one of "
                             f"{', '.join(REPLACEMENT_OPS)}")
        needs_in_bits = self.kind == "layernorm" and self.expects == "requant"
        if needs_in_bits != (self.native_in_bits is not None):
            raise ValueError(f"{where}: native_in_bits is needed exactly by a 'requant' layernorm method "
                             f"(its reference's input width), got {self.native_in_bits!r}")

    @property
    def key(self) -> str:
        """``"kind/name"``."""
        return f"{self.kind}/{self.name}"

    @property
    def float_reference(self) -> bool:
        """The float operator itself (no quantization at the site, no input bit options)."""
        return self.expects == "float"

    def output_bits(self, family: str) -> int | None:
        """The kernel's output width in a model of ``family`` (None: the kernel has none)."""
        table = dict(self.family_out_bits)
        return table.get(family, table.get("*", self.default_bits))


_CATALOGUE: dict[str, dict[str, MethodDescriptor]] = {k: {} for k in _KINDS}
#: the entries as registered (cost None): clearing a cost puts this very object back
_REGISTERED: dict[tuple[str, str], MethodDescriptor] = {}


def register_method(kind: str, name: str, **fields: Any) -> MethodDescriptor:
    """Declare a method (``fields``: :class:`MethodDescriptor`'s); its position in :func:`methods`
    is its registration order. ``order``, ``fallback`` and ``colour`` must equal those of the
    same name in other kinds."""
    desc = MethodDescriptor(kind=kind, name=name, **fields)
    if name in _CATALOGUE[kind]:
        raise ValueError(f"method {kind}/{name} is already in the catalogue")
    for other in catalogue():
        differ = [f for f in _PER_NAME if other.name == name and getattr(other, f) != getattr(desc, f)]
        if differ:
            raise ValueError(f"method {kind}/{name}: {', '.join(differ)} differ from {other.key}'s "
                             "(one name has one order, fallback rank and colour)")
    _CATALOGUE[kind][name] = desc
    _REGISTERED[(kind, name)] = desc
    return desc


def unregister_method(kind: str, name: str) -> None:
    """Remove ``kind``/``name`` from the catalogue (for tests that register a temporary method)."""
    get_method(kind, name)
    del _CATALOGUE[kind][name]
    del _REGISTERED[(kind, name)]


def kinds() -> list[str]:
    """The non-linear kinds: softmax, gelu, layernorm."""
    return list(_KINDS)


def _kind(kind: str) -> dict[str, MethodDescriptor]:
    try:
        return _CATALOGUE[kind]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown kind {kind!r}; valid: {', '.join(_KINDS)}") from None


def methods(kind: str) -> list[str]:
    """The method names for ``kind``, in registration order (``fp32`` first)."""
    return list(_kind(kind))


def get_method(kind: str, name: str) -> MethodDescriptor:
    """The catalogue entry of ``kind``/``name``; unknown ones list the valid names."""
    entries = _kind(kind)
    try:
        return entries[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown {kind} method {name!r}; valid: {', '.join(entries)}") from None


def catalogue() -> list[MethodDescriptor]:
    """Every entry, kind by kind, each kind in registration order."""
    return [desc for kind in _KINDS for desc in _CATALOGUE[kind].values()]


def _ranked(kind: str | None, field: str) -> list[str]:
    entries = _kind(kind).values() if kind is not None else catalogue()
    rank = {d.name: getattr(d, field) for d in entries}
    return sorted(rank, key=lambda n: (rank[n], n))


def ordered(kind: str | None = None) -> list[str]:
    """The method names of ``kind`` (default: of every kind) in display and uniform-baseline order."""
    return _ranked(kind, "order")


def fallback(kind: str | None = None) -> list[str]:
    """The method names of ``kind`` (default: of every kind) by fallback rank, first choice first."""
    return _ranked(kind, "fallback")


def colour(name: str) -> str | None:
    """The figures' colour of the method ``name`` (any kind); None for a name not in the catalogue."""
    return next((d.colour for d in catalogue() if d.name == name), None)


def set_costs(costs: Mapping[tuple[str, str], float | None]) -> list[MethodDescriptor]:
    """Fill the ``cost`` slot of the entries ``(kind, name)`` (``None`` clears it); returns them.

    Entries are frozen: an entry with a cost is the registered one rebuilt with
    ``dataclasses.replace``, so read costs through :func:`get_method` / :func:`catalogue`, not from
    an entry object kept from before. Clearing a cost puts the registered object itself back. Every
    key is checked before any entry changes; a cost must be a positive finite number.
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
# The per-name fields (order, fallback, colour): the paper's baselines first; a uniform policy's
# method missing at a site falls back to I-BERT, then I-ViT (FQ-ViT has no GELU), ...
_IBERT = dict(order=10, fallback=10, colour="#1f77b4")
_FQVIT = dict(order=20, fallback=30, colour="#ff7f0e")
_IVIT = dict(order=30, fallback=20, colour="#2ca02c")
_RELU = dict(order=40, fallback=40, colour="#d62728", reference_ste=False)
_FP32 = dict(order=50, fallback=50, colour="#7f7f7f", expects="float", integer_only=False, reference_ste=False)
_K = "policysearch.kernels."

# expects: as policysearch.models.precision wires each method (the official references' inputs).
register_method("softmax", "fp32", **_FP32, kernel=_K + "reference:softmax",
                summary="float softmax (the reference)")
register_method("softmax", "ibert", **_IBERT, expects="accumulator", kernel=_K + "ibert:softmax",
                out_bits=(8, 16), default_bits=8,
                summary="I-BERT: i-exp, 2nd-order polynomial, on the q·kᵀ accumulator")
register_method("softmax", "fqvit", **_FQVIT, expects="requant", kernel=_K + "fqvit:softmax",
                out_bits=(4,), default_bits=4,
                onnx_swaps=((_K + "fqvit:log_round_power", _K + "fqvit:log_round_power_traceable"),),
                summary="FQ-ViT Log-Int-Softmax: i-exp, 4-bit log2 output")
register_method("softmax", "ivit", **_IVIT, expects="requant", kernel=_K + "ivit:softmax",
                out_bits=(8, 16), default_bits=8, family_out_bits=(("swin", 8), ("*", 16)),
                summary="I-ViT Shiftmax: exp by bit shifts (16-bit output in ViT/DeiT, 8 in Swin, as I-ViT)")

register_method("gelu", "fp32", **_FP32, kernel=_K + "reference:gelu",
                summary="float GELU (the reference; FQ-ViT keeps it)")
register_method("gelu", "ibert", **_IBERT, expects="accumulator", kernel=_K + "ibert:gelu",
                summary="I-BERT i-GELU: erf polynomial, on the fc1 accumulator")
register_method("gelu", "ivit", **_IVIT, expects="requant", kernel=_K + "ivit:gelu",
                out_bits=(8,), default_bits=8,
                summary="I-ViT ShiftGELU: x·σ(1.702x) by bit shifts")
register_method("gelu", "relu", **_RELU, expects="requant", kernel=_K + "relu:gelu", replaces_op="relu",
                summary="ReLU in place of GELU (GELU-less Swin); recover accuracy by distillation")

register_method("layernorm", "fp32", **_FP32, kernel=_K + "reference:layernorm",
                summary="float LayerNorm (the reference)")
register_method("layernorm", "ibert", **_IBERT, expects="requant", kernel=_K + "ibert:layernorm",
                native_in_bits=22,
                summary="I-BERT: integer std (exact integer root), 22-bit input")
register_method("layernorm", "fqvit", **_FQVIT, expects="ptf", kernel=_K + "fqvit:layernorm",
                summary="FQ-ViT Power-of-Two-Factor LayerNorm")
register_method("layernorm", "ivit", **_IVIT, expects="requant", kernel=_K + "ivit:layernorm",
                native_in_bits=16,
                summary="I-ViT I-LayerNorm: integer std by shift Newton, 16-bit input")

# Data-aware methods (IPTQ-ViT, policysearch.kernels.data_aware): constants fitted per site to the
# range the site sees on the calibration images. LayerNorm has none (docs/architecture.md).
_FIT_EXP = dict(order=60, fallback=60, colour="#9467bd", reference_ste=False)
_POLY = dict(order=70, fallback=70, colour="#8c564b", reference_ste=False)
_POLY_FIXED = dict(order=80, fallback=80, colour="#e377c2", reference_ste=False)
register_method("softmax", "fit_exp", **_FIT_EXP, kernel=_K + "data_aware:fit_exp", expects="accumulator", out_bits=(8, 16), default_bits=8,
                summary="I-BERT softmax with the i-exp polynomial fitted to the site's shifted inputs")
register_method("gelu", "poly_gelu", **_POLY, kernel=_K + "data_aware:poly_gelu", expects="requant",
                summary="IPTQ-ViT Data-aware Poly-GELU: 4th-order erf term, (a, b) fitted per site")
register_method("gelu", "poly_gelu_fixed", **_POLY_FIXED, kernel=_K + "data_aware:poly_gelu_fixed",
                expects="requant",
                summary="Poly-GELU with the published pair a = -0.019913, b = -2.698088")

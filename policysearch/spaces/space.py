"""SearchSpace: per site, the choices (method, optional input bits) a search may assign.

A preset (YAML in ``spaces/``, or one of the built-ins below) says which methods each kind may
use, optional input-bit options per kind, and overrides selected by site name::

    name: paper                        # optional, informative (the space is named as resolved)
    description: ...                   # optional
    methods: {softmax: [ibert, fqvit, ivit], gelu: [ibert, ivit], layernorm: [ibert, fqvit, ivit]}
    bits: {softmax: [6, 8]}            # optional: mixed precision on the non-linear inputs
    overrides:                         # optional; applied in order, later rules win
      - {match: "blocks.0.*", methods: [fp32]}                  # fnmatch glob on the site name
      - {regex: 'blocks\\.(1|2)\\.mlp\\..*', methods: [relu]}   # or a regex (re.fullmatch)
      - {match: "*", kind: softmax, bits: [8]}                  # optional kind filter; bits only

A kind missing from ``methods`` may use every method of that kind (``KIND_METHODS``). ``bits``
expands each method except the float reference (``fp32``) into one choice per width (``ivit@6``, ``ivit@8``); without
bits a choice runs at the model-wide ``act_bits``. An override sets the methods and/or bits of
the sites it selects (an override without ``bits`` keeps the kind's bits).

Validation happens once, here: an unknown key or kind, a method not allowed for a kind, a bad
bit width or regex and a site left with no choice are :class:`ConfigError`; a pattern that
matches no site is a logged warning.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import policysearch.methods as _catalogue
from policysearch.errors import ConfigError
from policysearch.policy import BITS_RANGE, Choice, Policy
from policysearch.presets import builtin_presets, resolve_preset
from policysearch.registry import Registry
from policysearch.sites import KIND_METHODS, Site, check_method

__all__ = ["SPACES", "SearchSpace", "list_spaces", "load_space"]

log = logging.getLogger(__name__)

#: Built-in presets: the package's ``presets/spaces/*.yaml`` (``./spaces/<name>.yaml`` wins over them).
SPACES: Registry[dict[str, Any]] = builtin_presets("spaces")

_PRESET_KEYS = {"name", "description", "methods", "bits", "overrides"}
_RULE_KEYS = {"match", "regex", "kind", "methods", "bits"}


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Ordered sites and, per site, the tuple of allowed choices; plus model-wide bit widths."""

    sites: tuple[Site, ...]
    options: tuple[tuple[Choice, ...], ...]
    weight_bits: int = 8
    act_bits: int = 8
    name: str = "custom"
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "options", tuple(tuple(Choice.parse(c) for c in o) for o in self.options))
        _check_space(self)
        object.__setattr__(self, "_index", {s.name: i for i, s in enumerate(self.sites)})

    @classmethod
    def from_preset(cls, data: Mapping[str, Any], sites: Sequence[Site], *, name: str = "custom",
                    weight_bits: int = 8, act_bits: int = 8) -> SearchSpace:
        """Build the space of ``sites`` from a preset mapping (see the module docstring)."""
        where = f"space {name!r}: "
        methods, bits = _kind_tables(data, where)
        per_site = [[list(methods.get(s.kind, KIND_METHODS[s.kind])), bits.get(s.kind)] for s in sites]
        rules = data.get("overrides") or []
        if not isinstance(rules, list):
            raise ConfigError(f"{where}'overrides' must be a list of rules, got {type(rules).__name__}")
        for i, rule in enumerate(rules):
            _apply_rule(rule, i, sites, per_site, where)
        options = tuple(_expand(s.kind, m, b, f"{where}site {s.name!r}: ")
                        for s, (m, b) in zip(sites, per_site))
        return cls(sites=tuple(sites), options=options, weight_bits=weight_bits, act_bits=act_bits, name=name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """The inverse of :meth:`to_dict`."""
        rows = data["sites"]
        return cls(sites=tuple(Site(name=r["name"], kind=r["kind"]) for r in rows),
                   options=tuple(tuple(Choice.parse(c) for c in r["choices"]) for r in rows),
                   weight_bits=data.get("weight_bits", 8), act_bits=data.get("act_bits", 8),
                   name=data.get("name", "custom"))

    # -- queries ---------------------------------------------------------------------------------
    def choices(self, site: str) -> tuple[Choice, ...]:
        """The allowed choices of the site named ``site`` (in preset order)."""
        try:
            return self.options[self._index[site]]
        except KeyError:
            raise ConfigError(f"space {self.name!r} has no site {site!r}") from None

    def contains(self, policy: Policy) -> bool:
        """Whether ``policy`` has exactly these sites and bit widths and only allowed choices."""
        return (policy.sites == self.sites
                and (policy.weight_bits, policy.act_bits) == (self.weight_bits, self.act_bits)
                and all(c in opts for c, opts in zip(policy.choices, self.options)))

    def size(self) -> int:
        """The number of distinct policies (product of the per-site choice counts)."""
        return math.prod(len(o) for o in self.options)

    def policy(self, choices: Sequence[Choice | str]) -> Policy:
        """A policy over this space's sites and bit widths (choices are not checked: see contains)."""
        return Policy(sites=self.sites, choices=tuple(Choice.parse(c) for c in choices),
                      weight_bits=self.weight_bits, act_bits=self.act_bits)

    def methods(self) -> list[str]:
        """The methods that appear anywhere in the space, in the catalogue's order
        (``policysearch.methods.ordered``: the paper's baselines first)."""
        present = {c.method for opts in self.options for c in opts}
        return [m for m in _catalogue.ordered() if m in present]

    def uniform_policies(self) -> dict[str, Policy]:
        """``{method: policy}``: each method of the space at every site that allows it.

        Deterministic fallbacks: a site that does not allow the method takes the first method it
        allows by the catalogue's fallback rank (``policysearch.methods.fallback``: ibert, ivit,
        fqvit, relu, fp32, then any method registered later by its rank), so the uniform ``fqvit``
        policy runs I-BERT GELU where allowed (FQ-ViT has no GELU), else I-ViT GELU. Among a
        method's bit options the one at the model-wide ``act_bits`` (or without bits) is taken,
        else the widest.
        """
        return {m: self.policy([self._uniform_choice(opts, m) for opts in self.options]) for m in self.methods()}

    def _uniform_choice(self, opts: tuple[Choice, ...], method: str) -> Choice:
        for m in (method, *_catalogue.fallback()):
            same = [c for c in opts if c.method == m]
            if same:
                exact = [c for c in same if c.bits in (None, self.act_bits)]
                return exact[0] if exact else max(same, key=lambda c: c.bits or 0)
        return opts[0]  # unreachable: every method has a fallback rank

    def to_dict(self) -> dict[str, Any]:
        """Plain (YAML/JSON-safe) description: name, bits, size and per-site choices."""
        return {"name": self.name, "weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "size": self.size(),
                "sites": [{"name": s.name, "kind": s.kind, "choices": [str(c) for c in o]}
                          for s, o in zip(self.sites, self.options)]}


# -- validation and building --------------------------------------------------------------------
def _check_space(space: SearchSpace) -> None:
    where = f"space {space.name!r}: "
    if not space.sites:
        raise ConfigError(f"{where}no sites")
    if len(space.sites) != len(space.options):
        raise ConfigError(f"{where}{len(space.sites)} sites but {len(space.options)} tuples of choices")
    names = [s.name for s in space.sites]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}duplicate site name(s): {', '.join(dup)}")
    for b, what in ((space.weight_bits, "weight_bits"), (space.act_bits, "act_bits")):
        _check_width(b, f"{where}{what}")
    empty = [s.name for s, o in zip(space.sites, space.options) if not o]
    if empty:
        raise ConfigError(f"{where}site(s) left with no choice: {', '.join(empty[:5])}"
                          + (f" and {len(empty) - 5} more" if len(empty) > 5 else ""))
    for s, opts in zip(space.sites, space.options):
        for c in opts:
            _check(lambda s=s, c=c: check_method(s.kind, c.method, where=f"{where}site {s.name!r}: "))


def _check(fn: Callable[[], None]) -> None:
    try:
        fn()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _check_width(bits: Any, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS_RANGE:
        raise ConfigError(f"{what} must be an integer in [{BITS_RANGE.start}, {BITS_RANGE.stop - 1}], got {bits!r}")


def _names(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, Sequence):
        raise ConfigError(f"{what} must be a list, got {value!r}")
    return list(value)


def _bits(value: Any, what: str) -> list[int] | None:
    widths = _names(value, what)
    for b in widths:
        _check_width(b, what)
    return sorted(set(widths)) or None


def _kind_tables(data: Any, where: str) -> tuple[dict[str, list[str]], dict[str, list[int] | None]]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}expected a mapping with 'methods: {{kind: [..]}}', got {type(data).__name__}")
    unknown = sorted(map(str, set(data) - _PRESET_KEYS))
    if unknown:
        raise ConfigError(f"{where}unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_PRESET_KEYS))}")
    tables = []
    for key in ("methods", "bits"):
        table = data.get(key) or {}
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}'{key}' must map kinds to lists, got {table!r}")
        for kind in table:
            if kind not in KIND_METHODS:
                raise ConfigError(f"{where}unknown kind {kind!r} in '{key}'; valid kinds: {', '.join(KIND_METHODS)}")
        tables.append(table)
    methods = {k: _names(v, f"{where}methods of {k}") for k, v in tables[0].items()}
    bits = {k: _bits(v, f"{where}bits of {k}") for k, v in tables[1].items()}
    return methods, bits


def _matcher(rule: Mapping[str, Any], where: str) -> tuple[str, Callable[[str], bool]]:
    if ("match" in rule) == ("regex" in rule):
        raise ConfigError(f"{where}needs exactly one of 'match' (glob) or 'regex'")
    if "match" in rule:
        pattern = str(rule["match"])
        return pattern, lambda name: fnmatch.fnmatchcase(name, pattern)
    pattern = str(rule["regex"])
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{where}invalid regex {pattern!r}: {exc}") from None
    return pattern, lambda name: compiled.fullmatch(name) is not None


def _apply_rule(rule: Any, i: int, sites: Sequence[Site], per_site: list[list[Any]], where: str) -> None:
    where = f"{where}override {i}: "
    if not isinstance(rule, Mapping):
        raise ConfigError(f"{where}expected a mapping like {{match: 'blocks.0.*', methods: [fp32]}}")
    unknown = sorted(map(str, set(rule) - _RULE_KEYS))
    if unknown:
        raise ConfigError(f"{where}unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(_RULE_KEYS))}")
    if "methods" not in rule and "bits" not in rule:
        raise ConfigError(f"{where}needs 'methods' and/or 'bits'")
    pattern, hit = _matcher(rule, where)
    kind = rule.get("kind")
    if kind is not None and (not isinstance(kind, str) or kind not in KIND_METHODS):
        raise ConfigError(f"{where}unknown kind {kind!r}; valid kinds: {', '.join(KIND_METHODS)}")
    hits = [j for j, s in enumerate(sites) if hit(s.name) and kind in (None, s.kind)]
    if not hits:
        log.warning("%spattern %r%s matches no site", where, pattern, f" (kind {kind})" if kind else "")
    for j in hits:
        if "methods" in rule:
            per_site[j][0] = _names(rule["methods"], f"{where}methods")
        if "bits" in rule:
            per_site[j][1] = _bits(rule["bits"], f"{where}bits")


def _expand(kind: str, methods: Sequence[Any], bits: Sequence[int] | None, where: str) -> tuple[Choice, ...]:
    out: list[Choice] = []
    for m in methods:
        _check(lambda m=m: check_method(kind, m, where=where))
        if bits and not _catalogue.get_method(kind, m).float_reference:
            out += [Choice(method=m, bits=b) for b in bits]
        else:
            out.append(Choice(method=m))
    return tuple(dict.fromkeys(out))


# -- presets ------------------------------------------------------------------------------------
def list_spaces() -> list[str]:
    """Names of the built-in space presets."""
    return SPACES.names()


def load_space(name_or_path: str, sites: Sequence[Site], *, weight_bits: int = 8, act_bits: int = 8) -> SearchSpace:
    """The space of ``sites`` from a preset.

    Resolution: an explicit existing path (or a ``.yaml`` name), then ``./spaces/<name>.yaml``
    relative to the working directory, then the built-in defaults; an unknown name is a
    :class:`ConfigError` listing the available ones.
    """
    data, name = resolve_preset("spaces", name_or_path, SPACES)
    return SearchSpace.from_preset(data, sites, name=name, weight_bits=weight_bits, act_bits=act_bits)

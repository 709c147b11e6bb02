"""SearchSpace: per site, the choices (method, optional input bits) a search may assign.

Presets (YAML, or the built-ins below) say which methods each kind may use, optional input-bit
options per kind, and overrides selected by site-name pattern (fnmatch; later rules win)::

    name: paper
    methods: {softmax: [ibert, fqvit, ivit], gelu: [ibert, ivit], layernorm: [ibert, fqvit, ivit]}
    bits: {softmax: [6, 8]}            # optional: mixed precision on the non-linear inputs
    overrides:
      - {match: "blocks.0.*", methods: [fp32]}
"""
from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policysearch.errors import ConfigError
from policysearch.policy import Choice, Policy
from policysearch.registry import Registry
from policysearch.spaces.site import KIND_METHODS, Site, check_method

__all__ = ["SPACES", "SearchSpace", "list_spaces", "load_space"]

log = logging.getLogger(__name__)

#: Order in which uniform policies are listed and fallbacks are tried.
METHOD_ORDER = ("ibert", "fqvit", "ivit", "relu", "fp32")

SPACES: Registry[dict[str, Any]] = Registry("space")
SPACES.register("paper", {
    "description": "Kim et al. 2024: softmax and layernorm from ibert/fqvit/ivit, gelu from ibert/ivit",
    "methods": {"softmax": ["ibert", "fqvit", "ivit"], "gelu": ["ibert", "ivit"],
                "layernorm": ["ibert", "fqvit", "ivit"]},
})
SPACES.register("all", {
    "description": "every method of every kind, float included",
    "methods": {k: list(v) for k, v in KIND_METHODS.items()},
})
SPACES.register("gelu_less", {
    "description": "the paper's space with ReLU as the only choice for GELU sites (Tayaranian et al. 2024)",
    "methods": {"softmax": ["ibert", "fqvit", "ivit"], "gelu": ["relu"],
                "layernorm": ["ibert", "fqvit", "ivit"]},
})
SPACES.register("mixed_bits", {
    "description": "the paper's space with 6- or 8-bit inputs at softmax and GELU sites",
    "methods": {"softmax": ["ibert", "fqvit", "ivit"], "gelu": ["ibert", "ivit"],
                "layernorm": ["ibert", "fqvit", "ivit"]},
    "bits": {"softmax": [6, 8], "gelu": [6, 8]},
})


def _choices(kind: str, methods: Sequence[str], bits: Sequence[int] | None, where: str) -> tuple[Choice, ...]:
    out = []
    for m in methods:
        try:
            check_method(kind, m, where=where)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if bits and m != "fp32":
            out += [Choice(method=m, bits=int(b)) for b in bits]
        else:
            out.append(Choice(method=m))
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    sites: tuple[Site, ...]
    options: tuple[tuple[Choice, ...], ...]
    weight_bits: int = 8
    act_bits: int = 8
    name: str = "custom"

    def __post_init__(self) -> None:
        if len(self.sites) != len(self.options):
            raise ConfigError("one tuple of choices per site is required")
        empty = [s.name for s, o in zip(self.sites, self.options) if not o]
        if empty:
            raise ConfigError(f"space {self.name!r} leaves site(s) with no choice: {', '.join(empty[:5])}")
        object.__setattr__(self, "_index", {s.name: i for i, s in enumerate(self.sites)})

    @classmethod
    def from_preset(cls, data: Mapping[str, Any], sites: Sequence[Site], *, name: str = "custom",
                    weight_bits: int = 8, act_bits: int = 8) -> "SearchSpace":
        if not isinstance(data, Mapping) or not isinstance(data.get("methods", {}), Mapping):
            raise ConfigError(f"space {name!r}: expected a mapping with 'methods: {{kind: [..]}}'")
        methods = {k: list(v) for k, v in data.get("methods", {}).items()}
        bits = dict(data.get("bits") or {})
        for kind in list(methods) + list(bits):
            if kind not in KIND_METHODS:
                raise ConfigError(f"space {name!r}: unknown kind {kind!r}; valid: {', '.join(KIND_METHODS)}")
        options = []
        for site in sites:
            opts = _choices(site.kind, methods.get(site.kind, list(KIND_METHODS[site.kind])),
                            bits.get(site.kind), f"space {name!r}: ")
            options.append(opts)
        for i, rule in enumerate(data.get("overrides") or []):
            pattern = rule.get("match") if isinstance(rule, Mapping) else None
            if not pattern or "methods" not in rule:
                raise ConfigError(f"space {name!r}: override {i} needs 'match' and 'methods'")
            hits = [j for j, s in enumerate(sites) if fnmatch.fnmatchcase(s.name, pattern)]
            if not hits:
                log.warning("space %s: override pattern %r matches no site", name, pattern)
            for j in hits:
                options[j] = _choices(sites[j].kind, rule["methods"], rule.get("bits", bits.get(sites[j].kind)),
                                      f"space {name!r}, override {pattern!r}: ")
        return cls(sites=tuple(sites), options=tuple(options), weight_bits=weight_bits,
                   act_bits=act_bits, name=name)

    # -- queries ---------------------------------------------------------------------------------
    def choices(self, site: str) -> tuple[Choice, ...]:
        return self.options[self._index[site]]  # type: ignore[attr-defined]

    def contains(self, policy: Policy) -> bool:
        if [s.name for s in policy.sites] != [s.name for s in self.sites]:
            return False
        if (policy.weight_bits, policy.act_bits) != (self.weight_bits, self.act_bits):
            return False
        return all(c in opts for c, opts in zip(policy.choices, self.options))

    def size(self) -> int:
        return math.prod(len(o) for o in self.options)

    def policy(self, choices: Sequence[Choice]) -> Policy:
        return Policy(sites=self.sites, choices=tuple(choices), weight_bits=self.weight_bits,
                      act_bits=self.act_bits)

    def methods(self) -> list[str]:
        present = {c.method for opts in self.options for c in opts}
        return [m for m in METHOD_ORDER if m in present]

    def uniform_policies(self) -> dict[str, Policy]:
        """One policy per method of the space: that method wherever allowed (its first bits option).

        Where a site does not allow the method (FQ-ViT has no GELU), the site takes its first
        allowed choice in the order ibert, fqvit, ivit, relu, fp32: so the uniform ``fqvit``
        policy runs I-BERT GELU when the space allows it (the paper's FQ-ViT baseline).
        """
        out = {}
        for m in self.methods():
            choices = []
            for opts in self.options:
                same = [c for c in opts if c.method == m]
                if same:
                    choices.append(same[0])
                else:
                    choices.append(min(opts, key=lambda c: METHOD_ORDER.index(c.method)))
            out[m] = self.policy(choices)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "size": self.size(), "sites": {s.name: [str(c) for c in o] for s, o in zip(self.sites, self.options)}}


def list_spaces() -> list[str]:
    return SPACES.names()


def load_space(name_or_path: str, sites: Sequence[Site], *, weight_bits: int = 8, act_bits: int = 8) -> SearchSpace:
    """Resolve a space preset (explicit path, ``./spaces/<name>.yaml``, built-in) for ``sites``."""
    from policysearch.presets import resolve_preset

    data, name = resolve_preset("spaces", name_or_path, SPACES)
    return SearchSpace.from_preset(data, sites, name=name, weight_bits=weight_bits, act_bits=act_bits)

"""Policy: an ordered mapping site -> Choice(method, bits), plus model-wide bit widths.

A :class:`Policy` is immutable and hashable (it keys caches and de-duplicates trials). Its JSON
form (``policysearch.policy/v1``) is validated against ``policysearch/schema/policy.schema.json``
on read and on write; see :func:`write_policy` / :func:`read_policy`.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from policysearch.errors import PolicyError
from policysearch.safeload import check_tree, decode_json, one_line, read_text
from policysearch.sites import KIND_METHODS, Site, check_method

__all__ = [
    "BITS_RANGE",
    "Choice",
    "FORMAT",
    "Policy",
    "PolicyDocument",
    "PolicyError",
    "document_from_json",
    "read_policy",
    "validate_json",
    "write_policy",
]

FORMAT = "policysearch.policy/v1"
#: Allowed bit widths for weights, activations and per-site input overrides.
BITS_RANGE = range(2, 17)


def _check_bits(bits: int, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS_RANGE:
        raise PolicyError(f"{what} must be an integer in [2, 16], got {bits!r}")


@dataclass(frozen=True, kw_only=True)
class Choice:
    """What runs at one site: a method and optionally the site's input bit width.

    ``bits`` overrides the activation bit width of the site's input for methods that take a
    requantized input (see ``policysearch.models.precision``); ``None`` means the model-wide
    ``act_bits``.
    """

    method: str
    bits: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise PolicyError(f"method must be a non-empty string, got {self.method!r}")
        if self.bits is not None:
            _check_bits(self.bits, f"bits of method {self.method!r}")

    def __str__(self) -> str:
        return self.method if self.bits is None else f"{self.method}@{self.bits}"

    @classmethod
    def parse(cls, value: "Choice | str | Mapping[str, Any]") -> "Choice":
        """Accept a Choice, ``"ivit"``, ``"ivit@6"`` or ``{"method": ..., "bits": ...}``."""
        if isinstance(value, Choice):
            return value
        if isinstance(value, str):
            method, _, bits = value.partition("@")
            try:
                return cls(method=method, bits=int(bits) if bits else None)
            except ValueError as exc:
                raise PolicyError(f"cannot parse choice {value!r}: {exc}") from None
        if isinstance(value, Mapping):
            return cls(method=value.get("method", ""), bits=value.get("bits"))
        raise PolicyError(f"cannot interpret {value!r} as a choice")


@dataclass(frozen=True, kw_only=True)
class Policy:
    """Ordered site -> Choice assignment; immutable and hashable."""

    sites: tuple[Site, ...]
    choices: tuple[Choice, ...]
    weight_bits: int = 8
    act_bits: int = 8
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "choices", tuple(Choice.parse(c) for c in self.choices))
        if len(self.sites) != len(self.choices):
            raise PolicyError(f"{len(self.sites)} sites but {len(self.choices)} choices")
        if not self.sites:
            raise PolicyError("a policy needs at least one site")
        _check_bits(self.weight_bits, "weight_bits")
        _check_bits(self.act_bits, "act_bits")
        index: dict[str, int] = {}
        for i, (site, choice) in enumerate(zip(self.sites, self.choices)):
            if site.name in index:
                raise PolicyError(f"site {site.name!r} appears twice")
            index[site.name] = i
            try:
                check_method(site.kind, choice.method, where=f"site {site.name!r}: ")
            except ValueError as exc:
                raise PolicyError(str(exc)) from None
        object.__setattr__(self, "_index", index)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_mapping(
        cls,
        sites: Sequence[Site],
        choices: Mapping[str, "Choice | str"],
        *,
        weight_bits: int = 8,
        act_bits: int = 8,
    ) -> "Policy":
        """Build from ``{site name: choice}``; every site must be assigned, no unknown names."""
        names = {s.name for s in sites}
        unknown = [n for n in choices if n not in names]
        if unknown:
            raise PolicyError(f"unknown site(s) {', '.join(map(repr, unknown))}")
        missing = [s.name for s in sites if s.name not in choices]
        if missing:
            raise PolicyError(f"no choice for site(s) {', '.join(map(repr, missing))}")
        return cls(
            sites=tuple(sites),
            choices=tuple(Choice.parse(choices[s.name]) for s in sites),
            weight_bits=weight_bits,
            act_bits=act_bits,
        )

    @classmethod
    def uniform(
        cls,
        sites: Sequence[Site],
        method: "str | Mapping[str, str]",
        *,
        weight_bits: int = 8,
        act_bits: int = 8,
        fallback: Mapping[str, str] | None = None,
    ) -> "Policy":
        """The same method at every site.

        ``method`` is one name for all kinds, or ``{kind: method}``. Where a method does not exist
        for a kind (FQ-ViT has no GELU), ``fallback[kind]`` is used; without one it is an error.
        """
        per_kind = dict(method) if isinstance(method, Mapping) else {k: method for k in KIND_METHODS}
        fallback = dict(fallback or {})
        choices = []
        for site in sites:
            m = per_kind.get(site.kind)
            if m is None or m not in KIND_METHODS[site.kind]:
                m = fallback.get(site.kind, m)
            if m is None:
                raise PolicyError(f"no method given for kind {site.kind!r}")
            choices.append(Choice(method=m))
        return cls(sites=tuple(sites), choices=tuple(choices), weight_bits=weight_bits, act_bits=act_bits)

    def replace(self, changes: Mapping[str, "Choice | str"] | None = None, **bits: int) -> "Policy":
        """A copy with some site choices (and/or ``weight_bits``/``act_bits``) changed."""
        choices = list(self.choices)
        for name, choice in (changes or {}).items():
            choices[self.index(name)] = Choice.parse(choice)
        return Policy(
            sites=self.sites,
            choices=tuple(choices),
            weight_bits=bits.get("weight_bits", self.weight_bits),
            act_bits=bits.get("act_bits", self.act_bits),
        )

    # -- mapping interface ------------------------------------------------------------------
    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise PolicyError(f"unknown site {name!r}") from None

    def __getitem__(self, name: str) -> Choice:
        return self.choices[self.index(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __iter__(self) -> Iterator[str]:
        return (s.name for s in self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def items(self) -> Iterator[tuple[Site, Choice]]:
        return zip(self.sites, self.choices)

    def method_counts(self) -> dict[str, dict[str, int]]:
        """``{kind: {method: count}}``, like the paper's Table 3."""
        counts: dict[str, dict[str, int]] = {k: {} for k in KIND_METHODS}
        for site, choice in self.items():
            counts[site.kind][choice.method] = counts[site.kind].get(choice.method, 0) + 1
        return {k: v for k, v in counts.items() if v}

    def key(self) -> str:
        """A short stable string key (for caches and trial de-duplication)."""
        body = ";".join(f"{s.name}={c}" for s, c in self.items())
        return f"w{self.weight_bits}a{self.act_bits}|{body}"

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "quantization": {"weight_bits": self.weight_bits, "act_bits": self.act_bits},
            "sites": [
                {"name": s.name, "kind": s.kind, "method": c.method, "bits": c.bits}
                for s, c in self.items()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Policy":
        quant = data.get("quantization", {})
        try:
            sites = tuple(Site(name=e["name"], kind=e["kind"]) for e in data["sites"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PolicyError(f"malformed sites: {exc}") from None
        return cls(
            sites=sites,
            choices=tuple(Choice(method=e["method"], bits=e.get("bits")) for e in data["sites"]),
            weight_bits=quant.get("weight_bits", 8),
            act_bits=quant.get("act_bits", 8),
        )


@dataclass(frozen=True, kw_only=True)
class PolicyDocument:
    """A policy file: the policy plus the model it is for, its metrics and its provenance."""

    policy: Policy
    model: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    #: the integer pipeline the policy was measured in ("paper" | "native"); None = not recorded
    wiring: str | None = None
    #: the integer artifact beside the file (``policysearch.artifact``): file, format, numerics,
    #: sha256, calibration; None = none written
    integer_model: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        body = self.policy.to_dict()
        quantization = dict(body["quantization"])
        if self.wiring is not None:
            quantization["wiring"] = self.wiring
        return {
            "format": FORMAT,
            "model": dict(self.model),
            "quantization": quantization,
            "sites": body["sites"],
            "metrics": dict(self.metrics),
            "provenance": dict(self.provenance),
        } | ({"integer_model": dict(self.integer_model)} if self.integer_model is not None else {})


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    text = resources.files("policysearch.schema").joinpath("policy.schema.json").read_text()
    return json.loads(text)


def validate_json(data: Any, *, source: str = "policy") -> None:
    """Validate a decoded policy document against the schema; raise :class:`PolicyError`."""
    import jsonschema  # deferred: policysearch.policy stays light (CLI, strategies); ~0.1 s to load

    check_tree(data, where=source, error=PolicyError)  # bounded depth: validation and repr recurse
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        message = err.message
        if err.validator == "oneOf" and isinstance(err.instance, dict):
            # one branch per kind: say which methods the site's kind allows instead
            kind, method = err.instance.get("kind"), err.instance.get("method")
            allowed = KIND_METHODS.get(kind, ())
            message = f"method {method!r} is not allowed for {kind}; valid: {', '.join(allowed)}"
        raise PolicyError(one_line(f"{source}: invalid at {where}: {message}"))


def write_policy(path: str | Path, doc: PolicyDocument | Policy, **meta: Any) -> Path:
    """Write a schema-valid policy JSON file; ``meta`` may give model/metrics/provenance."""
    if isinstance(doc, Policy):
        doc = PolicyDocument(policy=doc, **meta)
    try:
        data = _finite(json.loads(json.dumps(doc.to_json(), default=_json_default)))
    except RecursionError:
        raise PolicyError(f"{path}: the policy's metadata is nested too deeply to write") from None
    validate_json(data, source=str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_policy(path: str | Path) -> PolicyDocument:
    """Read and validate a policy JSON file; every problem is one :class:`PolicyError`."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file {str(path)!r} does not exist")
    text = read_text(path, error=PolicyError, what="policy file")
    try:
        data = decode_json(text, where=str(path), error=PolicyError)
    except PolicyError as exc:
        raise PolicyError(f"{exc}; write it with `policysearch export`") from None
    return document_from_json(data, source=str(path))


def document_from_json(data: Any, *, source: str = "policy") -> PolicyDocument:
    """A decoded policy document, validated (schema, then sites and methods)."""
    validate_json(data, source=source)
    try:
        policy = Policy.from_dict(data)
    except PolicyError as exc:
        raise PolicyError(f"{source}: {exc}") from None
    return PolicyDocument(
        policy=policy,
        model=data.get("model", {}),
        metrics=data.get("metrics", {}),
        provenance=data.get("provenance", {}),
        wiring=data.get("quantization", {}).get("wiring"),
        integer_model=data.get("integer_model"),
    )


def _finite(obj: Any) -> Any:
    """Non-finite floats become ``null``: strict JSON for other tools."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} in a policy file")


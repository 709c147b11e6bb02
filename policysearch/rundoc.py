"""The typed run document: ``results/<run>/run.json`` as ``policysearch.run/v2``.

A :class:`RunDocument` is the run's envelope (name, status, times), its :class:`SearchStage` (the
run's root stage: its fields are the document's top-level fields, as in v1) and the later stages
under ``stages``, one keyword-only dataclass per stage. A stage module declares its stage type
with :func:`register_stage`; the document then reads ``stages.<name>`` into that type, and keeps
a stage whose type is not loaded (or unknown) as a :class:`RawStage`, unchanged. Each stage owns
its fields, its reading of the v1 layouts, its fingerprint contribution and what it adds to the
policy JSON.

:func:`RunDocument.from_json` reads every ``policysearch.run/v1`` file too; :meth:`to_json`
always writes v2. Torch-free, and below every stage: it imports only errors, identity and the
registry.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from policysearch.errors import ConfigError
from policysearch.registry import Registry
from policysearch.safeload import decode_json, read_text

__all__ = [
    "RUN_FORMAT",
    "RUN_FORMAT_V1",
    "STAGES",
    "RawStage",
    "RunDocument",
    "SearchStage",
    "Stage",
    "read_run_json",
    "register_stage",
]

RUN_FORMAT = "policysearch.run/v2"
RUN_FORMAT_V1 = "policysearch.run/v1"
READABLE = (RUN_FORMAT_V1, RUN_FORMAT)

S = TypeVar("S", bound="Stage")


@dataclass(kw_only=True)
class Stage:
    """One stage's part of the run document. Subclasses add typed fields and a ``name``; fields
    a stage does not declare (written by a newer version) are kept in ``extra``."""

    name: ClassVar[str] = ""
    updated: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls: type[S], data: Mapping[str, Any], *, where: str | None = None) -> S:
        """The stage from its fields. Read from a file (``where`` names it), a declared field of
        the wrong type is a :class:`ConfigError`."""
        data = cls.upgrade(dict(data))
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        known = {k: v for k, v in data.items() if k in names}
        if where is not None:
            _check_types(cls, known, f"{where}: {cls.name or 'stage'} field")
        return cls(**known, extra={str(k): v for k, v in data.items() if k not in names})

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """An earlier layout of this stage's fields, as the current one (default: unchanged)."""
        return data

    def to_json(self) -> dict[str, Any]:
        """The stage's fields in declaration order (``updated`` last; None left out), then any it
        does not declare."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("extra", "updated") and getattr(self, f.name) is not None}
        return {**out, **self.extra, **({"updated": self.updated} if self.updated is not None else {})}

    #: the order in which stages add to the policy JSON (lower first; keeps its keys' order)
    policy_rank: ClassVar[int] = 0

    def fingerprint(self) -> dict[str, Any]:
        """What this stage adds to the run's fingerprint (default: nothing)."""
        return {}

    def policy_fields(self, *, metrics: dict[str, Any], provenance: dict[str, Any],
                      model: dict[str, Any]) -> None:
        """Add this stage's part of the policy JSON (default: nothing)."""


@dataclass(kw_only=True)
class RawStage(Stage):
    """A stage whose type is not registered in this process: kept as written."""

    def to_json(self) -> dict[str, Any]:
        return {**self.extra, **({"updated": self.updated} if self.updated is not None else {})}


#: stage name -> stage type; the built-in stages load on first use (their modules register them)
STAGES: Registry[type[Stage]] = Registry("run stage")


STAGES.register_lazy("finetune", "policysearch.finetune.record:FinetuneStage")
STAGES.register_lazy("latency", "policysearch.deploy.record:LatencyStage")
STAGES.register_lazy("report", "policysearch.report.record:ReportStage")


def register_stage(cls: type[S]) -> type[S]:
    """Class decorator: ``stages.<cls.name>`` of a run document reads into ``cls``."""
    if not cls.name:
        raise ConfigError(f"stage type {cls.__name__} has no name")
    if not STAGES.is_loaded(cls.name):
        STAGES.register(cls.name, cls)
    return cls


def read_stage(name: str, data: Mapping[str, Any], *, where: str = "run.json") -> Stage:
    """``stages.<name>`` as its registered type, else as a :class:`RawStage`."""
    cls = STAGES.get(name) if name in STAGES else RawStage
    return cls.from_json(data, where=where)


def _conforms(value: Any, tp: Any) -> bool:
    """Whether a decoded JSON value has the declared type (``int`` is not ``bool``; ``float`` takes
    ``int``; containers are checked one declared level deep)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(v, args[1]) for v in value.values())
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _check_types(cls: type, values: Mapping[str, Any], what: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in hints and not _conforms(value, hints[key]):
            shown = str(hints[key]).replace("typing.", "")
            raise ConfigError(f"{what} {key!r} must be {shown}, got {type(value).__name__}; "
                              "the run record is damaged: delete the run folder and run again")


def read_run_json(path: str | Path) -> dict[str, Any]:
    """A ``run.json`` decoded (bounded depth, no duplicate keys; ``NaN`` literals of old files
    allowed) and checked to be a run record; every problem is one :class:`ConfigError`."""
    hint = "delete the run folder and run again"
    text = read_text(path, error=ConfigError, what="run record")
    try:
        data = decode_json(text, where=f"{path}", error=ConfigError, allow_nonfinite=True)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; the run record is damaged: {hint}") from None
    RunDocument.from_json(data, where=str(path))
    return data


@dataclass(kw_only=True)
class SearchStage(Stage):
    """The search: its config, fingerprint, evaluations and answer (the document's top level)."""

    name: ClassVar[str] = "search"
    config: dict[str, Any] | None = None
    fingerprint_fields: dict[str, Any] | None = None
    objective: dict[str, Any] | None = None
    storage: str | None = None
    study: str | None = None
    evaluations: list[dict[str, Any]] | None = None
    float_metrics: dict[str, Any] | None = None
    sites: int | None = None
    baselines: dict[str, Any] | None = None
    answer: dict[str, Any] | None = None
    constraints: dict[str, Any] | None = None
    strategy_report: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    evaluated: int | None = None
    reused: int | None = None
    outputs: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None
    artifacts: str | None = None

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "fingerprint" in data:  # the file's key; a method of the same name returns the contribution
            data["fingerprint_fields"] = data.pop("fingerprint")
        return data

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.pop("updated", None)  # the envelope's
        if "fingerprint_fields" in out:
            out["fingerprint"] = out.pop("fingerprint_fields")
        return {**out, **self.extra}

    def fingerprint(self) -> dict[str, Any]:
        return dict(self.fingerprint_fields or {})


#: the envelope: the run as a whole (every other top-level key is the search stage's)
_ENVELOPE = ("format", "name", "status", "created", "updated", "finished", "resumed", "error", "stages")


@dataclass(kw_only=True)
class RunDocument:
    """``run.json``: the envelope, the search stage and the later stages by name."""

    name: str
    status: str = "running"
    created: str | None = None
    updated: str | None = None
    finished: str | None = None
    resumed: int | None = None
    error: str | None = None
    search: SearchStage = field(default_factory=SearchStage)
    stages: dict[str, Stage] = field(default_factory=dict)

    def stage(self, cls: type[S]) -> S | None:
        """The stage of type ``cls``, or None when the run has not run it."""
        got = self.stages.get(cls.name)
        if got is None or isinstance(got, cls):
            return got
        return cls.from_json(got.to_json())

    def set_stage(self, stage: Stage) -> None:
        self.stages[stage.name] = stage

    def fingerprint(self) -> dict[str, Any]:
        """The run's fingerprint: every stage's contribution."""
        out = self.search.fingerprint()
        for st in self.stages.values():
            out.update(st.fingerprint())
        return out

    def to_json(self) -> dict[str, Any]:
        env = {"format": RUN_FORMAT, "name": self.name, "status": self.status, "created": self.created,
               "updated": self.updated, "finished": self.finished, "resumed": self.resumed, "error": self.error}
        return {**{k: v for k, v in env.items() if v is not None or k in ("format", "name", "status")},
                **self.search.to_json(), "stages": {n: s.to_json() for n, s in self.stages.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, where: str = "run.json") -> RunDocument:
        """A v2 document, or a v1 one read into v2 (its stages upgraded by their types)."""
        if not isinstance(data, Mapping) or data.get("format") not in READABLE:
            raise ConfigError(f"{where} is not a {RUN_FORMAT} (or {RUN_FORMAT_V1}) run record")
        stages = data.get("stages") or {}
        if not isinstance(stages, Mapping) or not all(isinstance(v, Mapping) for v in stages.values()):
            raise ConfigError(f"{where}: 'stages' must map stage names to objects")
        env = {k: data[k] for k in _ENVELOPE if k in data and k not in ("format", "stages")}
        env.setdefault("name", "")
        _check_types(cls, env, f"{where}: field")
        search = SearchStage.from_json({k: v for k, v in data.items() if k not in _ENVELOPE}, where=where)
        return cls(**env, search=search,
                   stages={str(n): read_stage(str(n), s, where=where) for n, s in stages.items()})

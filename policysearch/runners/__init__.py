"""Runners: where evaluations happen. ``capacity``, ``map(spec, policies)`` and ``stream(spec, feed)``
(the contract: :mod:`policysearch.runners.base`).

A runner gets a picklable :class:`~policysearch.spec.EvaluatorSpec`; each worker builds the
evaluator (model, calibration, float references) once and reuses it. Only the driver records.
"""
from __future__ import annotations

import inspect
from typing import Any

from policysearch.errors import ConfigError
from policysearch.presets import builtin_presets, resolve_preset
from policysearch.registry import Registry
from policysearch.runners.base import Runner
from policysearch.runners.local import LocalRunner

__all__ = ["RUNNERS", "LocalRunner", "Runner", "create_runner", "list_runners"]

RUNNERS: Registry[type[Runner]] = Registry("runner")
RUNNERS.register("local", LocalRunner)
#: Imported on first use; without Ray installed, selecting it says which extra to install.
RUNNERS.register_lazy("ray", "policysearch.runners.ray:RayRunner", extra="ray")

#: Built-in presets: the package's ``presets/runners/*.yaml`` (``./runners/<name>.yaml`` wins).
PRESETS: Registry[dict[str, Any]] = builtin_presets("runners")


def create_runner(name: str = "local", **options: Any) -> Runner:
    """A runner from a preset name or YAML path: ``{type: <registered runner>, ...options}``."""
    data, _ = resolve_preset("runners", name, PRESETS)
    data = {k: v for k, v in data.items() if k != "name"}
    kind = data.pop("type", "local")
    if not isinstance(kind, str) or any(not isinstance(k, str) for k in data):  # a hand-edited preset
        raise ConfigError(f"runner preset {name!r}: 'type' must be one of {', '.join(RUNNERS.names())} "
                          f"and every option a name, got type {kind!r}")
    cls = RUNNERS.get(kind)
    merged = {**data, **options}
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(merged) - set(valid))
        if unknown:
            raise ConfigError(f"runner {kind!r} has no option(s) {', '.join(unknown)}; "
                              f"valid: {', '.join(valid) or '(none)'}")
    return cls(**merged)


def list_runners() -> list[str]:
    return RUNNERS.names()

"""Runners: where evaluations happen. ``capacity`` and ``map(spec, policies)``.

A runner gets a picklable :class:`~policysearch.spec.EvaluatorSpec`; each worker builds the
evaluator (model, calibration, float references) once and reuses it. Only the driver records.
"""
from __future__ import annotations

from typing import Any

from policysearch.registry import Registry
from policysearch.runners.base import Runner
from policysearch.runners.local import LocalRunner

__all__ = ["RUNNERS", "LocalRunner", "Runner", "create_runner", "list_runners"]

RUNNERS: Registry[type[Runner]] = Registry("runner")
RUNNERS.register("local", LocalRunner)
#: Imported on first use; without Ray installed, selecting it says which extra to install.
RUNNERS.register_lazy("ray", "policysearch.runners.ray:RayRunner", extra="ray")

#: Built-in presets (``runners/<name>.yaml`` in the working directory wins over these).
PRESETS: Registry[dict[str, Any]] = Registry("runner preset")
PRESETS.register("local", {"type": "local"})
PRESETS.register("ray", {"type": "ray"})


def create_runner(name: str = "local", **options: Any) -> Runner:
    """A runner from a preset name or YAML path: ``{type: <registered runner>, ...options}``."""
    from policysearch.presets import resolve_preset

    data, _ = resolve_preset("runners", name, PRESETS)
    data = {k: v for k, v in data.items() if k != "name"}
    kind = data.pop("type", "local")
    return RUNNERS.get(kind)(**{**data, **options})


def list_runners() -> list[str]:
    return RUNNERS.names()

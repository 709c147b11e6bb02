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


def create_runner(name: str = "local", **options: Any) -> Runner:
    return RUNNERS.get(name)(**options)


def list_runners() -> list[str]:
    return RUNNERS.names()

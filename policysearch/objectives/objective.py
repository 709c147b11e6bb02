"""Objectives: named linear combinations of metrics, one per objective value, with directions.

Presets resolve as: an explicit YAML path, then ``./objectives/<name>.yaml``, then the package's
built-in ``policysearch/presets/objectives/<name>.yaml``. A preset file looks like::

    name: accuracy_kl
    directions: [maximize]
    values:
      - {top1: 1.0, kl: -0.1}
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policysearch.errors import ConfigError
from policysearch.presets import builtin_presets, resolve_preset
from policysearch.registry import Registry

__all__ = ["METRICS", "OBJECTIVES", "Objective", "list_objectives", "load_objective"]

#: Model-level metrics an objective may use (see ``Evaluator.evaluate``).
METRICS = {
    "top1": "top-1 accuracy on the labelled evaluation images",
    "agreement": "top-1 agreement with the float model on the evaluation images",
    "kl": "mean KL(float || quantized) of the output distributions (nats)",
    "logit_sqnr": "ASQNR of the logits against float (dB)",
    "mean_sqnr_diff": "mean over sites of SQNR diff = beta - gamma (dB)",
    "mean_sqnr_drop": "mean over sites of gamma - beta (dB)",
    "mean_beta": "mean over sites of the output ASQNR beta (dB)",
}


@dataclass(frozen=True, kw_only=True)
class Objective:
    name: str
    values: tuple[tuple[tuple[str, float], ...], ...]
    directions: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.values or len(self.values) != len(self.directions):
            raise ConfigError(f"objective {self.name!r}: one direction per value is required")
        for d in self.directions:
            if d not in ("maximize", "minimize"):
                raise ConfigError(f"objective {self.name!r}: direction {d!r} is not maximize/minimize")
        for terms in self.values:
            for metric, weight in terms:
                if not math.isfinite(weight):
                    raise ConfigError(f"objective {self.name!r}: the weight of {metric!r} must be a finite "
                                      f"number, got {weight!r}")
                if metric not in METRICS:
                    raise ConfigError(
                        f"objective {self.name!r}: unknown metric {metric!r}; valid: {', '.join(METRICS)}"
                    )

    def compute(self, metrics: Mapping[str, float]) -> tuple[float, ...]:
        out = []
        for terms in self.values:
            v = sum(w * float(metrics.get(m, math.nan)) for m, w in terms)
            out.append(v)
        return tuple(out)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str | None = None) -> "Objective":
        try:
            values = tuple(tuple((str(k), float(w)) for k, w in v.items()) for v in data["values"])
            directions = tuple(data.get("directions", ["maximize"] * len(values)))
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"objective {name or data.get('name')!r} is malformed: {exc}") from None
        return cls(name=name or str(data.get("name", "custom")), values=values, directions=directions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "directions": list(self.directions),
            "values": [dict(t) for t in self.values],
        }


#: Built-in presets: the package's ``presets/objectives/*.yaml`` (``./objectives/<name>.yaml`` wins).
OBJECTIVES: Registry[dict[str, Any]] = builtin_presets("objectives")


def list_objectives() -> list[str]:
    return OBJECTIVES.names()


def load_objective(name_or_path: str | Objective) -> Objective:
    """Resolve an objective: explicit path, ``./objectives/<name>.yaml``, then built-ins."""
    if isinstance(name_or_path, Objective):
        return name_or_path
    data, name = resolve_preset("objectives", name_or_path, OBJECTIVES)
    return Objective.from_dict(data, name=name)

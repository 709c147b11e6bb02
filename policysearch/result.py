"""What evaluating one policy returns (torch-free: strategies read it, the driver records it)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EvalResult", "SiteMetrics"]


@dataclass(frozen=True, kw_only=True)
class SiteMetrics:
    """ASQNR (dB, paper eq. 10) of a site's input (gamma) and output (beta) against float.

    Stored in the 20·log10 convention of :func:`policysearch.objectives.sqnr.asqnr`; see
    :func:`policysearch.objectives.sqnr.convert_db` for 10·log10 (exactly half).
    """

    gamma: float
    beta: float

    @property
    def diff(self) -> float:
        """Eq. 11 read literally: SQNR diff = beta - gamma."""
        return self.beta - self.gamma

    @property
    def drop(self) -> float:
        """SQNR lost across the site: gamma - beta."""
        return self.gamma - self.beta

    @property
    def absdiff(self) -> float:
        """How much the SQNR changes across the site, either way: |beta - gamma|."""
        return abs(self.beta - self.gamma)

    def to_dict(self) -> dict[str, float]:
        return {"gamma": self.gamma, "beta": self.beta, "diff": self.diff}


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """Objective value(s), model-level metrics and per-site SQNR for one policy.

    ``values`` follow the objective's ``directions``. A failed or non-finite evaluation keeps
    ``error`` set; strategies must treat it as the worst possible result, never crash on it.
    """

    values: tuple[float, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    sites: Mapping[str, SiteMetrics] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if self.error is None and not all(math.isfinite(v) for v in self.values):
            object.__setattr__(self, "error", f"non-finite objective value(s) {self.values}")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def value(self) -> float:
        return self.values[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": list(self.values),
            "metrics": dict(self.metrics),
            "sites": {k: v.to_dict() for k, v in self.sites.items()},
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalResult":
        return cls(
            values=tuple(data["values"]),
            metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
            sites={
                k: SiteMetrics(gamma=float(v["gamma"]), beta=float(v["beta"]))
                for k, v in data.get("sites", {}).items()
            },
            error=data.get("error"),
        )

    @classmethod
    def failed(cls, n_values: int, error: str) -> "EvalResult":
        return cls(values=(math.nan,) * n_values, error=error)

"""The latency stage's part of the run document (``stages.latency``; torch- and onnx-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from policysearch.rundoc import Stage, register_stage

__all__ = ["LatencyStage"]


@register_stage
@dataclass(kw_only=True)
class LatencyStage(Stage):
    """The short form of ``latency.json``: runtime, weights, medians, ratios and top-1 per model."""

    name: ClassVar[str] = "latency"
    file: str | None = None
    provider: str | None = None
    threads: int | None = None
    int8: str | None = None
    weights: str | None = None
    relu_weights: str | None = None
    median_ms: dict[str, Any] | None = None
    ratios: dict[str, Any] | None = None
    top1: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """The stage's fields without the time it was written (the policy JSON's ``metrics.latency``)."""
        return {k: v for k, v in self.to_json().items() if k != "updated"}

    def policy_fields(self, *, metrics: dict[str, Any], provenance: dict[str, Any],
                      model: dict[str, Any]) -> None:
        if isinstance(metrics.get("latency"), (int, float)):  # the profile's prediction keeps its own key
            metrics["profiled_latency"] = metrics["latency"]
        metrics["latency"] = self.summary()

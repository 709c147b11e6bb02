"""The training stage's part of the run document, and what it adds to a policy JSON (torch-free:
``export`` reads it)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from policysearch.rundoc import Stage, register_stage

__all__ = ["FinetuneStage", "finetune_metrics", "finetune_provenance"]

_METRIC_KEYS = ("top1", "kl", "agreement")


@register_stage
@dataclass(kw_only=True)
class FinetuneStage(Stage):
    """``stages.finetune`` (and a standalone job's ``finetune.json``): settings, weights, and the
    policy's metrics before and after training."""

    name: ClassVar[str] = "finetune"
    policy_rank: ClassVar[int] = 1
    format: str | None = None
    model: str | None = None
    wiring: str | None = None
    data: str | None = None
    eval_size: int | None = None
    calib_size: int | None = None
    eval_images: int | None = None
    weights: str | None = None
    relu_float: str | None = None
    #: the weights the int8 latency stage measures: the float ReLU model where GELU-less, else ``weights``
    checkpoint: str | None = None
    float_top1: float | None = None
    relu_float_top1: float | None = None
    top1_before: float | None = None
    top1_after: float | None = None
    before: dict[str, Any] | None = None
    #: the policy's metrics on the fine-tuned weights (``top1``, ``kl``, ..., ``sites``)
    after: dict[str, Any] | None = None
    trained_ranges: Any = None
    settings: dict[str, Any] | None = None
    relu_sites: list[str] | None = None
    relu_stages: list[dict[str, Any]] | None = None
    qat: dict[str, Any] | None = None
    device: str | None = None
    seconds: float | None = None
    finished: str | None = None
    machine: dict[str, Any] | None = None

    @classmethod
    def upgrade(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Earlier layouts kept the trained metrics as ``metrics_after`` / ``after_training`` /
        ``metrics`` dicts, as ``<metric>_after`` keys, or flat: read them as ``after``."""
        if _metrics_dict(data.get("after")):
            return data
        for key in ("metrics_after", "after_training", "metrics"):
            if _metrics_dict(data.get(key)):
                return {**data, "after": dict(data[key])}
        flat = {k[: -len("_after")]: v for k, v in data.items() if k.endswith("_after")}
        if flat:
            return {**data, "after": flat}
        if any(k in data for k in _METRIC_KEYS):
            return {**data, "after": {k: v for k, v in data.items() if k in (*_METRIC_KEYS, "sites")}}
        return data

    def after_sites(self) -> dict[str, Any]:
        """Per-site metrics after training (``{site: {gamma, beta, ...}}``)."""
        return dict((self.after or {}).get("sites") or self.extra.get("sites") or {})

    def policy_fields(self, *, metrics: dict[str, Any], provenance: dict[str, Any],
                      model: dict[str, Any]) -> None:
        record = self.to_json()
        metrics["finetune"] = finetune_metrics(record)
        provenance["finetune"] = finetune_provenance(record)
        model["finetuned"] = self.weights
        if self.relu_float:
            model["relu_float"] = self.relu_float


def _metrics_dict(d: Any) -> bool:
    return isinstance(d, Mapping) and any(k in d for k in _METRIC_KEYS)


def finetune_metrics(stage: Mapping[str, Any]) -> dict[str, Any]:
    """The policy JSON's ``metrics.finetune``: accuracy before and after (no per-site detail)."""
    def brief(m: Mapping[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (m or {}).items() if k != "sites"}

    return {"before": brief(stage.get("before")), "after": brief(stage.get("after")),
            "float_top1": stage.get("float_top1"), "relu_float_top1": stage.get("relu_float_top1"),
            "trained_ranges": stage.get("trained_ranges"), "eval_images": stage.get("eval_images")}


def finetune_provenance(stage: Mapping[str, Any]) -> dict[str, Any]:
    """The policy JSON's ``provenance.finetune``: the training settings and what they ran on."""
    return {"settings": stage.get("settings"), "data": stage.get("data"), "eval_size": stage.get("eval_size"),
            "calib_size": stage.get("calib_size"), "wiring": stage.get("wiring"),
            "relu_stages": [{k: r.get(k) for k in ("stage", "relu", "teacher", "steps")}
                            for r in stage.get("relu_stages") or []],
            "qat_steps": (stage.get("qat") or {}).get("steps"), "device": stage.get("device"),
            "seconds": stage.get("seconds"), "finished": stage.get("finished")}

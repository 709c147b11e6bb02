"""What the training stage adds to a policy JSON (torch-free: ``export`` reads it)."""
from __future__ import annotations

from typing import Any

__all__ = ["finetune_metrics", "finetune_provenance"]


def finetune_metrics(stage: dict[str, Any]) -> dict[str, Any]:
    """The policy JSON's ``metrics.finetune``: accuracy before and after (no per-site detail)."""
    def brief(m: dict[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (m or {}).items() if k != "sites"}

    return {"before": brief(stage.get("before")), "after": brief(stage.get("after")),
            "float_top1": stage.get("float_top1"), "relu_float_top1": stage.get("relu_float_top1"),
            "trained_ranges": stage.get("trained_ranges"), "eval_images": stage.get("eval_images")}


def finetune_provenance(stage: dict[str, Any]) -> dict[str, Any]:
    """The policy JSON's ``provenance.finetune``: the training settings and what they ran on."""
    return {"settings": stage.get("settings"), "data": stage.get("data"), "eval_size": stage.get("eval_size"),
            "calib_size": stage.get("calib_size"), "wiring": stage.get("wiring"),
            "relu_stages": [{k: r.get(k) for k in ("stage", "relu", "teacher", "steps")}
                            for r in stage.get("relu_stages") or []],
            "qat_steps": (stage.get("qat") or {}).get("steps"), "device": stage.get("device"),
            "seconds": stage.get("seconds"), "finished": stage.get("finished")}

"""EvaluatorSpec: the picklable recipe a worker uses to build its evaluator once."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from policysearch.data import load_data
from policysearch.device import resolve_device
from policysearch.identity import data_digest
from policysearch.models.loading import check_compatible, load_model
from policysearch.models.wiring import prepare
from policysearch.models.zoo import weights_identity
from policysearch.objectives import Evaluator, Objective, load_objective
from policysearch.objectives.repair import RepairSettings

if TYPE_CHECKING:
    from policysearch.policy import PolicyDocument
    from policysearch.rundoc import RunDocument

__all__ = ["EvaluatorSpec", "get_evaluator"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EvaluatorSpec:
    model: str = "fmnist_vit"
    checkpoint: str | None = None
    #: architecture overrides for the model: num_classes, img_size, in_chans (None = the model's own)
    model_args: tuple[tuple[str, Any], ...] = ()
    #: "paper" (one integer pipeline for every method) or "native" (each method as its paper wires it)
    wiring: str = "paper"
    data: str = "fmnist-sample"
    objective: str | Mapping[str, Any] = "kl"  # a preset name, or Objective.to_dict()
    device: str = "auto"
    calib_size: int | None = None
    eval_size: int | None = None
    batch_size: int = 256
    sqnr_batch: int = 64
    seed: int = 0
    reuse: bool = True
    progress: bool = False
    #: repair the MLP of a GELU site that chooses ``relu`` (policysearch.objectives.repair); the
    #: disk cache lives in ``repair_cache_dir`` (None: memory only)
    relu_repair: bool = False
    repair_cache_dir: str | None = None
    #: an integer artifact to load instead of calibrating (``policysearch.artifact``; None: calibrate)
    artifact: str | None = None

    @classmethod
    def from_run(cls, doc: RunDocument, **overrides: Any) -> EvaluatorSpec:
        """The spec of the run ``doc`` records (its model, weights, data, selections, objective),
        with ``overrides`` (e.g. ``device``, ``eval_size``) on top."""
        cfg, fp = doc.search.config or {}, doc.search.fingerprint()
        base = {k: cfg[k] for k in ("model", "checkpoint", "wiring", "data", "device", "calib_size", "eval_size",
                                    "batch_size", "seed", "relu_repair") if cfg.get(k) is not None}
        base["model_args"] = tuple(sorted((fp.get("model_args") or {}).items()))
        base["objective"] = doc.search.objective or cfg.get("objective", "kl")
        return cls._with(base, overrides)

    @classmethod
    def from_policy(cls, doc: PolicyDocument, **overrides: Any) -> EvaluatorSpec:
        """The spec a policy file records (its model, weights, architecture, wiring, data, image
        counts and seed: a run's policy JSON names those of its run), with ``overrides`` on top."""
        model, prov = doc.model, doc.provenance
        base = {"model": model.get("name"), "checkpoint": model.get("checkpoint"), "wiring": doc.wiring,
                "data": prov.get("data"), "calib_size": prov.get("calib_size"), "eval_size": prov.get("eval_size")}
        base = {k: v for k, v in base.items() if v is not None}
        base["model_args"] = tuple(sorted((model.get("args") or {}).items()))
        base["seed"] = int(prov.get("seed") or 0)
        return cls._with(base, overrides)

    @classmethod
    def _with(cls, base: dict[str, Any], overrides: Mapping[str, Any]) -> EvaluatorSpec:
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"EvaluatorSpec has no field(s) {', '.join(unknown)}")
        return cls(**{**base, **overrides})

    def key(self) -> str:
        return repr(sorted((k, repr(v)) for k, v in self.__dict__.items()))

    def _repair_settings(self) -> Any:
        if not self.relu_repair:
            return None

        return RepairSettings(cache_dir=self.repair_cache_dir,
                              weights_identity=weights_identity(self.model, self.checkpoint))

    def evaluator(self) -> Any:
        """The process-wide evaluator of this spec, built on first use (:func:`get_evaluator`).

        Runners call this method rather than import this module: listing and creating runners
        stays free of torch, and a worker that unpickles the spec imports what it needs."""
        return get_evaluator(self)

    def build(self) -> Any:
        torch.manual_seed(self.seed)

        model = load_model(self.model, checkpoint=self.checkpoint, **dict(self.model_args))
        prepare(model, wiring=self.wiring)
        data = load_data(self.data, model=model, calib_size=self.calib_size, eval_size=self.eval_size)
        check_compatible(model, data)
        calib_x = data.calib_images()
        eval_x, eval_y = data.eval_tensors()
        objective = (load_objective(self.objective) if isinstance(self.objective, str)
                     else Objective.from_dict(self.objective))
        evaluator = Evaluator(
            model, calib_images=calib_x, eval_images=eval_x, eval_labels=eval_y, objective=objective,
            batch_size=self.batch_size, sqnr_batch=self.sqnr_batch, device=resolve_device(self.device),
            reuse=self.reuse, progress=self.progress, relu_repair=self._repair_settings(), artifact=self.artifact,
        )
        evaluator.data_digest = data_digest(calib_x, eval_x, eval_y)
        return evaluator


_CACHE: dict[str, Any] = {}


def get_evaluator(spec: EvaluatorSpec) -> Any:
    """The process-wide evaluator for ``spec`` (built on first use)."""
    key = spec.key()
    if key not in _CACHE:
        _CACHE.clear()  # one model per process at a time
        _CACHE[key] = spec.build()
    return _CACHE[key]

"""The training stage: QAT with distillation, iterative GELU -> ReLU distillation, ``finetune()``.

* :mod:`~policysearch.finetune.kd`: the distillation loss against a frozen teacher;
* :mod:`~policysearch.finetune.qat`: QAT of a policy's integer model (straight-through gradients,
  running activation ranges);
* :mod:`~policysearch.finetune.relu`: GELU -> ReLU in stages, each distilled from the previous;
* :mod:`~policysearch.finetune.stage`: ``finetune(run | policy, ...)``, the stage behind
  ``policysearch finetune``: outputs, run record, resume;
* :mod:`~policysearch.finetune.record`: what the stage adds to a policy JSON (torch-free).

Training itself is the shared loop :func:`policysearch.train.train` (AdamW, warm-up + cosine,
checkpoint every epoch, bit-exact resume). Names below are imported on first use (PEP 562), so
``policysearch.finetune.record`` loads no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "FinetuneError": "policysearch.finetune.errors",
    "FinetuneStopped": "policysearch.finetune.errors",
    "KDLoss": "policysearch.finetune.kd",
    "agreement": "policysearch.finetune.kd",
    "freeze": "policysearch.finetune.kd",
    "frozen_copy": "policysearch.finetune.kd",
    "kd_loss": "policysearch.finetune.kd",
    "without_dropout": "policysearch.finetune.kd",
    "RANGE_MODES": "policysearch.finetune.qat",
    "build_student": "policysearch.finetune.qat",
    "qat_train": "policysearch.finetune.qat",
    "track_ranges": "policysearch.finetune.qat",
    "ORDERS": "policysearch.finetune.relu",
    "gelu_paths": "policysearch.finetune.relu",
    "relu_distill": "policysearch.finetune.relu",
    "relu_plan": "policysearch.finetune.relu",
    "swap_to_relu": "policysearch.finetune.relu",
    "FinetuneResult": "policysearch.finetune.stage",
    "FinetuneSettings": "policysearch.finetune.stage",
    "finetune": "policysearch.finetune.stage",
    "finetune_metrics": "policysearch.finetune.record",
    "finetune_provenance": "policysearch.finetune.record",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

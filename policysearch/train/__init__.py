"""Training: the shared loop (zoo training, and later QAT and knowledge distillation)."""
from __future__ import annotations

from policysearch.train.trainer import (
    CHECKPOINT_FILE,
    CrossEntropy,
    Schedule,
    TrainError,
    TrainResult,
    optimizer_step,
    param_groups,
    train,
)

__all__ = [
    "CHECKPOINT_FILE",
    "CrossEntropy",
    "Schedule",
    "TrainError",
    "TrainResult",
    "optimizer_step",
    "param_groups",
    "train",
]

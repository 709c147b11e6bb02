"""Knowledge distillation from a frozen teacher: the loss and the teacher's freezing.

``kd_loss(student, teacher, targets, temperature=T, weight=w)`` is
``w * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - w) * CE(student, targets)``
(Hinton et al. 2015; the ``T^2`` keeps the soft term's gradients the same size across
temperatures). With ``w = 1`` (the default) the labels are not used: the student learns to give
what its float model gives, which is what a quantized copy of that model should do.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.train.surgery import freeze, frozen_copy

__all__ = ["KDLoss", "agreement", "freeze", "frozen_copy", "kd_loss", "without_dropout"]


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None, *,
            temperature: float = 1.0, weight: float = 1.0) -> torch.Tensor:
    """The distillation loss of ``student`` logits against ``teacher`` logits (module docstring)."""
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be positive, got {temperature}")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the distillation weight must be in [0, 1], got {weight}")
    t = float(temperature)
    loss = student.new_zeros(())
    if weight > 0:
        soft = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher.detach() / t, dim=-1),
                        log_target=True, reduction="batchmean")
        loss = loss + weight * t * t * soft
    if weight < 1:
        if targets is None:
            raise ValueError("a distillation weight below 1 mixes in cross-entropy: the batches need labels")
        loss = loss + (1.0 - weight) * F.cross_entropy(student, targets)
    return loss


def without_dropout(model: nn.Module) -> int:
    """Switch off dropout and stochastic depth (timm ``DropPath``) in ``model``, in place; returns
    how many layers were on. A student trains deterministically, as its teacher computes: timm's
    Swin defaults to ``drop_path_rate=0.1`` although the zoo's Swin was trained without it, and
    random depth in the student would distil noise (and, in QAT, move the running ranges)."""
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            m.p = 0.0
            changed += 1
        elif type(m).__name__ == "DropPath" and getattr(m, "drop_prob", 0.0) > 0:
            m.drop_prob = 0.0
            changed += 1
    return changed


@torch.no_grad()
def agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Fraction of rows whose arg-max the two sets of logits share."""
    return float((student.argmax(-1) == teacher.argmax(-1)).double().mean())


@dataclass
class KDLoss:
    """The trainer's ``loss_fn(logits, batch)``: the teacher's logits on ``batch[0]`` (no autograd,
    eval mode, checked frozen) and :func:`kd_loss` with ``batch[1]`` as the labels."""

    teacher: nn.Module = field(repr=False)
    temperature: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        freeze(self.teacher)
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                temperature=self.temperature, weight=self.weight)  # validates the settings now

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.teacher.training:
            self.teacher.eval()
        with torch.no_grad():
            return self.teacher(images)

    def __call__(self, logits: torch.Tensor, batch: Sequence[Any]) -> torch.Tensor:
        targets = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return kd_loss(logits, self.teacher_logits(batch[0]), targets,
                       temperature=self.temperature, weight=self.weight)

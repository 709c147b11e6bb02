"""Iterative GELU -> ReLU distillation (Tayaranian et al. 2024, GELU-less Swin), in float.

The GELU sites a policy runs as ``relu`` are switched to ReLU a few at a time. Stage ``k`` starts
from the model of stage ``k - 1``, replaces the GELUs of its blocks by ReLU and is distilled from
the stage ``k - 1`` model (frozen; stage 1 from the original float model), so each stage only has
to absorb a small change and its teacher is already as close as possible to it. The last stage's
float ReLU model is the one the int8 latency stage measures and the one QAT starts from.

Options: ``blocks_per_stage`` (GELU sites switched per stage, default 1) and ``order``:
* ``"forward"`` (default): input side first. A block's GELU is switched while the blocks after it
  still run GELU and can adapt to its change in the same stage; later stages then switch blocks
  whose inputs have already settled. Switching the output side first would change the inputs of
  already-converted blocks again in every later stage.
* ``"backward"``: output side first (the blocks nearest the loss first).

One block per stage is the gentlest schedule (the most stages); ``blocks_per_stage=N`` for N GELU
sites switches them all at once (a single stage, plain distillation).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from policysearch.finetune.errors import FinetuneStopped
from policysearch.finetune.kd import KDLoss, frozen_copy, without_dropout
from policysearch.train import train
from policysearch.train.surgery import is_gelu, swap_to_relu

__all__ = ["ORDERS", "gelu_paths", "relu_distill", "relu_plan", "swap_to_relu"]

log = logging.getLogger(__name__)

ORDERS = ("forward", "backward")


def gelu_paths(model: nn.Module) -> list[str]:
    """The module paths of ``model``'s GELUs (in the order the forward pass reaches them for timm
    ViT/DeiT/Swin, whose modules are registered in that order)."""
    return [p for p, m in model.named_modules() if is_gelu(m)]


def relu_plan(paths: Sequence[str], *, blocks_per_stage: int = 1, order: str = "forward") -> list[list[str]]:
    """The GELU paths switched at each stage."""
    if order not in ORDERS:
        raise ValueError(f"unknown ReLU order {order!r}; valid: {', '.join(ORDERS)}")
    if blocks_per_stage < 1:
        raise ValueError(f"blocks per stage must be positive, got {blocks_per_stage}")
    ordered = list(paths) if order == "forward" else list(reversed(paths))
    return [ordered[i:i + blocks_per_stage] for i in range(0, len(ordered), blocks_per_stage)]


def relu_distill(model: nn.Module, relu_paths: Sequence[str], loader: Any, *, blocks_per_stage: int = 1,
                 order: str = "forward", temperature: float = 1.0, weight: float = 1.0,
                 checkpoint_root: Path | None = None, on_stage: Callable[[int, dict[str, Any], nn.Module], None] | None = None,
                 stop_after: int | None = None, **train_options: Any) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Distil ``model`` (float, unwired; left unchanged) into a copy whose GELUs at ``relu_paths``
    are ReLU, in stages (module docstring). ``train_options`` go to :func:`policysearch.train.train`
    for every stage (epochs or steps, lr, ...); stage ``k`` checkpoints in ``checkpoint_root /
    f"relu-{k}"`` and resumes from there. ``stop_after``: stop (``FinetuneStopped``) once that many
    steps have run over all stages, as an interruption would. ``on_stage(k, record, model)`` is
    called at the end of each stage. Returns the final float ReLU model and one record per
    stage (its paths, teacher, training history)."""

    plan = relu_plan(relu_paths, blocks_per_stage=blocks_per_stage, order=order)
    teacher = frozen_copy(model)
    student = copy.deepcopy(model)
    without_dropout(student)
    for p in student.parameters():
        p.requires_grad_(True)
    records: list[dict[str, Any]] = []
    budget = stop_after
    for k, chunk in enumerate(plan, start=1):
        swap_to_relu(student, chunk)
        ckpt = checkpoint_root / f"relu-{k}" if checkpoint_root is not None else None
        res = train(student, loader, loss_fn=KDLoss(teacher, temperature=temperature, weight=weight),
                    checkpoint_dir=ckpt, desc=f"relu {k}/{len(plan)}", stop_at_step=budget, **train_options)
        if not res.finished:
            raise FinetuneStopped(f"stopped in ReLU stage {k} at step {res.steps}/{res.total_steps}")
        if budget is not None:
            budget -= res.total_steps
        record = {"stage": k, "relu": list(chunk), "teacher": "float" if k == 1 else f"relu-{k - 1}",
                  **res.info()}
        records.append(record)
        if on_stage is not None:
            on_stage(k, record, student)
        teacher = frozen_copy(student)  # the next stage is taught by this one
    return student.eval(), records

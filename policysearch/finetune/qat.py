"""Quantization-aware training of a policy's integer model, distilled from the float model.

The student is the wired model (``policysearch.prepare``), calibrated and running the policy
(``apply_policy``); the teacher is a frozen float copy. Per step the integer forward runs as in
evaluation (value for value, see below), the loss is :func:`~policysearch.finetune.kd.kd_loss`, and
the gradient passes the integer operators by a straight-through estimator:
* ``ste="reference"`` (default): as I-BERT's and I-ViT's QAT code does it, the integer
  computation's own graph with every floor and round passed straight through
  (``policysearch.kernels._common``); activation quantizers and linear layers pass gradients
  straight through their rounding (``policysearch.quant.ste``), as both references do.
* ``ste="float"``: the kernels' gradient is that of the float operator they replace (smooth).

Activation ranges (``ranges``):
* ``"ema"`` (default): as I-ViT's (and I-BERT's) ``QuantAct`` in training, every activation
  quantizer updates its range from each training batch by an exponential moving average
  (momentum 0.95) *before* quantizing that batch, starting from the calibrated range; in eval mode
  the ranges stay fixed (I-ViT freezes them to validate). FQ-ViT's PTF quantizers track their
  per-tensor and per-channel ranges the same way; their power-of-two factors stay those chosen at
  calibration (FQ-ViT has no training code to follow).
* ``"frozen"``: the calibrated ranges never change.

The observers only update while calibrating (``policysearch.quant``); :func:`track_ranges` adds the
training-time update with forward pre-hooks, for as long as the block runs.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from policysearch.finetune.kd import KDLoss, without_dropout
from policysearch.kernels._common import STE_MODES, ste_gradients
from policysearch.models.loading import load_model
from policysearch.models.site import QuantSite
from policysearch.models.wiring import apply_policy, calibrate, prepare
from policysearch.quant import IntAct, PTFQuant, QuantAct
from policysearch.quant.observers import Observer
from policysearch.train import train

__all__ = ["RANGE_MODES", "build_student", "qat_train", "track_ranges"]

log = logging.getLogger(__name__)

RANGE_MODES = ("ema", "frozen")
#: I-ViT's / I-BERT's ``act_range_momentum``
MOMENTUM = 0.95


@torch.no_grad()
def _ema_update(obs: Any, t: torch.Tensor, momentum: float) -> None:
    """One training-time range update of observer ``obs`` from tensor ``t`` (I-ViT's QuantAct)."""
    t = t.detach().float()
    lo_hi = obs.batch_range(t) if obs.ready and _plain_range(obs) else None
    # a min / max range is NaN or infinite exactly when the tensor has a NaN or an infinity: then
    # (and for other range rules) the whole tensor is checked and cleaned first
    if lo_hi is None or not bool(torch.isfinite(lo_hi[0]) & torch.isfinite(lo_hi[1])):
        if not bool(torch.isfinite(t).all()):
            t = torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)
        lo_hi = None
    if not obs.ready:  # nothing calibrated: the first batch initialises, as in the references
        obs.update(t)
        return
    lo, hi = lo_hi if lo_hi is not None else obs.batch_range(t)
    obs.min_val.mul_(momentum).add_(lo * (1.0 - momentum))
    obs.max_val.mul_(momentum).add_(hi * (1.0 - momentum))
    if obs.per_channel and obs.ch_min.numel() == t.shape[-1]:
        flat = t.reshape(-1, t.shape[-1])
        obs.ch_min.mul_(momentum).add_(flat.amin(0) * (1.0 - momentum))
        obs.ch_max.mul_(momentum).add_(flat.amax(0) * (1.0 - momentum))
        obs.last = t
    obs.version += 1  # derived scales are cached by this counter


def _plain_range(obs: Any) -> bool:
    """Whether the observer's batch range is the plain min / max (``Observer.batch_range``)."""
    return type(obs).batch_range is Observer.batch_range


def _tracks(module: nn.Module) -> bool:
    return (module.training and torch.is_grad_enabled() and not getattr(module, "calibrating", False)
            and getattr(module, "enabled", True) is not False)


@contextlib.contextmanager
def track_ranges(model: nn.Module, *, momentum: float = MOMENTUM) -> Iterator[int]:
    """While the block runs, every activation quantizer of ``model`` in training mode (with autograd
    on) updates its range from its input before quantizing it: ``IntAct`` (the ``paper`` wiring's
    QuantAct, on ``x + identity`` when it adds a residual), ``QuantAct`` and ``PTFQuant``; the
    ``native`` wiring's LayerNorm sites also track their output range (after the site: FQ-ViT's
    LayerNorm writes on that grid). Yields the number of hooks installed."""

    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"the range momentum must be in [0, 1), got {momentum}")

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not _tracks(module):
            return
        x = args[0] if args else kwargs["x"]
        if isinstance(module, IntAct):
            identity = args[2] if len(args) > 2 else kwargs.get("identity")
            if identity is not None:
                x = x + identity
        _ema_update(module.observer, x, momentum)

    def output_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # the native wiring's LayerNorm output range (FQ-ViT's LayerNorm writes on that grid)
        if _tracks(module) and module.choice.method != "fp32":
            _ema_update(module.out_obs, output[0] if isinstance(output, tuple) else output, momentum)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, (IntAct, QuantAct, PTFQuant))]
    handles += [m.register_forward_hook(output_hook) for m in model.modules()
                if isinstance(m, QuantSite) and getattr(m, "out_obs", None) is not None]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def build_student(model_name: str, *, checkpoint: str | None, model_args: dict[str, Any], wiring: str,
                  policy: Any, calib_images: torch.Tensor, device: torch.device, batch_size: int = 256,
                  seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The policy's integer model, loaded, wired, calibrated on ``calib_images`` and running
    ``policy`` as the evaluator builds it, and its float state: the unwired model's state dict
    (its own tensors, which the wired modules share and training updates in place), i.e. the
    weights to save. Dropout and stochastic depth are off (``kd.without_dropout``). One forward
    in eval mode fixes the caches calibration leaves to the first use (PTF factors), so that a
    resumed run sees the same."""

    torch.manual_seed(seed)
    model = load_model(model_name, checkpoint=checkpoint, **model_args)
    float_state = model.state_dict(keep_vars=True)
    without_dropout(model)  # a deterministic student (kd.without_dropout)
    prepare(model, wiring=wiring)
    shared = {id(t) for t in model.state_dict(keep_vars=True).values()}
    lost = [k for k, t in float_state.items() if id(t) not in shared]
    if lost:  # a wiring that copies a weight would train the copy: refuse rather than save stale weights
        raise RuntimeError(f"the {wiring!r} wiring does not share these tensors with the float model: "
                           f"{', '.join(lost[:5])}")
    model.to(device)  # parameters move in place (buffers may not, but no buffer trains)
    calibrate(model, calib_images.to(device).split(batch_size))
    apply_policy(model, policy)
    with torch.no_grad():
        model.eval()(calib_images[:2].to(device))
    return model, float_state


def qat_train(student: nn.Module, loader: Any, *, teacher: nn.Module, ste: str = "reference", ranges: str = "ema",
              momentum: float = MOMENTUM, temperature: float = 1.0, weight: float = 1.0,
              **train_options: Any) -> Any:
    """QAT of ``student`` on ``loader`` with distillation from ``teacher`` (frozen); the other
    options go to :func:`policysearch.train.train` (epochs or steps, lr, checkpoint_dir, ...).
    Returns its ``TrainResult``."""

    if ste not in STE_MODES:
        raise ValueError(f"unknown --ste {ste!r}; valid: {', '.join(STE_MODES)}")
    if ranges not in RANGE_MODES:
        raise ValueError(f"unknown --ranges {ranges!r}; valid: {', '.join(RANGE_MODES)}")
    loss = KDLoss(teacher, temperature=temperature, weight=weight)
    tracking = track_ranges(student, momentum=momentum) if ranges == "ema" else contextlib.nullcontext(0)
    with ste_gradients(ste), tracking as n:
        log.debug("QAT: %d activation quantizers track their ranges", n)
        return train(student, loader, loss_fn=loss, **train_options)

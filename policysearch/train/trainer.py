"""The training loop: AdamW, linear warm-up then cosine (or linear, or constant) decay, per step.

``train(model, loader, epochs=..., lr=...)`` runs it. ``loader`` is any re-iterable of batches
``(inputs, targets, ...)`` with a length (a ``DataLoader``, or the zoo's ``Batches``); each batch
goes to the device, through ``transform`` if given, and ``model(batch[0])``; ``loss_fn(logits,
batch)`` gives the loss (default: cross-entropy on ``batch[1]``), which is how a distillation stage
adds a teacher: ``loss_fn=lambda s, b: kd_loss(s, teacher(b[0]), b[1])``.

With ``checkpoint_dir`` the model, optimizer, schedule, every RNG state (torch CPU and CUDA, numpy,
Python, the loader's own ``generator``) and the step counter are written atomically to
``checkpoint_dir/last.pt`` after every epoch, when ``stop_at_step`` stops the run, and on Ctrl-C
(after the step that was running). ``resume=True`` continues from it, mid-epoch too, so an
interrupted and resumed run ends with the same weights, bit for bit on the same device, as one
that ran straight through. The schedule always spans ``epochs`` (or ``steps``): stopping early
does not change it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from policysearch.errors import PolicySearchError

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

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = "policysearch.train-checkpoint/v1"
SCHEDULES = ("cosine", "linear", "constant")

LossFn = Callable[[torch.Tensor, Sequence[Any]], torch.Tensor]


class TrainError(PolicySearchError, ValueError):
    """Training cannot start or resume as asked; the message names the problem and the fix."""


# ------------------------------------------------------------------------------------- pieces


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embeddings, tokens, relative-position tables
    (1-d parameters and the model's ``no_weight_decay()`` names)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Per-step learning rate: linear warm-up to ``lr`` over ``warmup`` steps, then ``kind`` decay
    to ``min_lr`` at step ``total``."""

    lr: float
    total: int
    warmup: int = 0
    min_lr: float = 0.0
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise TrainError(f"unknown schedule {self.kind!r}; valid: {', '.join(SCHEDULES)}")

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "cosine":
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "linear":
            return self.min_lr + (self.lr - self.min_lr) * (1 - t)
        return self.lr

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CrossEntropy:
    """The default loss: cross-entropy of the logits against ``batch[1]``."""

    label_smoothing: float = 0.0

    def __call__(self, logits: torch.Tensor, batch: Sequence[Any]) -> torch.Tensor:
        return F.cross_entropy(logits, batch[1], label_smoothing=self.label_smoothing)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Sequence[Any], loss_fn: LossFn,
                   grad_clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``batch[0]``, ``loss_fn``, backward, clip, step; returns (loss, logits), detached."""
    logits = model(batch[0])
    loss = loss_fn(logits, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), logits.detach()


@dataclass
class TrainResult:
    """What :func:`train` did: per-epoch records, steps, time; ``finished`` unless stopped early."""

    model: nn.Module
    history: list[dict[str, Any]]
    steps: int
    total_steps: int
    steps_per_epoch: int | None
    wall_seconds: float
    finished: bool
    resumed_from: int | None = None
    checkpoint: Path | None = None

    def info(self) -> dict[str, Any]:
        return {"steps": self.steps, "steps_per_epoch": self.steps_per_epoch,
                "wall_seconds": round(self.wall_seconds, 1), "history": self.history}


# ---------------------------------------------------------------------------------- RNG states


def _loader_generator(loader: Any) -> torch.Generator | None:
    gen = getattr(loader, "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


def _rng_state(loader: Any) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": _to_lists(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    gen = _loader_generator(loader)
    if gen is not None:
        state["loader"] = gen.get_state()
    return state


def _to_lists(obj: Any) -> Any:
    return [_to_lists(v) for v in obj] if isinstance(obj, tuple | list) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(v) for v in obj) if isinstance(obj, list) else obj


def _set_rng_state(state: dict[str, Any], loader: Any) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_to_tuples(state["python"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    gen = _loader_generator(loader)
    if gen is not None and "loader" in state:
        gen.set_state(state["loader"].cpu())


# -------------------------------------------------------------------------------- checkpoints


@dataclass
class _Progress:
    """Where a run stands: saved in, and restored from, the checkpoint."""

    step: int = 0
    epoch: int = 0  # completed epochs
    in_epoch: int = 0  # batches done in the current epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    epoch_seconds: float = 0.0
    wall_seconds: float = 0.0
    epoch_rng: dict[str, Any] | None = None  # RNG at the start of the current epoch


def _save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
          config: dict[str, Any], progress: _Progress, loader: Any, finished: bool) -> None:
    obj = {
        "format": CHECKPOINT_FORMAT, "config": config, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
        "step": progress.step, "epoch": progress.epoch, "in_epoch": progress.in_epoch,
        "history": progress.history, "finished": finished,
        "accum": {"loss_sum": progress.loss_sum, "correct": progress.correct, "seen": progress.seen,
                  "epoch_seconds": progress.epoch_seconds, "wall_seconds": progress.wall_seconds},
        "rng": _rng_state(loader), "epoch_rng": progress.epoch_rng,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path, config: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
          device: torch.device) -> tuple[dict[str, Any], _Progress]:
    fix = f"delete {path} or pass another checkpoint_dir to start over, or resume=False"
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file: say which and how to go on
        raise TrainError(f"training checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]}); {fix}") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path} is not a policysearch training checkpoint; {fix}")
    differ = {k: (obj["config"].get(k), v) for k, v in config.items() if obj["config"].get(k) != v}
    if differ:
        shown = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in differ.items())
        raise TrainError(f"training checkpoint {path} was written by another run: {shown}; {fix}")
    try:
        model.load_state_dict(obj["model"], strict=True)
        optimizer.load_state_dict(obj["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise TrainError(f"training checkpoint {path} does not fit this model or optimizer "
                         f"({str(e)[:200]}); {fix}") from None
    acc = obj["accum"]
    progress = _Progress(step=obj["step"], epoch=obj["epoch"], in_epoch=obj["in_epoch"], history=list(obj["history"]),
                         loss_sum=acc["loss_sum"], correct=acc["correct"], seen=acc["seen"],
                         epoch_seconds=acc["epoch_seconds"], wall_seconds=acc["wall_seconds"],
                         epoch_rng=obj["epoch_rng"])
    return obj, progress


@contextlib.contextmanager
def _deferred_sigint(enabled: bool) -> Iterator[dict[str, bool]]:
    """While active (main thread only), a first Ctrl-C only sets ``flag["stop"]``: the loop saves a
    checkpoint after the running step and then raises KeyboardInterrupt. A second one interrupts."""
    flag = {"stop": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------------ loop


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple | list):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _batch_size(batch: Sequence[Any]) -> int:
    first = batch[0]
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else len(first)


def _hits(logits: torch.Tensor, batch: Sequence[Any]) -> torch.Tensor | None:
    target = batch[1] if len(batch) > 1 else None
    if (isinstance(target, torch.Tensor) and target.ndim == 1 and logits.ndim == 2
            and len(target) == len(logits) and not target.is_floating_point()):
        return (logits.argmax(-1) == target).sum()
    return None


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train(model: nn.Module, loader: Iterable[Any], *, epochs: int | None = None, steps: int | None = None,
          lr: float = 1e-3, min_lr: float = 0.0, weight_decay: float = 0.05, warmup_steps: int | None = None,
          warmup_epochs: float = 0.0, schedule: str = "cosine", grad_clip: float = 0.0,
          label_smoothing: float = 0.0, seed: int | None = 0, device: str | torch.device | None = None,
          loss_fn: LossFn | None = None, transform: Callable[[Any], Any] | None = None,
          optimizer: torch.optim.Optimizer | None = None, progress: bool = True, desc: str = "train",
          checkpoint_dir: str | Path | None = None, resume: bool = True, stop_at_step: int | None = None,
          on_epoch_end: Callable[[dict[str, Any], nn.Module], None] | None = None,
          log_every: int = 50) -> TrainResult:
    """Train ``model`` on ``loader`` for ``epochs`` passes (or ``steps`` optimizer steps).

    Per step: ``lr`` from :class:`Schedule` (warm-up ``warmup_steps``, else ``warmup_epochs`` x the
    loader length), forward, ``loss_fn(logits, batch)`` (default cross-entropy with
    ``label_smoothing``), backward, ``grad_clip`` (max gradient norm, 0: none), step.
    ``optimizer`` defaults to AdamW over :func:`param_groups` (``weight_decay``). ``seed`` seeds
    torch's global RNG before the first step of a fresh run (None: leave it as the caller set it).
    ``on_epoch_end(record, model)`` may add entries to each epoch's record (loss, train_top1,
    lr_end, seconds) before it is logged and checkpointed. ``stop_at_step`` stops after that many
    steps in all, without changing the schedule; ``resume=True`` with the same ``checkpoint_dir``
    continues. Returns a :class:`TrainResult`; the model is left in eval mode.
    """
    if (epochs is None) == (steps is None):
        raise TrainError("give the length of training as exactly one of epochs or steps")
    if (epochs is not None and epochs < 1) or (steps is not None and steps < 1):
        raise TrainError(f"epochs / steps must be positive, got epochs={epochs}, steps={steps}")
    steps_per_epoch = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise TrainError("the training loader yields no batches; give it data (or a smaller batch size)")
    if epochs is not None and steps_per_epoch is None:
        raise TrainError("a loader without a length needs steps=N, not epochs")
    total = epochs * steps_per_epoch if epochs is not None else steps  # type: ignore[operator]
    assert total is not None
    n_epochs = epochs if epochs is not None else (math.ceil(total / steps_per_epoch) if steps_per_epoch else None)
    warmup = warmup_steps if warmup_steps is not None else int(warmup_epochs * (steps_per_epoch or 0))
    sched = Schedule(lr=lr, total=total, warmup=warmup, min_lr=min_lr, kind=schedule)
    dev = _resolve_device(device)
    model.to(dev)
    if optimizer is None:
        optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    loss_fn = loss_fn or CrossEntropy(label_smoothing)
    config = {"total_steps": total, "steps_per_epoch": steps_per_epoch, "schedule": sched.state_dict(),
              "grad_clip": grad_clip, "loss": repr(loss_fn) if isinstance(loss_fn, CrossEntropy) else "custom",
              "optimizer": type(optimizer).__name__}
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None

    state = _Progress()
    resumed_from, resume_rng = None, None
    if ckpt_path is not None and resume and ckpt_path.is_file():
        obj, state = _load(ckpt_path, config, model, optimizer, dev)
        resumed_from, resume_rng = state.step, obj["rng"]
        log.info("%s: resuming from %s at step %d/%d (epoch %d, batch %d)", desc, ckpt_path, state.step, total,
                 state.epoch + 1, state.in_epoch)
        if obj["finished"]:
            _set_rng_state(resume_rng, loader)
            return TrainResult(model=model.eval(), history=state.history, steps=state.step, total_steps=total,
                               steps_per_epoch=steps_per_epoch, wall_seconds=state.wall_seconds, finished=True,
                               resumed_from=resumed_from, checkpoint=ckpt_path)
    elif seed is not None:
        torch.manual_seed(seed)

    def save(finished: bool) -> None:
        if ckpt_path is not None:
            _save(ckpt_path, model, optimizer, sched, config, state, loader, finished)

    stop = min(total, stop_at_step) if stop_at_step is not None else total
    model.train()
    start = time.perf_counter() - state.wall_seconds
    partial: dict[str, Any] | None = None
    with _deferred_sigint(ckpt_path is not None) as flag:
        while state.step < stop and not flag["stop"]:
            if resume_rng is not None and state.in_epoch > 0:
                # resuming mid-epoch: replay the epoch's start, skip the batches already trained on
                _set_rng_state(state.epoch_rng, loader)  # type: ignore[arg-type]
                batches = iter(loader)
                for _ in range(state.in_epoch):
                    next(batches)
                _set_rng_state(resume_rng, loader)
            else:
                if resume_rng is not None:
                    _set_rng_state(resume_rng, loader)
                state.epoch_rng = _rng_state(loader) if ckpt_path is not None else None
                batches = iter(loader)
            resume_rng = None
            epoch = state.epoch + 1
            loss_sum = torch.tensor(state.loss_sum, device=dev)
            correct = torch.tensor(state.correct, device=dev)
            counts_hits = exhausted = False
            t0 = time.perf_counter() - state.epoch_seconds
            left = steps_per_epoch - state.in_epoch if steps_per_epoch else None
            bar = tqdm(batches, total=left, desc=f"{desc} {epoch}/{n_epochs or '?'}", leave=False,
                       disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
            for batch in bar:
                if steps_per_epoch is not None and state.in_epoch >= steps_per_epoch:
                    raise TrainError(f"the training loader yielded more batches in an epoch than its length "
                                     f"{steps_per_epoch}; give it a fixed length")
                for group in optimizer.param_groups:
                    group["lr"] = sched.lr_at(state.step)
                batch = _to_device(batch, dev)
                if transform is not None:
                    batch = transform(batch)
                loss, logits = optimizer_step(model, optimizer, batch, loss_fn, grad_clip)
                n = _batch_size(batch)
                hits = _hits(logits, batch)
                loss_sum = loss_sum + loss * n
                if hits is not None:
                    correct, counts_hits = correct + hits, True
                state.seen += n
                state.step += 1
                state.in_epoch += 1
                if progress and state.step % log_every == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / state.seen:.4f}", refresh=False)
                if state.in_epoch == steps_per_epoch:
                    continue  # let the loader end its epoch: a sampler may draw from its generator then
                if state.step >= stop or flag["stop"]:
                    break
            else:
                exhausted = True
                if state.seen == 0:
                    raise TrainError("the training loader yielded no batches in an epoch; give it data")
                if steps_per_epoch is not None and state.in_epoch != steps_per_epoch:
                    raise TrainError(f"the training loader yielded {state.in_epoch} batches in an epoch but its "
                                     f"length is {steps_per_epoch}; give it a fixed length")
            bar.close()
            state.loss_sum, state.correct = float(loss_sum.item()), int(correct.item())
            state.epoch_seconds = time.perf_counter() - t0
            state.wall_seconds = time.perf_counter() - start
            complete = exhausted or state.step >= total or state.in_epoch == steps_per_epoch
            record: dict[str, Any] = {"epoch": epoch, "loss": round(state.loss_sum / state.seen, 4)}
            if counts_hits:
                record["train_top1"] = round(state.correct / state.seen, 4)
            record["lr_end"] = sched.lr_at(state.step - 1)
            record["seconds"] = round(state.epoch_seconds, 1)
            if not complete:
                record["partial"] = True
            if on_epoch_end is not None:
                on_epoch_end(record, model)
            log.info("%s epoch %d/%s: %s", desc, epoch, n_epochs or "?", record)
            if complete:
                state.history.append(record)
                state.epoch, state.in_epoch, state.epoch_rng = epoch, 0, None
                state.loss_sum, state.correct, state.seen, state.epoch_seconds = 0.0, 0, 0, 0.0
            else:
                partial = record  # returned now; rebuilt from the saved sums when the run resumes
            if ckpt_path is not None:
                _save(ckpt_path, model, optimizer, sched, config, state, loader, finished=state.step >= total)
            if partial is not None:
                break
    finished = state.step >= total
    if flag["stop"] and not finished:
        log.warning("%s: interrupted at step %d/%d; checkpoint %s (run again to resume)", desc, state.step,
                    total, ckpt_path)
        raise KeyboardInterrupt
    if not finished:
        log.info("%s: stopped at step %d of %d%s", desc, state.step, total,
                 f"; resume from {ckpt_path}" if ckpt_path is not None else "")
    history = [*state.history, partial] if partial is not None else list(state.history)
    return TrainResult(model=model.eval(), history=history, steps=state.step, total_steps=total,
                       steps_per_epoch=steps_per_epoch, wall_seconds=time.perf_counter() - start,
                       finished=finished, resumed_from=resumed_from, checkpoint=ckpt_path)

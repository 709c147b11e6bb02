"""Activation range observers (per tensor, optionally per channel on the last dim).

``minmax``: running min/max. ``ema``: exponential moving average of each batch's min/max (momentum
0.95 as in I-BERT / I-ViT's QuantAct; the first batch initialises). ``percentile``: the
``alpha`` / ``1 - alpha`` quantiles of each batch (on a strided sample of at most 2^20 values,
``torch.quantile``'s limit), averaged by EMA as in FQ-ViT's percentile observer.
"""
from __future__ import annotations

import torch
from torch import nn

from policysearch.registry import Registry

__all__ = ["OBSERVERS", "Observer", "create_observer"]

OBSERVERS: Registry[type["Observer"]] = Registry("observer")


class Observer(nn.Module):
    """Tracks ``min_val``/``max_val`` (scalars) and, if ``per_channel``, ``ch_min``/``ch_max``."""

    def __init__(self, *, per_channel: bool = False) -> None:
        super().__init__()
        self.per_channel = per_channel
        self.register_buffer("min_val", torch.tensor(float("nan")))
        self.register_buffer("max_val", torch.tensor(float("nan")))
        self.register_buffer("ch_min", torch.empty(0))
        self.register_buffer("ch_max", torch.empty(0))
        self.last: torch.Tensor | None = None  # last batch, for searches on it (PTF)
        self._ready: bool | None = None  # cached; None = look at the buffers
        #: bumped on every change of the range (update, reset, load): keys caches of derived scales
        self.version = 0

    @property
    def ready(self) -> bool:
        if self._ready is None:
            self._ready = bool(torch.isfinite(self.min_val)) and bool(torch.isfinite(self.max_val))
        return self._ready

    def reset(self) -> None:
        self._ready = None
        self.version += 1
        self.min_val.fill_(float("nan"))
        self.max_val.fill_(float("nan"))
        self.ch_min = torch.empty(0, device=self.min_val.device)
        self.ch_max = torch.empty(0, device=self.min_val.device)
        self.last = None

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = torch.aminmax(x)  # one pass
        return lo, hi

    def merge(self, old: torch.Tensor, new: torch.Tensor, is_min: bool) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        finite = x[torch.isfinite(x)] if not bool(torch.isfinite(x).all()) else x
        if finite.numel() == 0:
            return
        lo, hi = self.batch_range(finite)
        first = not self.ready
        self.min_val.copy_(lo if first else self.merge(self.min_val, lo, True))
        self.max_val.copy_(hi if first else self.merge(self.max_val, hi, False))
        self._ready = None
        self.version += 1
        if self.per_channel:
            flat = torch.nan_to_num(x.reshape(-1, x.shape[-1]))
            cmin, cmax = flat.amin(0), flat.amax(0)
            if self.ch_min.numel() != cmin.numel():
                self.ch_min, self.ch_max = cmin, cmax
            else:
                self.ch_min = self.merge(self.ch_min, cmin, True)
                self.ch_max = self.merge(self.ch_max, cmax, False)
            self.last = x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # per-channel buffers start empty: size them from the checkpoint
        for name in ("ch_min", "ch_max"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        self._ready = None
        self.version += 1
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    def merge(self, old: torch.Tensor, new: torch.Tensor, is_min: bool) -> torch.Tensor:
        return torch.minimum(old, new) if is_min else torch.maximum(old, new)


@OBSERVERS.register("ema")
class EMAObserver(Observer):
    def __init__(self, *, per_channel: bool = False, momentum: float = 0.95) -> None:
        super().__init__(per_channel=per_channel)
        self.momentum = momentum

    def merge(self, old: torch.Tensor, new: torch.Tensor, is_min: bool) -> torch.Tensor:
        return old * self.momentum + new * (1.0 - self.momentum)


@OBSERVERS.register("percentile")
class PercentileObserver(EMAObserver):
    def __init__(
        self, *, per_channel: bool = False, momentum: float = 0.99, alpha: float = 0.99999
    ) -> None:
        super().__init__(per_channel=per_channel, momentum=momentum)
        self.alpha = alpha

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(-1)
        step = max(1, flat.numel() // (1 << 20))
        sample = flat[::step]
        q = torch.quantile(sample, torch.tensor([1 - self.alpha, self.alpha], device=x.device))
        return q[0], q[1]


def create_observer(name: str, *, per_channel: bool = False) -> Observer:
    return OBSERVERS.get(name)(per_channel=per_channel)

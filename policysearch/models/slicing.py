"""Token-wise parts of the ``paper`` wiring run on slices of the batch (issue 24).

An MLP or a ViT attention works on each image (each token, for the MLP) alone, so running it on
a few images at a time gives the same integers as the whole batch, provided nothing inside takes
a statistic of the batch: every quantizer calibrated (a static scale), the site's kernel row-local
(``QuantSite.row_local``), no recorder, no autograd. A slice of about :data:`SLICE_ELEMENTS`
elements of its largest intermediate keeps the many elementwise passes of the integer kernels
and requantizations in the caches instead of streaming each whole tensor through memory. Swin's
window attention is not sliced: its windows are small already, and slicing them measured no gain
(swin_tiny at batch 32, fmnist_swin at 256); LayerNorms are not (I-BERT's overflow shift is a
statistic of the whole tensor).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from policysearch.quant import IntAct, IntLinear

__all__ = ["ATTENTION_SLICE_FACTOR", "SLICE_ELEMENTS", "calibrated", "run_sliced", "slice_step"]

#: elements of the largest intermediate per slice: 4 MiB of float32, the fastest of 2^16 to 2^21
#: at 2 threads (``benchmarks/bench_forward.py``'s models: deit_small at batch 32 went from 1.13-1.19x
#: the float forward unsliced to 0.76-0.80x, fmnist_vit at batch 256 from 1.63-1.67x to 1.14-1.25x)
SLICE_ELEMENTS = 2**20
#: the attention's slices are 4x larger: it has more fixed cost per call (two matmuls, the
#: softmax's scalar set-up), which small slices would multiply (measured: fmnist_vit, batch 32)
ATTENTION_SLICE_FACTOR = 4

Carry = tuple[torch.Tensor, "torch.Tensor | None"]


def calibrated(*acts: IntAct) -> bool:
    """Whether every quantizer runs on a static, calibrated scale (none is dynamic)."""
    return all(a.enabled and not a.calibrating and a.observer.ready for a in acts)


def slice_step(batch: int, per_entry: int, factor: int = 1) -> int:
    """Entries of dim 0 per slice for ``per_entry`` elements each, about ``factor *``
    :data:`SLICE_ELEMENTS` elements per slice (0: the batch at once, always while tracing for
    ONNX export, where a loop over the example's batch would be baked into the graph)."""
    if torch.jit.is_tracing():
        return 0
    step = max(1, factor * SLICE_ELEMENTS // max(per_entry, 1))
    return step if step < batch else 0


def run_sliced(fn: Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], Carry], x: torch.Tensor,
               scale: torch.Tensor, step: int, first: IntLinear) -> Carry:
    """``fn(x_slice, scale, ints_slice)`` over slices of ``step`` entries, concatenated; ``first``
    is the linear layer taking ``x``, whose input integers (kept by its quantizer) are sliced too."""
    ints = first.source[0].ints_of(x, scale) if first.source else None
    parts = [fn(x[i:i + step], scale, None if ints is None else ints[i:i + step])
             for i in range(0, x.shape[0], step)]
    return torch.cat([y for y, _ in parts]), parts[0][1]

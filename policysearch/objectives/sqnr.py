"""ASQNR (Kim et al. 2024, eq. 10) and the model-level comparison metrics.

ASQNR of a quantized tensor ``q`` against its float reference ``x`` (both ``(B, ...)``):
``20 * log10( mean_b  E[x_b^2] / E[(x_b - q_b)^2] )``: the per-sample power ratio averaged over
the batch, expressed in dB with the ``20 log10`` the paper writes (DESIGN.md keeps that convention
in this one function). An exact match (zero error) is capped at :data:`MAX_DB` so that sums and
differences stay finite; a non-finite ``q`` gives ``-inf``.

The convention is one option of that function: ``asqnr(..., db=10)`` gives ``10 log10`` of the same
ratio, exactly half the default value (cap included). Everything stored (site metrics, the
``logit_sqnr`` and ``mean_*`` metrics, policy files) is in the default 20·log10 convention;
:func:`convert_db` converts a stored value for reporting.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DB_CONVENTIONS", "MAX_DB", "PowerWork", "asqnr", "convert_db", "kl_divergence", "kl_per_image", "logit_metrics", "sample_power", "top1_agreement"]

#: The cap on an exact match, in the 20·log10 convention (``MAX_DB / 2`` in 10·log10).
MAX_DB = 200.0
#: The allowed ``db`` factors: 20·log10 (the paper's eq. 10, the stored convention) and 10·log10.
DB_CONVENTIONS = (20, 10)
_TINY = 1e-30


def _check_db(db: int, name: str = "db") -> int:
    if isinstance(db, bool) or db not in DB_CONVENTIONS:
        raise ValueError(f"{name} must be 20 (20·log10) or 10 (10·log10), got {db!r}")
    return int(db)


def convert_db(value: float, from_db: int, to_db: int) -> float:
    """A dB value (or difference of dB values) in the ``from_db``·log10 convention, re-expressed in
    ``to_db``·log10: ``value * (to_db / from_db)``, exact (a factor of 2 or 1/2, not ``value *
    to_db / from_db``, which rounds twice). ``±inf`` and NaN stay as they are."""
    from_db, to_db = _check_db(from_db, "from_db"), _check_db(to_db, "to_db")
    return value * (to_db / from_db)


class PowerWork:
    """A reusable float64 buffer for :func:`asqnr`'s row sums (one per evaluator): the float32
    squares are cast into it and summed there, the very reduction ``sum(1, dtype=torch.float64)``
    performs on its own fresh cast, without a new float64 tensor per call."""

    def __init__(self) -> None:
        self._bufs: dict[torch.dtype, torch.Tensor] = {}

    def _like(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get(dtype)
        if buf is None or buf.numel() < t.numel() or buf.device != t.device:
            buf = self._bufs[dtype] = torch.empty(t.numel(), dtype=dtype, device=t.device)
        return buf[: t.numel()].view(t.shape)

    def row_sums(self, sq: torch.Tensor) -> torch.Tensor:
        """``sq.sum(1, dtype=torch.float64)`` of a contiguous 2-D float32 ``sq``, same values."""
        if not sq.is_contiguous():
            return sq.sum(1, dtype=torch.float64)
        return self._like(sq, torch.float64).copy_(sq).sum(1)

    def sub(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``x - q`` (contiguous 2-D float32 operands of one shape) in the reused float32 buffer."""
        if not (x.is_contiguous() and q.is_contiguous() and x.shape == q.shape and x.dtype == torch.float32):
            return x - q
        return torch.sub(x, q, out=self._like(x, torch.float32))


def _row_sums(sq: torch.Tensor, work: PowerWork | None) -> torch.Tensor:
    return sq.sum(1, dtype=torch.float64) if work is None else work.row_sums(sq)


def _rows(t: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    t = t.detach().float().reshape(t.shape[0], -1)
    return t if v is None else torch.where(v, t, 0.0)


def sample_power(x: torch.Tensor, *, valid: torch.Tensor | None = None,
                 work: PowerWork | None = None) -> torch.Tensor:
    """Per-sample ``E[x_b^2]`` (float64, shape ``(B,)``), :func:`asqnr`'s signal: compute it once
    for a fixed reference and pass it as ``asqnr(..., signal=)`` (same ``valid``)."""
    v = None if valid is None else valid.expand_as(x).reshape(x.shape[0], -1)
    x = _rows(x, v)
    return _row_sums(x * x, work) / x.shape[1]


def asqnr(x: torch.Tensor, q: torch.Tensor, *, db: int = 20, valid: torch.Tensor | None = None,
          signal: torch.Tensor | None = None, work: PowerWork | None = None) -> float:
    """Averaged SQNR in dB (eq. 10): ``db * log10(ratio)``, ``db`` 20 (default, the paper's and the
    stored convention) or 10 (anything else is a ValueError); see the module docstring.

    ``valid``: an optional boolean tensor broadcasting to ``x``; entries where it is False (masked
    attention entries, e.g. Swin's shifted-window mask) are left out of both expectations, and a
    sample with no valid entry is left out of the batch mean.

    ``signal``: ``sample_power(x, valid=valid)`` when already known (a fixed reference: the same
    value, not recomputed); ``work``: a :class:`PowerWork` to sum in (same values, less memory
    traffic)."""
    db = _check_db(db)
    keep = None
    v = None
    if valid is not None:
        v = valid.expand_as(x).reshape(x.shape[0], -1)
        keep = v.any(1)
    x = _rows(x, v)
    q = _rows(q, v)
    diff = x - q if work is None else work.sub(x, q)
    # float32 elements, float64 accumulation (no float64 copies of the tensors); with a mask the
    # element counts cancel in the ratio, so the masked entries are simply zero on both sides
    if signal is None:
        signal = _row_sums(x * x, work) / x.shape[1]
    noise = _row_sums(diff.mul_(diff), work) / x.shape[1]
    if keep is not None:
        if not bool(keep.any()):
            return MAX_DB * (db / 20)
        signal, noise = signal[keep], noise[keep]
    if not bool(torch.isfinite(noise).all()):
        return -math.inf
    ratio = signal / noise.clamp(min=_TINY)
    ratio = torch.where(noise > 0, ratio, torch.full_like(ratio, 10 ** (MAX_DB / 20)))
    value = db * math.log10(max(float(ratio.mean()), _TINY))  # 10·log10 is exactly half of 20·log10
    return min(value, MAX_DB * (db / 20))


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(float || quantized) of the softmax distributions, in nats."""
    return float(kl_per_image(ref_logits, logits).mean())


def kl_per_image(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(float || quantized) of each row's softmax distribution, in nats (float64)."""
    p_log = F.log_softmax(ref_logits.double(), -1)
    q_log = F.log_softmax(logits.double(), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).double().mean())


def logit_metrics(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    return {
        "logit_sqnr": asqnr(ref_logits, logits),
        "kl": kl_divergence(ref_logits, logits),
        "agreement": top1_agreement(ref_logits, logits),
    }

"""ASQNR (Kim et al. 2024, eq. 10) and the model-level comparison metrics.

ASQNR of a quantized tensor ``q`` against its float reference ``x`` (both ``(B, ...)``):
``20 * log10( mean_b  E[x_b^2] / E[(x_b - q_b)^2] )``: the per-sample power ratio averaged over
the batch, expressed in dB with the ``20 log10`` the paper writes (DESIGN.md keeps that convention
in this one function). An exact match (zero error) is capped at :data:`MAX_DB` so that sums and
differences stay finite; a non-finite ``q`` gives ``-inf``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["MAX_DB", "asqnr", "kl_divergence", "logit_metrics", "top1_agreement"]

MAX_DB = 200.0
_TINY = 1e-30


def asqnr(x: torch.Tensor, q: torch.Tensor) -> float:
    """Averaged SQNR in dB (eq. 10, 20·log10 convention); see the module docstring."""
    x = x.detach().float().reshape(x.shape[0], -1)
    q = q.detach().float().reshape(q.shape[0], -1)
    diff = x - q
    # float32 elements, float64 accumulation (no float64 copies of the tensors)
    signal = (x * x).sum(1, dtype=torch.float64) / x.shape[1]
    noise = (diff * diff).sum(1, dtype=torch.float64) / x.shape[1]
    if not bool(torch.isfinite(noise).all()):
        return -math.inf
    ratio = signal / noise.clamp(min=_TINY)
    ratio = torch.where(noise > 0, ratio, torch.full_like(ratio, 10 ** (MAX_DB / 20)))
    value = 20.0 * math.log10(max(float(ratio.mean()), _TINY))
    return min(value, MAX_DB)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(float || quantized) of the softmax distributions, in nats."""
    p_log = F.log_softmax(ref_logits.double(), -1)
    q_log = F.log_softmax(logits.double(), -1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).double().mean())


def logit_metrics(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    return {
        "logit_sqnr": asqnr(ref_logits, logits),
        "kl": kl_divergence(ref_logits, logits),
        "agreement": top1_agreement(ref_logits, logits),
    }

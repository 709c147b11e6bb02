"""The fine-tuning stage's errors."""
from __future__ import annotations

from policysearch.errors import PolicySearchError

__all__ = ["FinetuneError", "FinetuneStopped"]


class FinetuneError(PolicySearchError, ValueError):
    """Fine-tuning cannot start or resume as asked; the message names the problem and the fix."""


class FinetuneStopped(KeyboardInterrupt):
    """Training stopped before its end (``stop_after``); the checkpoints resume it."""

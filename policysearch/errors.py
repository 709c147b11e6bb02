"""The exception types that mean "bad input": the CLI prints them as one line, no traceback."""
from __future__ import annotations

from policysearch.policy import PolicyError
from policysearch.registry import UnknownNameError

__all__ = ["ConfigError", "user_errors"]


class ConfigError(ValueError):
    """A bad option, preset or configuration value."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input (imported lazily: the modules import this one)."""
    from policysearch.data import DataError
    from policysearch.models.loading import ModelError
    from policysearch.models.wiring import UnsupportedModelError

    return (PolicyError, UnknownNameError, ConfigError, FileNotFoundError, DataError, ModelError,
            UnsupportedModelError)


"""The exception types that mean "bad input": the CLI prints them as one line, no traceback."""
from __future__ import annotations

from policysearch.policy import PolicyError
from policysearch.registry import UnknownNameError

__all__ = ["ConfigError", "USER_ERRORS"]


class ConfigError(ValueError):
    """A bad option, preset or configuration value."""


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [PolicyError, UnknownNameError, ConfigError, FileNotFoundError]
    try:  # optional modules land in pieces; collect what exists
        from policysearch.models.wiring import UnsupportedModelError

        errors.append(UnsupportedModelError)
    except ImportError:  # pragma: no cover
        pass
    for mod, name in (("policysearch.data", "DataError"), ("policysearch.models.loading", "ModelError")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


USER_ERRORS = _user_errors()

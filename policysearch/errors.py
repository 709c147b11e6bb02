"""The exception types that mean "bad input": the CLI prints them as one line, no traceback.

Every user-facing error of the package subclasses :class:`PolicySearchError`, so
``except PolicySearchError`` catches them all. This module imports nothing from the package at
module level (every other module may import it without a cycle). The types that belong to one
area live here when more than one area raises them (config, policy, registry names, optional
extras); ``DataError``, ``ModelError`` and ``UnsupportedModelError`` live with the code that
raises them and subclass :class:`PolicySearchError` too.
"""
from __future__ import annotations

__all__ = [
    "ConfigError",
    "MissingExtraError",
    "PolicyError",
    "PolicySearchError",
    "UnknownNameError",
    "user_errors",
]


class PolicySearchError(Exception):
    """The root of every user-facing error: bad input, a missing file or extra, an unknown name."""


class ConfigError(PolicySearchError, ValueError):
    """A bad option, preset or configuration value."""


class PolicyError(PolicySearchError, ValueError):
    """A policy (object or file) is invalid; the message names the offending part."""


class UnknownNameError(PolicySearchError, KeyError, ValueError):
    """An unknown registry name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingExtraError(PolicySearchError, ImportError):
    """A registered entry needs an optional dependency that is not installed; says what to install."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: the CLI prints them as one line and exits with 2."""
    return (PolicySearchError, FileNotFoundError)

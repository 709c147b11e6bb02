"""A small decorator registry (timm style): ``register`` / ``register_lazy`` / ``get`` / ``names``.

Unknown names raise :class:`UnknownNameError` listing the valid ones, so every registry in the
package (kernels, strategies, objectives, runners, zoo models) fails the same clear way.

Entries are registered one way everywhere: ``REG.register("name", obj)`` or the decorator
``@REG.register("name")``. An entry whose code needs an optional backend is registered by
import path, ``REG.register_lazy("ray", "policysearch.runners.ray:RayRunner", extra="ray")``:
``names()`` lists it without importing anything, ``get()`` imports it on first use, and a
missing backend is one :class:`MissingExtraError` saying which extra to install.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from policysearch.errors import ConfigError, MissingExtraError, UnknownNameError

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError", "lazy_exports"]


@dataclass(frozen=True)
class _Lazy:
    """A registered import path ``"module.path:Attr"``, imported on first :meth:`Registry.get`."""

    target: str
    extra: str | None


class Registry(Generic[T]):
    """Name -> object mapping filled by a decorator (or a call), with lazily imported entries."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, Any] = {}  # name -> T | _Lazy

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable as ``@registry.register("name")``."""
        if obj is not None:
            return self._add(name, obj)

        def deco(o: T) -> T:
            return self._add(name, o)

        return deco

    def register_lazy(self, name: str, target: str, extra: str | None = None) -> None:
        """Register ``"module.path:Attr"`` under ``name``; nothing is imported until :meth:`get`.

        ``extra`` names the optional dependency group (``pip install "policysearch[extra]"``)
        the target needs; without it the entry's dependencies are the package's own.
        """
        module, sep, attr = target.partition(":")
        if not (module and sep and attr):
            raise ValueError(f"{self.what} {name!r}: lazy target must be 'module.path:Attr', got {target!r}")
        if name in self._items:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._items[name] = _Lazy(target, extra)

    def _add(self, name: str, obj: T) -> T:
        current = self._items.get(name)
        # the module a lazy entry points at may register the same name while it is imported
        if name in self._items and not isinstance(current, _Lazy):
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        try:
            item = self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.what} {name!r}; valid: {', '.join(self.names()) or '(none)'}"
            ) from None
        if isinstance(item, _Lazy):
            item = self._load(name, item)
            self._items[name] = item
        return item

    def _load(self, name: str, lazy: _Lazy) -> Any:
        module_name, _, attr = lazy.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if _is_within(module_name, missing):
                # the entry's own module is not there: nothing to install would fix it
                raise ConfigError(
                    f"the {name!r} {self.what} is not built yet in this version ({module_name} is missing)"
                    f"{self._others(name)}"
                ) from None
            if lazy.extra is None or missing.split(".")[0] == __name__.split(".")[0]:
                raise  # not an optional backend: a bug, keep the traceback
            raise MissingExtraError(
                f"the {name!r} {self.what} needs the optional extra: pip install \"policysearch[{lazy.extra}]\""
                f" (missing module {missing!r})"
            ) from None
        try:
            return getattr(module, attr)
        except AttributeError:
            raise ConfigError(
                f"the {name!r} {self.what} is not built yet in this version ({lazy.target} is missing)"
                f"{self._others(name)}"
            ) from None

    def _others(self, name: str) -> str:
        others = [n for n in self.names() if n != name]
        return f"; available: {', '.join(others)}" if others else ""

    def is_loaded(self, name: str) -> bool:
        """Whether ``name`` is registered and its object is imported (not a pending lazy entry)."""
        return name in self._items and not isinstance(self._items[name], _Lazy)

    def names(self) -> list[str]:
        """The registered names, sorted; lazy entries are listed without importing them."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def _is_within(module_name: str, missing: str) -> bool:
    """``missing`` is ``module_name`` itself or one of its parent packages."""
    return bool(missing) and (module_name == missing or module_name.startswith(missing + "."))


def lazy_exports(module: str, lazy: Mapping[str, str],
                 public: Sequence[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's PEP 562 ``__getattr__`` and ``__dir__``: each name of ``lazy`` (name -> the
    module defining it) is imported on first access and then bound in the package, so later
    lookups skip the hook. ``__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)``."""
    namespace = sys.modules[module].__dict__

    def __getattr__(name: str) -> Any:
        target = lazy.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(target), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__

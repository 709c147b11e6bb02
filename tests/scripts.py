"""Load a script of ``reproduce/`` (a plain folder, not a package) as a module, for its tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["REPRODUCE", "load_script"]

REPRODUCE = Path(__file__).resolve().parents[1] / "reproduce"


def load_script(name: str) -> ModuleType:
    """``reproduce/<name>.py`` as the module ``reproduce_<name>`` (loaded once)."""
    module_name = f"reproduce_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPRODUCE / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module

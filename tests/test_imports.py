"""Package structure: a lazy root, torch-free light modules, no import cycles, one error root,
one registry with lazy entries for optional backends.

A module that imports an optional backend (ray, onnx, onnxruntime, psycopg) is only checked where its
extra is installed; without the extra, the tests that walk every module leave it out and say so.
"""
import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import policysearch
from policysearch import errors
from policysearch.errors import (
    ConfigError,
    MissingExtraError,
    PolicyError,
    PolicySearchError,
    UnknownNameError,
    user_errors,
)
from policysearch.registry import Registry

PACKAGE = Path(policysearch.__file__).parent
# optional backends -> the extra that installs them (pyproject.toml)
EXTRA_OF_BACKEND = {"ray": "ray", "onnx": "onnx", "onnxruntime": "onnx", "psycopg": "postgres", "psycopg2": "postgres"}


def missing_extra(exc: BaseException) -> str | None:
    """The extra whose absence made this import fail, or None (then the failure is a real one)."""
    if not isinstance(exc, ModuleNotFoundError):
        return None
    top = (exc.name or "").split(".")[0]
    if top in EXTRA_OF_BACKEND and importlib.util.find_spec(top) is None:
        return EXTRA_OF_BACKEND[top]
    return None


def note_unchecked(unchecked: dict[str, str]) -> None:
    """Say which modules a walk over every module could not import for want of an extra."""
    if unchecked:
        warnings.warn("not checked without their extra: " + ", ".join(
            f'{m} (pip install "policysearch[{e}]")' for m, e in sorted(unchecked.items())), stacklevel=2)


def run_python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)] if code else [sys.executable, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=PACKAGE.parent)


def package_modules() -> list[str]:
    """Every module of the package on disk, following only regular packages (with __init__.py)."""
    out = []

    def walk(folder: Path, prefix: str) -> None:
        for path in sorted(folder.iterdir()):
            if path.is_dir() and (path / "__init__.py").is_file():
                out.append(f"{prefix}.{path.name}")
                walk(path, f"{prefix}.{path.name}")
            elif path.suffix == ".py" and path.stem != "__init__" and path.stem.isidentifier():
                if not (folder / path.stem / "__init__.py").is_file():  # a package shadows a module
                    out.append(f"{prefix}.{path.stem}")

    walk(PACKAGE, "policysearch")
    return out


# ---- lazy root, torch-free light modules --------------------------------------------------------------
def test_light_modules_load_neither_torch_nor_optuna():
    res = run_python("""
        import sys
        import policysearch.policy, policysearch.spaces, policysearch.strategies, policysearch.methods
        import policysearch.schema, policysearch.registry, policysearch.errors, policysearch.runners
        from policysearch.strategies import create_strategy, list_strategies
        from policysearch import KIND_METHODS, Policy, PolicySearchError, Site
        from policysearch.runners import list_runners
        assert "tpe" in list_strategies() and "ray" in list_runners()
        assert "policysearch.runners.ray" not in sys.modules and "ray" not in sys.modules
        heavy = sorted(m for m in ("torch", "optuna", "timm") if m in sys.modules)
        assert not heavy, heavy
    """)
    assert res.returncode == 0, res.stderr


def test_root_import_is_lazy_and_resolves_every_public_name():
    res = run_python("""
        import sys, policysearch
        assert "torch" not in sys.modules and "policysearch.models" not in sys.modules
        assert policysearch.__version__
    """)
    assert res.returncode == 0, res.stderr
    for name in policysearch.__all__:
        assert getattr(policysearch, name) is not None, name
        assert name in dir(policysearch)
    from policysearch.models import apply_policy
    from policysearch.policy import Policy

    assert policysearch.Policy is Policy and policysearch.apply_policy is apply_policy
    assert policysearch.PolicyError is PolicyError and policysearch.PolicySearchError is PolicySearchError
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        policysearch.nope  # noqa: B018
    # a submodule still imports through `from policysearch import <module>`
    from policysearch import kernels

    assert kernels.methods("gelu")[0] == "fp32"


def test_strategies_import_optuna_only_when_an_optuna_strategy_is_built():
    res = run_python("""
        import sys
        from policysearch.sites import Site
        from policysearch.spaces.space import SearchSpace
        from policysearch.strategies import create_strategy
        space = SearchSpace(sites=[Site(name="a.softmax", kind="softmax"), Site(name="a.act", kind="gelu")],
                            options=[["ibert", "ivit"], ["ibert", "relu"]])
        create_strategy("uniform", space)
        assert "optuna" not in sys.modules
        s = create_strategy("random", space, trials=2)
        assert "optuna" in sys.modules and len(s.ask(2)) == 2
    """)
    assert res.returncode == 0, res.stderr


def test_python_dash_m_policysearch_help():
    res = run_python("", "-m", "policysearch", "--help", timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: policysearch") and "list" in res.stdout


def test_cli_loads_the_library_on_use_and_names_only_real_entry_points():
    """``--help`` stays light (the CLI's entry points are lazy registry entries), and every entry
    resolves to a callable: a typo in a "module:attr" string fails here, not in a user's command."""
    res = run_python("""
        import sys
        import policysearch.cli
        heavy = sorted(m for m in ("torch", "optuna", "timm", "policysearch.search") if m in sys.modules)
        assert not heavy, heavy
    """)
    assert res.returncode == 0, res.stderr
    from policysearch.cli import API

    assert {"search", "SearchConfig", "finetune", "run_latency", "build_report", "export_run_onnx"} <= set(API)
    unchecked = {}
    for name in API:
        try:
            assert callable(API.get(name)), name
        except MissingExtraError:
            unchecked[name] = "onnx"
    note_unchecked(unchecked)


def test_no_import_cycles_whatever_module_is_imported_first():
    """Each module is imported first into a fresh package state (torch stays loaded: fast)."""
    modules = package_modules()
    assert {"policysearch.methods", "policysearch.kernels.ibert", "policysearch.strategies.optuna_based",
            "policysearch.__main__", "policysearch.schema.__main__"} <= set(modules)
    res = run_python(f"""
        import importlib, importlib.util, json, sys, traceback
        extra_of_backend = {EXTRA_OF_BACKEND!r}
        failures, unchecked = {{}}, {{}}
        for order in ({modules!r}, {modules[::-1]!r}):
            for name in order:
                for key in [k for k in sys.modules if k == "policysearch" or k.startswith("policysearch.")]:
                    del sys.modules[key]
                try:
                    importlib.import_module(name)
                except Exception as exc:
                    top = (getattr(exc, "name", None) or "").split(".")[0]
                    if (isinstance(exc, ModuleNotFoundError) and top in extra_of_backend
                            and importlib.util.find_spec(top) is None):
                        unchecked[name] = extra_of_backend[top]  # its extra is not installed
                    else:
                        failures[name] = traceback.format_exc(limit=-4)
        print(json.dumps([failures, unchecked]))
    """, timeout=600)
    assert res.returncode == 0, res.stderr
    failures, unchecked = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{k}:\n{v}" for k, v in failures.items())
    note_unchecked(unchecked)


# ---- one error root ------------------------------------------------------------------------------------
def test_errors_module_imports_nothing_from_the_package():
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    for node in tree.body:  # module level only
        if isinstance(node, ast.Import):
            assert all(not a.name.startswith("policysearch") for a in node.names)
        if isinstance(node, ast.ImportFrom):
            assert node.module == "__future__", node.module
    res = run_python("""
        import sys, policysearch.errors
        # the package root binds its lazy names with registry.lazy_exports (which needs errors only)
        assert sorted(m for m in sys.modules if m.startswith("policysearch")) == [
            "policysearch", "policysearch.errors", "policysearch.registry"]
    """)
    assert res.returncode == 0, res.stderr


def test_every_user_error_has_one_root():
    from policysearch.data import DataError
    from policysearch.models.loading import ModelError
    from policysearch.models.wiring import UnsupportedModelError
    from policysearch.policy import PolicyError as ReExported
    from policysearch.registry import UnknownNameError as FromRegistry
    from policysearch.run import RunLockedError

    assert ReExported is PolicyError and FromRegistry is UnknownNameError
    for cls in (ConfigError, PolicyError, UnknownNameError, DataError, ModelError, UnsupportedModelError,
                RunLockedError, MissingExtraError):
        assert issubclass(cls, PolicySearchError), cls
    for cls in (ConfigError, PolicyError, UnknownNameError, DataError, ModelError, UnsupportedModelError):
        assert issubclass(cls, ValueError), cls
    assert issubclass(UnknownNameError, KeyError) and str(UnknownNameError("a 'b'")) == "a 'b'"
    assert user_errors() == (PolicySearchError, FileNotFoundError)
    assert errors.PolicySearchError.__bases__ == (Exception,)


def test_every_error_class_in_the_package_subclasses_the_root():
    """A new ``class XError(...)`` anywhere must derive from PolicySearchError (or a subclass)."""
    found, unchecked = [], {}
    for name in package_modules():
        tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text())
        found += [(name, n.name) for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name.endswith("Error")]
    assert len(found) >= 8
    for module, cls_name in found:
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not (extra := missing_extra(exc)):
                raise
            unchecked[module] = extra
            continue
        assert issubclass(getattr(imported, cls_name), PolicySearchError), f"{module}.{cls_name}"
    note_unchecked(unchecked)


# ---- one registry, lazy entries ------------------------------------------------------------------------
@pytest.fixture
def backend(tmp_path, monkeypatch):
    """Three importable modules: one that needs a missing package, one fine, one self-registering."""
    (tmp_path / "ps_test_needs_backend.py").write_text("import ps_test_not_installed_backend\nThing = 1\n")
    (tmp_path / "ps_test_fine.py").write_text("import sys\nsys.modules[__name__].loaded = True\nThing = object()\n")
    (tmp_path / "ps_test_selfreg.py").write_text(
        "from ps_test_registry import REG\n@REG.register('selfreg')\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("ps_test_needs_backend", "ps_test_fine", "ps_test_selfreg", "ps_test_registry"):
        sys.modules.pop(name, None)


def test_register_lazy_imports_on_first_get_only(backend):
    reg = Registry("widget")
    reg.register("eager", 1)

    @reg.register("decorated")
    def f():  # the decorator form returns the object
        return 2

    reg.register_lazy("fine", "ps_test_fine:Thing")
    assert reg.names() == ["decorated", "eager", "fine"] and "fine" in reg and len(reg) == 3
    assert "ps_test_fine" not in sys.modules and not reg.is_loaded("fine")
    thing = reg.get("fine")
    assert sys.modules["ps_test_fine"].loaded and thing is sys.modules["ps_test_fine"].Thing
    assert reg.get("fine") is thing and reg.is_loaded("fine") and reg.get("decorated") is f
    with pytest.raises(ValueError, match="already registered"):
        reg.register_lazy("fine", "ps_test_fine:Thing")
    with pytest.raises(ValueError, match="module.path:Attr"):
        reg.register_lazy("bad", "ps_test_fine.Thing")
    with pytest.raises(UnknownNameError, match="unknown widget 'nope'; valid: decorated, eager, fine"):
        reg.get("nope")


def test_missing_backend_names_the_extra(backend):
    reg = Registry("runner")
    reg.register_lazy("dask", "ps_test_needs_backend:Thing", extra="dask")
    with pytest.raises(MissingExtraError, match=r"the 'dask' runner needs the optional extra: "
                                                r"pip install \"policysearch\[dask\]\"") as info:
        reg.get("dask")
    assert isinstance(info.value, PolicySearchError) and "\n" not in str(info.value)
    assert not reg.is_loaded("dask")  # still lazy: installing the extra later works
    # without an extra declared, a missing dependency is a bug: the ImportError is not hidden
    reg.register_lazy("plain", "ps_test_needs_backend:Thing")
    with pytest.raises(ModuleNotFoundError, match="ps_test_not_installed_backend"):
        reg.get("plain")


def test_lazy_entry_whose_module_or_attribute_is_missing_is_not_built(backend):
    reg = Registry("runner")
    reg.register("local", object)
    reg.register_lazy("gone", "ps_test_no_such_module:Thing", extra="gone")
    reg.register_lazy("noattr", "ps_test_fine:Missing")
    with pytest.raises(ConfigError, match="the 'gone' runner is not built yet .*; available: local, noattr"):
        reg.get("gone")
    with pytest.raises(ConfigError, match=r"'noattr' runner is not built yet .*ps_test_fine:Missing"):
        reg.get("noattr")


def test_target_module_may_register_its_own_name(backend):
    (backend / "ps_test_registry.py").write_text("from policysearch.registry import Registry\nREG = Registry('x')\n")
    import ps_test_registry

    ps_test_registry.REG.register_lazy("selfreg", "ps_test_selfreg:Thing")
    cls = ps_test_registry.REG.get("selfreg")
    assert cls is sys.modules["ps_test_selfreg"].Thing
    with pytest.raises(ValueError, match="already registered"):
        ps_test_registry.REG.register("selfreg", object)


def test_ray_runner_is_lazy_and_fails_in_one_actionable_line():
    from policysearch.runners import RUNNERS, create_runner, list_runners

    assert "ray" in list_runners()
    try:
        import policysearch.runners.ray  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "policysearch.runners.ray":  # the runner exists and needs Ray
            with pytest.raises(MissingExtraError, match=r'pip install "policysearch\[ray\]"'):
                create_runner("ray")
            return
        with pytest.raises(PolicySearchError, match="'ray' runner is not built yet.*available: local") as info:
            create_runner("ray")
        assert "\n" not in str(info.value)
    else:  # the runner is importable: selecting it must not fail on the registry side
        assert RUNNERS.get("ray").__name__ == "RayRunner"

"""Model families: every zoo and tiny model resolves to its family, anything else is one clear error,
and the modules of ``policysearch.models`` import one another without cycles."""
import ast
from pathlib import Path

import pytest
from torch import nn

import policysearch as ps
from policysearch.errors import PolicySearchError, UnknownNameError
from policysearch.models import zoo
from policysearch.models.families import (
    SwinFamily,
    ViTFamily,
    family_of,
    find_family,
    get_family,
    list_families,
)
from policysearch.models.precision import softmax_output_bits
from policysearch.models.segments import segments
from policysearch.models.tiny import tiny_swin, tiny_vit

MODELS_DIR = Path(ps.__file__).resolve().parent / "models"


def test_builtin_families_are_registered():
    assert list_families() == ["swin", "vit"]
    assert isinstance(get_family("vit"), ViTFamily) and isinstance(get_family("swin"), SwinFamily)
    with pytest.raises(UnknownNameError, match="swin, vit"):
        get_family("eva")


@pytest.mark.parametrize("name", zoo.list_zoo())
def test_every_zoo_model_resolves_to_its_family(name):
    entry = zoo.get(name)
    model = entry.build()  # random weights: nothing read from disk
    assert family_of(model).name == entry.family
    assert ps.models.model_family(model) == entry.family


@pytest.mark.parametrize("build, family", [
    (tiny_vit, "vit"),
    (lambda: tiny_vit(distilled=True), "vit"),
    (tiny_swin, "swin"),
])
def test_tiny_models_resolve_and_the_wiring_records_the_family(build, family):
    assert family_of(build()) is get_family(family)
    for wiring in ("paper", "native"):
        model = ps.prepare(build(), wiring=wiring)
        assert model._policysearch.family == family
        bits = softmax_output_bits(family)
        softmax = [m for m in ps.models.sites_of(model).values() if m.kind == "softmax"]
        assert softmax and all(m.softmax_bits == dict(bits) for m in softmax)


def test_ivit_softmax_bits_follow_the_family():
    """The width comes from the method's descriptor (``family_out_bits``), read per family."""
    assert softmax_output_bits("vit")["ivit"] == 16 and softmax_output_bits("swin")["ivit"] == 8
    assert softmax_output_bits("swin")["fqvit"] == 4 and "fp32" not in softmax_output_bits("vit")


def test_unsupported_module_is_one_clear_error_listing_the_families():
    seq = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    assert find_family(seq) is None
    with pytest.raises(ps.UnsupportedModelError) as exc:
        family_of(seq)
    assert isinstance(exc.value, PolicySearchError)
    message = str(exc.value)
    assert "Sequential is not supported" in message
    for name in list_families():
        assert f"{name}: {get_family(name).summary}" in message
    for entry_point in (ps.prepare, ps.find_sites, segments):
        with pytest.raises(ps.UnsupportedModelError, match="Sequential is not supported.*swin: .*vit: "):
            entry_point(nn.Sequential(nn.Linear(4, 4), nn.GELU()))


# ---- the models/ modules form a DAG ----------------------------------------------------------------
# the zoo's training and sample scripts are command-line tools, not library modules
SCRIPTS = {"policysearch.models.zoo.train", "policysearch.models.zoo.make_sample"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(MODELS_DIR.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(node: ast.ImportFrom | ast.Import, alias: ast.alias, known: set[str]) -> str | None:
    """The policysearch.models module an import names (``from pkg import submodule`` included)."""
    base = node.module if isinstance(node, ast.ImportFrom) else alias.name
    if not base or not base.startswith("policysearch"):
        return None
    sub = f"{base}.{alias.name}" if isinstance(node, ast.ImportFrom) else None
    return sub if sub in known else base


def _imports(path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(module-level policysearch imports, policysearch imports inside functions or classes)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            top |= {t for a in stmt.names if (t := _target(stmt, a, known))}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    nested += [f"{node.name}: {t}" for a in inner.names if (t := _target(inner, a, known))]
    return top, nested


def test_models_modules_form_a_dag_without_deferred_package_imports():
    files = {_module_name(p): p for p in MODELS_DIR.rglob("*.py")}
    known = set(files)
    graph, deferred = {}, {}
    for name, path in files.items():
        if name in SCRIPTS:
            continue
        top, nested = _imports(path, known)
        graph[name] = {t for t in top if t in known and t != name}
        if nested:
            deferred[name] = nested
    assert not deferred, deferred
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])

"""Built-in presets are the package's YAML files, defined once; resolution order."""
from pathlib import Path

import pytest
import yaml

from policysearch.errors import ConfigError
from policysearch.objectives import OBJECTIVES, Objective, list_objectives, load_objective
from policysearch.presets import KINDS, builtin_presets, resolve_preset
from policysearch.runners import PRESETS, LocalRunner, create_runner
from policysearch.spaces import SPACES

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = ROOT / "policysearch" / "presets"


@pytest.mark.parametrize("name", list_objectives())
def test_objective_files_equal_builtins(name):
    data = yaml.safe_load((PRESET_DIR / "objectives" / f"{name}.yaml").read_text())
    data.pop("name")
    assert data == OBJECTIVES.get(name)


def test_runner_file_equals_builtin():
    data = yaml.safe_load((PRESET_DIR / "runners" / "local.yaml").read_text())
    data.pop("name")
    assert data == PRESETS.get("local")
    assert isinstance(create_runner("local"), LocalRunner)


@pytest.mark.parametrize("name", ["ray_local", "ray_cluster"])
def test_ray_runner_files_equal_builtins(name):
    data = yaml.safe_load((PRESET_DIR / "runners" / f"{name}.yaml").read_text())
    assert data.pop("name") == name
    assert data == PRESETS.get(name) and data["type"] == "ray"
    assert {p.stem for p in (PRESET_DIR / "runners").glob("*.yaml")} <= set(PRESETS.names())


def test_runner_preset_from_a_path_and_unknown_options(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("type: local\n")
    assert isinstance(create_runner(str(path)), LocalRunner)
    path.write_text("type: local\nworkers: 2\n")
    with pytest.raises(ConfigError, match="runner 'local' has no option.*workers"):
        create_runner(str(path))
    with pytest.raises(ConfigError, match="unknown runner 'nope'; available: local, ray, ray_cluster, ray_local"):
        create_runner("nope")


def test_local_preset_file_wins_over_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "objectives").mkdir()
    (tmp_path / "objectives" / "kl.yaml").write_text("directions: [maximize]\nvalues: [{top1: 1.0}]\n")
    assert load_objective("kl").values == ((("top1", 1.0),),)
    assert load_objective("accuracy").directions == ("maximize",)


def test_objective_values_and_errors():
    obj = load_objective("accuracy_kl")
    assert obj.compute({"top1": 0.9, "kl": 0.5}) == pytest.approx((0.85,))
    with pytest.raises(ConfigError, match="unknown metric 'speed'"):
        Objective(name="x", values=((("speed", 1.0),),), directions=("minimize",))
    with pytest.raises(ConfigError, match="unknown objective 'nope'"):
        load_objective("nope")


REGISTRIES = {"spaces": SPACES, "objectives": OBJECTIVES, "runners": PRESETS}


@pytest.mark.parametrize("kind", KINDS)
def test_every_builtin_resolves_from_package_data(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./spaces, ./objectives, ./runners here
    files = sorted(p.stem for p in (PRESET_DIR / kind).glob("*.yaml"))
    assert files and REGISTRIES[kind].names() == files == builtin_presets(kind).names()
    for name in files:
        data, resolved = resolve_preset(kind, name, REGISTRIES[kind])
        on_disk = yaml.safe_load((PRESET_DIR / kind / f"{name}.yaml").read_text())
        assert on_disk.pop("name") == name and resolved == name and data == on_disk


def test_presets_are_defined_once():
    """No preset is a Python literal too, and the old top-level preset folders are gone."""
    for kind in KINDS:
        assert not (ROOT / kind).exists(), f"top-level {kind}/ is a second copy of policysearch/presets/{kind}/"
    registries = ("SPACES", "OBJECTIVES", "PRESETS")
    for path in (ROOT / "policysearch").rglob("*.py"):
        text = path.read_text()
        for reg in registries:
            assert f"{reg}.register(" not in text and f"{reg}.register_lazy(" not in text, (path, reg)


def test_pyproject_ships_the_preset_files():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"policysearch.presets" = ["*/*.yaml"]' in text

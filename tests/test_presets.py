"""Preset files in objectives/ and runners/ equal the built-in defaults; resolution order."""
from pathlib import Path

import pytest
import yaml

from policysearch.errors import ConfigError
from policysearch.objectives import OBJECTIVES, Objective, list_objectives, load_objective
from policysearch.runners import PRESETS, LocalRunner, create_runner

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list_objectives())
def test_objective_files_equal_builtins(name):
    data = yaml.safe_load((ROOT / "objectives" / f"{name}.yaml").read_text())
    data.pop("name")
    assert data == OBJECTIVES.get(name)


def test_runner_file_equals_builtin():
    data = yaml.safe_load((ROOT / "runners" / "local.yaml").read_text())
    data.pop("name")
    assert data == PRESETS.get("local")
    assert isinstance(create_runner("local"), LocalRunner)


@pytest.mark.parametrize("name", ["ray_local", "ray_cluster"])
def test_ray_runner_files_equal_builtins(name):
    data = yaml.safe_load((ROOT / "runners" / f"{name}.yaml").read_text())
    assert data.pop("name") == name
    assert data == PRESETS.get(name) and data["type"] == "ray"
    assert {p.stem for p in (ROOT / "runners").glob("*.yaml")} <= set(PRESETS.names())


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

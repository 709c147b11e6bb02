"""One run name is one run: a changed strategy, space or objective is refused before any work, the
same name from another results folder or storage is refused naming where the run lives, a run that
failed before any evaluation does not hold its name, and `eval --policy` evaluates the model the
file records."""
import json
import re
import shlex
from pathlib import Path

import optuna
import pytest
from safetensors.torch import save_file

import policysearch.search as search_mod
from policysearch.cli import main
from policysearch.errors import ConfigError
from policysearch.models.loading import ModelError, load_model
from policysearch.run import RunLockedError, RunRecord, lock_run
from policysearch.search import SearchConfig, search
from policysearch.study import run_lock_path

ROOT = Path(__file__).resolve().parents[1]


def cfg(tmp_path, **kw):
    base = dict(strategy="sqnr_drop", model="test_fmnist_vit", calib_size=32, eval_size=48,
                results_dir=str(tmp_path / "results"), storage=f"sqlite:///{tmp_path / 'studies.db'}",
                run_name="r", batch_size=48, relu_repair=False)
    base.update(kw)
    return SearchConfig(**base)


def _no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(search_mod, "get_evaluator", boom)


def _trials(tmp_path, name="r"):
    return len(optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'studies.db'}").trials)


@pytest.mark.parametrize("change, shown", [
    ({"space": "all"}, "--space 'paper' -> 'all'"),
    ({"strategy": "uniform"}, "--strategy 'sqnr_drop' -> 'uniform'"),
    ({"objective": "accuracy"}, "--objective 'kl' -> 'accuracy'"),
])
def test_changed_setting_is_one_line_before_any_work(tmp_path, monkeypatch, change, shown):
    search(cfg(tmp_path), progress=False)
    before = json.loads((tmp_path / "results" / "r" / "run.json").read_text())
    trials = _trials(tmp_path)
    _no_work(monkeypatch)
    with pytest.raises(ConfigError) as info:
        search(cfg(tmp_path, **change), progress=False)
    msg = str(info.value)
    assert shown in msg and "new --run-name" in msg and "reuses" in msg and "\n" not in msg
    original = re.escape(shown.split(" -> ")[0])
    assert re.search(rf"repeat {original} to resume", msg)
    after = json.loads((tmp_path / "results" / "r" / "run.json").read_text())
    assert after["status"] == "finished" and after["evaluations"] == before["evaluations"]
    assert _trials(tmp_path) == trials


def test_changed_space_file_is_refused_before_any_evaluation(tmp_path, monkeypatch):
    """The same --space path with other choices: no Optuna traceback, nothing evaluated or lost."""
    space = tmp_path / "space.yaml"
    space.write_text((ROOT / "policysearch" / "presets" / "spaces" / "paper.yaml").read_text())
    search(cfg(tmp_path, space=str(space)), progress=False)
    trials = _trials(tmp_path)
    n_eval = len(RunRecord.load(tmp_path / "results" / "r").data["evaluations"])
    space.write_text(space.read_text().replace("  gelu:\n  - ibert\n  - ivit\n", "  gelu:\n  - ivit\n"))

    def no_eval(*a, **k):
        raise AssertionError("an evaluation started before the refusal")

    monkeypatch.setattr(search_mod._Loop, "drive", no_eval)
    with pytest.raises(ConfigError, match=r"other choices at site .*act.*new --run-name"):
        search(cfg(tmp_path, space=str(space)), progress=False)
    rec = RunRecord.load(tmp_path / "results" / "r")
    assert rec.data["status"] == "finished" and len(rec.data["evaluations"]) == n_eval
    assert _trials(tmp_path) == trials
    assert main(["export", "r", "--results-dir", str(tmp_path / "results"), "--out", str(tmp_path / "p.json")]) == 0


def test_new_name_for_a_changed_setting_reuses_the_evaluations(tmp_path):
    first = search(cfg(tmp_path), progress=False)
    other = search(cfg(tmp_path, strategy="uniform", run_name="r-uniform"), progress=False)
    assert first.evaluated > 0 and other.evaluated == 0 and other.reused > 0


def test_same_name_from_another_results_folder_is_refused(tmp_path, monkeypatch):
    search(cfg(tmp_path), progress=False)
    trials = _trials(tmp_path)
    _no_work(monkeypatch)
    with pytest.raises(ConfigError) as info:
        search(cfg(tmp_path, results_dir=str(tmp_path / "elsewhere")), progress=False)
    msg = str(info.value)
    assert f"lives in {(tmp_path / 'results' / 'r').resolve()}" in msg and "--results-dir" in msg
    assert _trials(tmp_path) == trials
    assert not (tmp_path / "elsewhere" / "r" / "run.json").exists()


def test_same_name_from_another_results_folder_waits_for_the_running_one(tmp_path, monkeypatch):
    config = cfg(tmp_path)
    lock = run_lock_path(config.storage, "r")
    (tmp_path / "results" / "r").mkdir(parents=True)
    _no_work(monkeypatch)
    with lock_run(tmp_path / "results" / "r", path=lock):  # as a search running in results/ holds it
        with pytest.raises(RunLockedError, match=r"already running \(pid \d+.*folder .*results/r"):
            search(cfg(tmp_path, results_dir=str(tmp_path / "elsewhere")), progress=False)


def test_same_folder_with_another_storage_is_refused(tmp_path, monkeypatch):
    search(cfg(tmp_path), progress=False)
    _no_work(monkeypatch)
    with pytest.raises(ConfigError) as info:
        search(cfg(tmp_path, storage=f"sqlite:///{tmp_path / 'other.db'}"), progress=False)
    msg = str(info.value)
    assert f"keeps its study in sqlite:///{tmp_path / 'studies.db'}" in msg and "--storage" in msg
    assert not (tmp_path / "other.db").exists() or not optuna.get_all_study_summaries(
        f"sqlite:///{tmp_path / 'other.db'}")


def test_run_that_failed_before_any_evaluation_does_not_hold_its_name(tmp_path):
    byo = dict(model="test_vit", img_size=32, wiring="native")  # timm's test ViT: random weights, a 1000-class head
    with pytest.raises(ModelError, match=r"has 1000 classes but the data .* has 10; pass --num-classes 10"):
        search(cfg(tmp_path, **byo), progress=False)
    rec = RunRecord.load(tmp_path / "results" / "r")
    assert rec.data["status"] == "failed" and not rec.data["evaluations"]
    res = search(cfg(tmp_path, **byo, num_classes=10), progress=False)  # the flag it named, same name: afresh
    rec = RunRecord.load(tmp_path / "results" / "r")
    assert res.evaluated > 0 and rec.data["status"] == "finished"
    assert rec.data["fingerprint"]["model_args"] == {"num_classes": 10, "img_size": 32}
    assert not rec.data.get("resumed")
    with pytest.raises(ConfigError, match=r"other work \(model_args"):  # now it has evaluations: refused
        search(cfg(tmp_path, **byo, num_classes=12), progress=False)


def _cli(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_eval_builds_the_model_the_policy_file_records(tmp_path, monkeypatch, capsys):
    model = load_model("test_fmnist_vit")
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["head.bias"] += 0.5  # other weights than the zoo's
    save_file(state, str(tmp_path / "w.safetensors"))
    run = ["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--checkpoint", "w.safetensors",
           "--eval-size", "48", "--calib-size", "32", "--no-progress", "--no-relu-repair", "--run-name", "e"]
    assert _cli(tmp_path, monkeypatch, capsys, run)[0] == 0
    assert _cli(tmp_path, monkeypatch, capsys, ["export", "e", "--out", "p.json"])[0] == 0
    code, out, _ = _cli(tmp_path, monkeypatch, capsys, ["eval", "--policy", "p.json"])
    assert code == 0 and "match" in out and "DIFFERS" not in out and "model test_fmnist_vit" in out
    for flags, shown in ((["--model", "fmnist_vit"], "--model fmnist_vit"),
                         (["--checkpoint", "other.safetensors"], "--checkpoint other.safetensors"),
                         (["--num-classes", "7"], "--num-classes 7")):
        code, out, err = _cli(tmp_path, monkeypatch, capsys, ["eval", "--policy", "p.json", *flags])
        assert code == 2 and shown in err and "w.safetensors" in err and "\n" not in err and not out
    code, _, _ = _cli(tmp_path, monkeypatch, capsys, ["eval", "--policy", "p.json", "--model", "test_fmnist_vit",
                                                      "--checkpoint", "w.safetensors"])
    assert code == 0  # the flags the file records are fine


def test_readme_resume_example_runs(tmp_path, monkeypatch, capsys):
    """The README's search example, twice as written (tiny sizes added): the second resumes."""
    block = (ROOT / "README.md").read_text().split("## One example per stage", 1)[1].split("```bash", 1)[1]
    lines = [line.split("#", 1)[0].strip() for line in block.split("```", 1)[0].splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("policysearch run")]
    assert len(commands) == 2 and commands[0] == commands[1]
    tiny = ["--model", "test_fmnist_vit", "--eval-size", "32", "--calib-size", "32", "--no-progress",
            "--no-relu-repair"]
    for argv in commands:
        argv = ["3" if a == "30" else a for a in argv]  # --trials 30 -> 3
        code, out, err = _cli(tmp_path, monkeypatch, capsys, [*argv, *tiny])
        assert code == 0, err
    rec = RunRecord.load(tmp_path / "results" / "my-tpe")
    assert rec.data["status"] == "finished" and rec.data["resumed"] == 1

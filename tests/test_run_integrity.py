"""Run integrity: fingerprints, one writer per run, run names, up-front checks, the run record."""
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from safetensors.torch import save_file

from policysearch.cli import main
from policysearch.errors import ConfigError
from policysearch.models.loading import load_model
from policysearch.objectives import load_objective
from policysearch.run import RunLockedError, RunRecord, check_run_name, lock_run
from policysearch.search import SearchConfig, search


def cfg(tmp_path, **kw):
    base = dict(strategy="sqnr_drop", model="test_fmnist_vit", calib_size=32, eval_size=48,
                results_dir=str(tmp_path / "results"), storage=f"sqlite:///{tmp_path / 'studies.db'}",
                run_name="r", batch_size=48)
    base.update(kw)
    return SearchConfig(**base)


def test_same_work_is_reused_and_recorded(tmp_path):
    first = search(cfg(tmp_path), progress=False)
    again = search(cfg(tmp_path), progress=False)
    assert first.evaluated > 3 and again.evaluated == 0 and again.policy == first.policy
    rec = RunRecord.load(tmp_path / "results" / "r")
    assert rec.data["status"] == "finished" and rec.data["resumed"] == 1
    assert len(rec.data["evaluations"]) == first.evaluated  # the second run added none
    assert set(rec.data["baselines"]) == {"ibert", "fqvit", "ivit"}
    assert rec.data["fingerprint"]["data_digest"] and rec.data["fingerprint"]["weights"].startswith("seeded:")
    assert rec.data["timings"]["total_s"] > 0 and rec.data["answer"]["policy"]["sites"]


@pytest.mark.parametrize("change, field", [
    ({"eval_size": 40}, "eval_size"),
    ({"calib_size": 24}, "calib_size"),
    ({"act_bits": 6}, "act_bits"),
    ({"weight_bits": 6}, "weight_bits"),
    ({"seed": 1}, "seed"),
    ({"data": "fmnist"}, "data"),
    ({"num_classes": 10}, "model_args"),
])
def test_other_work_under_a_used_name_is_refused(tmp_path, change, field):
    search(cfg(tmp_path), progress=False)
    with pytest.raises(ConfigError, match=rf"other work \({field}: .*new --run-name"):
        search(cfg(tmp_path, **change), progress=False)


def test_changed_checkpoint_content_is_refused(tmp_path):
    model = load_model("test_fmnist_vit")
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    search(cfg(tmp_path, checkpoint=str(ckpt)), progress=False)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    state["head.bias"] += 1.0
    save_file(state, str(ckpt))  # same path, other content
    with pytest.raises(ConfigError, match=r"weights: "):
        search(cfg(tmp_path, checkpoint=str(ckpt)), progress=False)


def test_changed_data_content_is_refused(tmp_path, monkeypatch):
    search(cfg(tmp_path), progress=False)
    import policysearch.spec as spec_mod

    monkeypatch.setattr(spec_mod, "data_digest", lambda *t: "0123456789abcdef")
    spec_mod._CACHE.clear()
    with pytest.raises(ConfigError, match="data_digest"):
        search(cfg(tmp_path), progress=False)
    spec_mod._CACHE.clear()


def test_new_objective_under_a_new_name_reuses_and_recomputes(tmp_path):
    first = search(cfg(tmp_path, objective="kl"), progress=False)
    other = search(cfg(tmp_path, objective="accuracy", run_name="r2"), progress=False)
    assert other.evaluated == 0 and other.reused > 0
    acc = load_objective("accuracy")
    assert other.result.values == acc.compute(other.result.metrics)
    assert first.result.values != other.result.values or acc.compute(first.result.metrics) == first.result.values
    study = optuna.load_study(study_name="r2", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert study.trials and all(t.user_attrs.get("reused_from") == "r" for t in study.trials)
    for t in study.trials:  # the new study holds the new objective's values
        assert t.values == list(acc.compute({k[2:]: v for k, v in t.user_attrs.items() if k.startswith("m.")}))


def test_other_objective_under_the_same_name_is_refused(tmp_path):
    search(cfg(tmp_path, objective="accuracy"), progress=False)
    with pytest.raises(ConfigError, match="objective 'accuracy'.*new --run-name"):
        search(cfg(tmp_path, objective="accuracy_kl"), progress=False)


def test_other_directions_under_the_same_name_are_refused(tmp_path):
    search(cfg(tmp_path, objective="kl"), progress=False)
    with pytest.raises(ConfigError, match="directions"):
        search(cfg(tmp_path, objective="accuracy_and_kl", strategy="nsga2", trials=2), progress=False)


_HOLD = """
import sys, time
from pathlib import Path
from policysearch.run import lock_run
with lock_run(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_one_writer_per_run_and_a_killed_lock_does_not_block(tmp_path):
    run_dir = tmp_path / "results" / "r"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError, match=r"already running \(pid \d+"):
            search(cfg(tmp_path), progress=False)
        assert time.perf_counter() - t0 < 10  # fails at once, before any work
        assert not (run_dir / "run.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run_dir / ".lock").exists()  # left behind by the killed process
    res = search(cfg(tmp_path), progress=False)
    assert res.evaluated > 0


def test_lock_is_exclusive_in_one_process_too(tmp_path):
    with lock_run(tmp_path), pytest.raises(RunLockedError):
        with lock_run(tmp_path):
            pass
    with lock_run(tmp_path):  # released
        pass


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b", "/abs", "x/../../y", "..hidden",
                                  "-flag", "a b", "x" * 200, "run\x00"])
def test_hostile_run_names_are_refused(name):
    with pytest.raises(ConfigError, match="not a plain name"):
        check_run_name(name)


@pytest.mark.parametrize("name", ["r", "my-tpe", "deit_tiny.w8a8", "A1+b=c@d"])
def test_plain_run_names_pass(name):
    assert check_run_name(name) == name


def _cli(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


BASE = ["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--eval-size", "48", "--calib-size", "32",
        "--no-progress"]


@pytest.mark.parametrize("extra, message", [
    (["--run-name", "../escape"], "not a plain name"),
    (["--run-name", "x" * 5000], "not a plain name"),
    (["--storage", "sqlite//bad"], "not a valid database URL"),
    (["--storage", "nodb://x"], "not a valid database URL"),
    (["--device", "gpu0"], "is not a device"),
    (["--num-classes", "0"], "must be positive"),
])
def test_bad_input_is_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys, extra, message):
    code, err = _cli(tmp_path, monkeypatch, capsys, BASE + extra)
    assert code == 2 and message in err and "\n" not in err and len(err) < 700
    assert "Traceback" not in err


def test_unreachable_storage_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "adir").mkdir()
    code, err = _cli(tmp_path, monkeypatch, capsys, BASE + ["--storage", f"sqlite:///{tmp_path / 'adir'}"])
    assert code == 2 and "cannot open the database" in err and "\n" not in err


def test_read_only_database_is_one_line_before_work(tmp_path, monkeypatch, capsys):
    db = tmp_path / "ro.db"
    optuna.create_study(storage=f"sqlite:///{db}", study_name="other")
    url = f"sqlite:///file:{db}?mode=ro&uri=true"
    code, err = _cli(tmp_path, monkeypatch, capsys, BASE + ["--storage", url, "--run-name", "ro"])
    assert code == 2 and ("cannot write the study" in err or "cannot open the database" in err)
    assert not (tmp_path / "results" / "ro" / "run.json").exists() or \
        json.loads((tmp_path / "results" / "ro" / "run.json").read_text())["status"] != "finished"


def test_unwritable_results_folder_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "blocked").write_text("a file where the results folder should be")
    code, err = _cli(tmp_path, monkeypatch, capsys, BASE + ["--results-dir", "blocked", "--storage",
                                                            f"sqlite:///{tmp_path / 's.db'}"])
    assert code == 2 and "cannot write to" in err and "--results-dir" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_results_folder_by_permission(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, err = _cli(tmp_path, monkeypatch, capsys, BASE + ["--results-dir", "ro"])
    assert code == 2 and "cannot write to" in err


def test_deeply_nested_policy_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    code, err = _cli(tmp_path, monkeypatch, capsys, ["apply", "deep.json"])
    assert code == 2 and "\n" not in err and len(err) < 700 and "Traceback" not in err


def test_huge_policy_value_is_cut_in_the_message(tmp_path, monkeypatch, capsys):
    doc = {"format": "policysearch.policy/v1", "quantization": {"weight_bits": 8, "act_bits": 8},
           "sites": [{"name": "x" * 100_000, "kind": "softmax", "method": "y" * 100_000}]}
    (tmp_path / "big.json").write_text(json.dumps(doc))
    code, err = _cli(tmp_path, monkeypatch, capsys, ["apply", "big.json"])
    assert code == 2 and "\n" not in err and len(err) < 700


def test_apply_exits_non_zero_when_metrics_differ(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(BASE + ["--run-name", "a"]) == 0
    assert main(["export", "a", "--out", "p.json"]) == 0
    capsys.readouterr()
    assert main(["apply", "p.json"]) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["metrics"]["top1"] = 0.0 if doc["metrics"]["top1"] > 0.5 else 1.0
    (tmp_path / "p.json").write_text(json.dumps(doc))
    assert main(["apply", "p.json"]) == 1
    assert "DIFFERS" in capsys.readouterr().out


def test_export_reads_the_run_record(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(BASE + ["--run-name", "e"]) == 0
    (tmp_path / "results" / "e" / "policy.json").unlink()  # rebuilt from run.json alone
    assert main(["export", "e", "--out", "q.json"]) == 0
    doc = json.loads((tmp_path / "q.json").read_text())
    rec = json.loads((tmp_path / "results" / "e" / "run.json").read_text())
    assert doc["sites"] == rec["answer"]["policy"]["sites"]
    assert doc["quantization"]["wiring"] == rec["fingerprint"]["wiring"]
    capsys.readouterr()
    assert main(["export", "nope"]) == 2
    assert "no run record" in capsys.readouterr().err


def test_unfinished_run_cannot_be_exported(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise KeyboardInterrupt

    import policysearch.search as search_mod

    monkeypatch.setattr(search_mod._Loop, "drive", boom)
    with pytest.raises(KeyboardInterrupt):
        search(cfg(tmp_path, run_name="u"), progress=False)
    rec = RunRecord.load(tmp_path / "results" / "u")
    assert rec.data["status"] == "interrupted"
    monkeypatch.chdir(tmp_path)
    assert main(["export", "u"]) == 2
    assert "has not finished" in capsys.readouterr().err


def test_results_dir_and_storage_are_independent(tmp_path):
    res = search(cfg(tmp_path, results_dir=str(tmp_path / "elsewhere"), run_name="ind"), progress=False)
    assert (tmp_path / "elsewhere" / "ind" / "run.json").is_file()
    assert not (tmp_path / "elsewhere" / "studies.db").exists()  # the study went to --storage
    optuna.load_study(study_name="ind", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert res.run_dir == tmp_path / "elsewhere" / "ind"


def test_checkpoint_missing_is_one_line(tmp_path, monkeypatch, capsys):
    code, err = _cli(tmp_path, monkeypatch, capsys, BASE + ["--checkpoint", "nope.safetensors"])
    assert code == 2 and "nope.safetensors" in err and "\n" not in err


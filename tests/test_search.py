"""End to end: `run` for every strategy on a tiny model, resume, export, apply, CLI errors."""
import csv
import json

import optuna
import pytest

from policysearch.cli import main
from policysearch.policy import read_policy
from policysearch.report import evaluate_policy_file, export_run
from policysearch.search import SearchConfig, search
from policysearch.strategies import list_strategies


def config(tmp_path, strategy, **kw):
    base = dict(strategy=strategy, model="test_fmnist_vit", calib_size=32, eval_size=48, trials=3,
                results_dir=str(tmp_path / "results"), storage=f"sqlite:///{tmp_path / 'studies.db'}",
                run_name=f"t-{strategy}", batch_size=48)
    base.update(kw)
    return SearchConfig(**base)


@pytest.mark.parametrize("strategy", list_strategies())
def test_run_each_strategy(tmp_path, strategy):
    res = search(config(tmp_path, strategy), progress=False)
    out = tmp_path / "results" / f"t-{strategy}"
    doc = read_policy(out / "policy.json")
    assert doc.policy == res.policy and len(doc.policy) == 9
    assert doc.provenance["strategy"] == strategy and "torch" in doc.provenance["versions"]
    assert (out / "config.yaml").is_file()
    rows = list(csv.DictReader((out / "sensitivity.csv").open()))
    assert {r["method"] for r in rows} == {"ibert", "fqvit", "ivit"}
    assert all(float(r["sqnr_diff"]) == pytest.approx(float(r["beta"]) - float(r["gamma"])) for r in rows)
    study = optuna.load_study(study_name=f"t-{strategy}", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    evaluations = [t for t in study.trials if t.user_attrs.get("kind") != "answer"]  # + the answer's copy
    assert len(evaluations) == res.evaluated and len(study.trials) == res.evaluated + 1
    assert set(study.trials[0].params) == {s.name for s in res.policy.sites}
    assert set(res.baselines) == {"ibert", "fqvit", "ivit"}


def test_resume_reuses_trials(tmp_path):
    first = search(config(tmp_path, "exhaustive"), progress=False)
    again = search(config(tmp_path, "exhaustive"), progress=False)
    assert first.evaluated > 5
    assert again.evaluated == 0 and again.reused >= first.evaluated - 3
    assert again.policy == first.policy


def test_swin_run_and_mixed_bits(tmp_path):
    res = search(config(tmp_path, "sqnr_drop", model="test_fmnist_swin", space="mixed_bits", act_bits=6),
                 progress=False)
    assert res.policy.act_bits == 6 and any(c.bits == 6 for c in res.policy.choices)


def test_export_and_apply_reproduce_metrics(tmp_path):
    search(config(tmp_path, "sqnr_diff"), progress=False)
    path = export_run("t-sqnr_diff", out=str(tmp_path / "p.json"), results_dir=str(tmp_path / "results"))
    text = evaluate_policy_file(str(path), model=None, checkpoint=None, data="fmnist-sample")
    assert "match" in text and "DIFFERS" not in text


def test_cli_list(capsys):
    assert main(["list", "methods"]) == 0
    assert "softmax    fp32, ibert, fqvit, ivit" in capsys.readouterr().out
    assert main(["list", "sites", "--model", "test_fmnist_swin"]) == 0
    out = capsys.readouterr().out
    assert "layers.1.downsample.norm" in out and "11 sites: 2 softmax, 2 gelu, 7 layernorm" in out
    assert main(["list", "strategies"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["run", "--strategy", "bogus", "--model", "test_fmnist_vit"], "unknown strategy 'bogus'"),
    (["apply", "missing.json"], "does not exist"),
    (["eval", "--model", "test_fmnist_vit", "--data", "imagefolder:/nonexistent"], "/nonexistent"),
    (["list", "sites", "--model", "resnet_nope"], "unknown model"),
    (["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--space", "nope"], "unknown space"),
    (["run", "--strategy", "uniform", "--bits", "40"], "must be in [2, 16]"),
    (["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--runner", "nope"], "unknown runner"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_malformed_policy_file_is_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "policysearch.policy/v1", "quantization": {"weight_bits": 8, "act_bits": 8},
                               "sites": [{"name": "x", "kind": "gelu", "method": "fqvit"}]}))
    assert main(["apply", str(bad), "--model", "test_fmnist_vit"]) == 2
    assert "not allowed for gelu" in capsys.readouterr().err

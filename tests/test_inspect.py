"""Inspecting a finished run without re-running it: list runs, show, trials, run --config, run --help.

One tiny run (test_fmnist_vit, sqnr_drop) is made through the CLI once per module; the tests read
it back the ways a user would.
"""
import argparse
import contextlib
import csv
import io
import json

import pytest
import yaml

from policysearch.cli import build_parser, main
from policysearch.deploy.latency import latency_text
from policysearch.report.inspect import format_trials, list_runs, load_summary, trial_rows
from policysearch.run import RunRecord

RUN = "tiny-inspect"
TINY = ["--model", "test_fmnist_vit", "--calib-size", "32", "--eval-size", "48", "--batch-size", "48",
        "--device", "cpu", "--no-progress"]


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    results = str(root / "results")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # a module fixture: no capsys
        code = main(["run", "--strategy", "sqnr_drop", *TINY, "--results-dir", results, "--run-name", RUN])
    assert code == 0
    return results, buf.getvalue()


def test_run_ends_with_the_next_steps_and_names_its_image_count(finished):
    results, out = finished
    lines = out.rstrip().splitlines()
    assert lines[-3].startswith(f"next: policysearch report {RUN} --results-dir {results}")
    assert f"policysearch dashboard {RUN}" in lines[-2] and f"policysearch export {RUN}" in lines[-1]
    assert "top-1 on 48 evaluation images" in out
    summary = load_summary(RUN, results_dir=results)
    best = summary.headroom["best_uniform"]
    assert f"uniform {best}" in out and "(best uniform)" in out
    # every other uniform baseline and the result carry their paired interval against the best uniform
    record = RunRecord.load(summary.run_dir).data
    versus = record["headroom"]["vs_best_uniform"]
    assert set(versus) == {f"uniform {m}" for m in record["baselines"] if m != best}
    for name, comp in versus.items():
        iv = comp["top1"]
        assert iv["low"] <= iv["diff"] <= iv["high"] and comp["images"] == 48
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert f"{iv['diff']:+.2f} [{iv['low']:+.2f}, {iv['high']:+.2f}]" in row
    answer = record["verdict"]["answer_vs_best_uniform"]["top1"]
    row = next(line for line in out.splitlines() if line.startswith("result "))
    assert f"{answer['diff']:+.2f} [{answer['low']:+.2f}, {answer['high']:+.2f}]" in row


def test_show_prints_what_the_run_printed(finished, capsys):
    results, out = finished
    code, shown, _ = _cli(capsys, "show", RUN, "--results-dir", results)
    assert code == 0 and shown == out
    n = len(RunRecord.load(load_summary(RUN, results_dir=results).run_dir).data["evaluations"])
    assert shown.startswith(f"run {RUN}: {n} evaluations made over 1 invocation")


def test_list_runs_names_the_run(finished, capsys):
    results, _ = finished
    (row,) = [r for r in list_runs(results) if r.name == RUN]
    data = RunRecord.load(load_summary(RUN, results_dir=results).run_dir).data
    assert (row.model, row.strategy, row.status) == ("test_fmnist_vit", "sqnr_drop", "finished")
    assert row.evaluations == len(data["evaluations"]) and row.images == 48
    assert row.top1 == pytest.approx(data["answer"]["metrics"]["top1"])
    code, out, _ = _cli(capsys, "list", "runs", "--results-dir", results)
    line = next(x for x in out.splitlines() if x.startswith(RUN))
    assert code == 0 and f"{100 * row.top1:.2f}% (48 images)" in line and "sqnr_drop" in line
    code, _, err = _cli(capsys, "list", "runs", "--results-dir", results + "-missing")
    assert code == 2 and "no results folder" in err


def test_trials_in_every_format(finished, capsys):
    results, _ = finished
    rows = trial_rows(RUN, results_dir=results)
    kinds = {r["kind"] for r in rows}
    assert {"uniform baseline", "rule result", "ceiling", "answer"} <= kinds
    code, out, _ = _cli(capsys, "trials", RUN, "--results-dir", results, "--format", "json")
    parsed = json.loads(out)
    assert code == 0 and [t["number"] for t in parsed] == [r["number"] for r in rows]
    assert all(t["state"] == "COMPLETE" for t in parsed)
    assert all(t["params"] for t in parsed if t["kind"] != "ceiling")  # fp32 lies outside the space's params
    answer = next(t for t in parsed if t["kind"] == "answer")
    source = parsed[answer["answer_of"]]
    assert source["values"] == answer["values"] and source["params"] == answer["params"]
    code, out, _ = _cli(capsys, "trials", RUN, "--results-dir", results, "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert len(table) == len(rows) and set(rows[0]["params"]) <= set(table[0])
    code, out, _ = _cli(capsys, "trials", RUN, "--results-dir", results)
    assert code == 0 and len(out.strip().splitlines()) == 1 + len(rows) and f"answer of #{source['number']}" in out
    with pytest.raises(Exception, match="unknown; valid: table, json, csv"):
        format_trials(rows, "xml")


def test_run_from_its_config_file_reproduces_the_config(finished, capsys):
    results, _ = finished
    config = f"{results}/{RUN}/config.yaml"
    code, out, err = _cli(capsys, "run", "--config", config, "--run-name", "from-config", "--no-progress")
    assert code == 0, err
    first, second = (yaml.safe_load(open(f"{results}/{name}/config.yaml")) for name in (RUN, "from-config"))
    assert second.pop("run_name") == "from-config" and first.pop("run_name") == RUN
    assert first == second
    # the same work: every evaluation is taken from the first run, and the summary says so
    summary = load_summary("from-config", results_dir=results)
    assert summary.totals.evaluated == 0 and summary.totals.lent and summary.totals.lent > 0
    assert "taken from other runs of the same work" in out
    # a flag given overrides the file
    code, _, err = _cli(capsys, "run", "--config", config, "--run-name", "seed1", "--seed", "1", "--no-progress")
    assert code == 0, err
    assert yaml.safe_load(open(f"{results}/seed1/config.yaml"))["seed"] == 1


def test_a_resumed_run_is_described_as_the_whole_search(finished, capsys):
    results, _ = finished
    before = load_summary(RUN, results_dir=results).totals
    code, out, err = _cli(capsys, "run", "--strategy", "sqnr_drop", *TINY, "--results-dir", results,
                          "--run-name", RUN)
    assert code == 0, err
    after = load_summary(RUN, results_dir=results).totals
    assert after.invocations == 2 == after.finished_invocations
    assert after.evaluated == before.evaluated and after.last["evaluated"] == 0
    assert after.seconds > before.seconds
    assert f"{before.evaluated} evaluations made over 2 invocations" in out


def test_bad_config_files_are_one_line(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("strategy: sqnr_drop\nlearning_rate: 3\n")
    code, _, err = _cli(capsys, "run", "--config", str(bad))
    assert code == 2 and "unknown setting(s) learning_rate" in err
    code, _, err = _cli(capsys, "run", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such file" in err
    code, _, err = _cli(capsys, "run", "--model", "test_fmnist_vit")
    assert code == 2 and "--strategy is required" in err


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def test_run_help_groups_its_options_and_every_option_says_its_default():
    p = _run_parser()
    titles = [g.title for g in p._action_groups]
    for title in ("model and data", "search", "objective and constraints", "runner", "storage and outputs", "stages"):
        assert title in titles
    formatter = p._get_formatter()
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, action.dest
        assert "default" in formatter._get_help_string(action) % vars(action), action.dest
    text = p.format_help()
    assert "(default: 1000)" in text and "(default: None)" not in text


def test_latency_text_says_what_its_ratios_and_models_are():
    doc = {"run": "r", "model": "m", "provider": "cpu", "threads": 2, "int8": {"format": "u8s8"}, "repeats": 20,
           "load_before": 0.1, "top1_images": 100, "results": {"float": {"1": {"median_ms": 2.0}},
                                                               "int8_gelu": {"1": {"median_ms": 1.0}}},
           "top1": {"float": 0.5, "int8_gelu": 0.25}, "labels": {"float": "float model", "int8_gelu": "qdq"},
           "ratios": {"1": {"int8_gelu/float": {"paired_median": 0.6}}}}
    text = latency_text(doc)
    assert "top-1 50.00% on 100 images" in text and "a paired median" in text
    assert "int8_gelu: ONNX Runtime's own int8 QDQ quantization" in text and "not the searched policy" in text
    assert "int8_gelu/float 0.600" in text

"""Concurrent first use: several `policysearch run` processes started at the same moment on a
storage that does not exist yet all finish, each with its own complete study.

Each process is `python -m policysearch run ...` (run with runpy after its imports, so that all of
them open the storage within milliseconds of each other: started plainly, the seconds of importing
torch spread them out and the schema-creation race is rarely hit)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: imports first, then waits for the go file, then runs the CLI exactly as `python -m policysearch`
_START_TOGETHER = """
import runpy, sys, time
from pathlib import Path
import optuna, policysearch.cli, policysearch.search  # the slow part, before the barrier
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
deadline = time.monotonic() + 600
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.002)
sys.argv = ["policysearch", *sys.argv[3:]]
runpy.run_module("policysearch", run_name="__main__", alter_sys=True)
"""


def _run_at_once(tmp_path: Path, n: int, storage: str) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    go = tmp_path / "go"
    procs = []
    for i in range(n):
        argv = ["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--eval-size", "16",
                "--calib-size", "16", "--batch-size", "16", "--no-progress", "--no-relu-repair",
                "--seed", str(i),  # other work per run: nothing is reused between them, every trial is evaluated
                "--results-dir", str(tmp_path / "results"), "--storage", storage, "--run-name", f"c{i}"]
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _START_TOGETHER, str(tmp_path / f"ready{i}"), str(go), *argv],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 240
        while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
            assert time.monotonic() < deadline, "the processes did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.05)
        go.touch()
        out = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=400)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _check_complete(tmp_path: Path, n: int, storage: str, results: list[subprocess.CompletedProcess]) -> None:
    for i, res in enumerate(results):
        assert res.returncode == 0, f"run c{i} failed: {res.stderr[-2000:]}"
        assert "Traceback" not in res.stderr
    studies = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    assert studies == {f"c{i}" for i in range(n)}
    for i in range(n):
        rec = json.loads((tmp_path / "results" / f"c{i}" / "run.json").read_text())
        study = optuna.load_study(study_name=f"c{i}", storage=storage)
        trials = study.get_trials(deepcopy=False)
        evaluations = [t for t in trials if t.user_attrs.get("kind") != "answer"]
        answers = [t for t in trials if t.user_attrs.get("kind") == "answer"]
        assert rec["status"] == "finished" and rec["evaluated"] == len(rec["evaluations"]) > 0
        assert len(evaluations) == len(rec["evaluations"]) and len(answers) == 1
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert len({t.user_attrs["policy_key"] for t in evaluations}) == len(evaluations)  # no duplicate


@pytest.mark.parametrize("n", [2, 4])
def test_runs_started_at_once_on_a_new_sqlite_storage_all_finish(tmp_path, n):
    storage = f"sqlite:///{tmp_path / 'results' / 'studies.db'}"
    assert not (tmp_path / "results").exists()
    results = _run_at_once(tmp_path, n, storage)
    _check_complete(tmp_path, n, storage, results)


POSTGRES = os.environ.get("POLICYSEARCH_TEST_POSTGRES")  # e.g. postgresql://user@host/empty_db


@pytest.mark.skipif(not POSTGRES, reason="PostgreSQL is not available here: set POLICYSEARCH_TEST_POSTGRES to "
                                         "the URL of an empty database to run it")
def test_runs_started_at_once_on_a_new_postgres_storage_all_finish(tmp_path):
    results = _run_at_once(tmp_path, 2, POSTGRES)
    _check_complete(tmp_path, 2, POSTGRES, results)

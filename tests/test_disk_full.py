"""A run that runs out of space stops with one line and loses nothing it finished.

The results folder, the study or both live on a small tmpfs; once the run has recorded one
evaluation the filesystem is filled (as another process would), so the next write fails with
ENOSPC / "database or disk is full". The run must stop with one :class:`DiskFullError` line,
leave run.json and the study readable, and the same command, once space is freed, must resume
without re-evaluating anything that finished, with run.json listing every evaluation the study holds.
"""
import errno
import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import optuna
import pytest

from policysearch.cli import main
from policysearch.run import DiskFullError, RunRecord
from policysearch.search import SearchConfig, _Loop, search
from policysearch.study import KIND_ANSWER, StudyRecorder

RUN = "full"


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs at ``tmp_path/small`` (skipped where this process may not mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; this process is not root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> Path:
    """Write into ``folder`` until its filesystem is full; the filler's path."""
    path = folder / f"filler-{uuid.uuid4().hex[:6]}"
    chunk = os.urandom(1 << 16)
    with path.open("wb") as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    for n in range(1000):  # the last partial pages too
        try:
            (folder / f"{path.name}-{n}").write_bytes(b"x" * 512)
        except OSError:
            break
    return path


def _places(tmp_path: Path, small: Path, where: str) -> dict:
    results = small / "results" if where in ("both", "results") else tmp_path / "results"
    db = small / "studies.db" if where in ("both", "study") else tmp_path / "studies.db"
    return {"results_dir": str(results), "storage": f"sqlite:///{db}"}


def _config(places: dict) -> SearchConfig:
    return SearchConfig(strategy="uniform", model="test_fmnist_vit", calib_size=32, eval_size=48, batch_size=48,
                        run_name=RUN, relu_repair=False, **places)


def _study_keys(storage: str) -> list[str]:
    study = optuna.load_study(study_name=RUN, storage=storage)
    return [t.user_attrs["policy_key"] for t in study.trials
            if t.state.is_finished() and t.user_attrs.get("kind") != KIND_ANSWER and "policy_key" in t.user_attrs]


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@pytest.mark.parametrize("where", ["both", "results", "study"])
def test_disk_full_stops_with_one_line_and_resume_loses_nothing(tmp_path, small_fs, monkeypatch, capsys, where):
    places = _places(tmp_path, small_fs, where)
    finished: list[str] = []
    original = StudyRecorder.record

    def record_then_fill(self, policy, result, **kw):
        if policy.key() not in finished:
            finished.append(policy.key())
            if len(finished) == 2:  # the second evaluation finished: the disk fills before it is written
                _fill(small_fs)
        return original(self, policy, result, **kw)

    monkeypatch.setattr(StudyRecorder, "record", record_then_fill)
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--eval-size", "48", "--calib-size", "32",
            "--batch-size", "48", "--run-name", RUN, "--no-relu-repair", "--no-progress",
            "--results-dir", places["results_dir"], "--storage", places["storage"]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("policysearch: error: no space left to write") and "\n" not in err, err
    assert "Traceback" not in err and "StorageInternalError" not in err and len(finished) == 2

    run_dir = Path(places["results_dir"]) / RUN
    record = RunRecord.load(run_dir)  # still readable
    assert record.data["status"] in ("failed", "running")
    _study_keys(places["storage"])  # the study too

    for f in small_fs.glob("filler-*"):
        f.unlink()
    monkeypatch.setattr(StudyRecorder, "record", original)
    fresh: list[str] = []
    original_record = _Loop._record

    def note(self, p, r, **kw):
        fresh.append(p.key())
        return original_record(self, p, r, **kw)

    monkeypatch.setattr(_Loop, "_record", note)
    res = search(_config(places), progress=False)
    assert not set(fresh) & set(finished), "a finished evaluation was evaluated again"
    keys = _study_keys(places["storage"])
    assert set(finished) <= set(keys) and len(keys) == len(set(keys)) == len(finished) + res.evaluated
    listed = [e["policy"] for e in RunRecord.load(run_dir).data["evaluations"]]
    assert sorted(listed) == sorted(_digest(k) for k in keys)  # every evaluation, once
    data = json.loads((run_dir / "run.json").read_text())
    assert data["status"] == "finished" and "unrecorded" not in data
    assert not (run_dir / ".reserve").exists()


def test_a_full_disk_at_the_start_is_one_line(tmp_path, small_fs):
    places = _places(tmp_path, small_fs, "both")
    (Path(places["results_dir"]) / RUN).mkdir(parents=True)
    _fill(small_fs)
    with pytest.raises(Exception) as info:
        search(_config(places), progress=False)
    assert isinstance(info.value, (DiskFullError,)) or "cannot write to" in str(info.value)
    assert "\n" not in str(info.value)


def test_an_evaluation_the_study_took_before_a_kill_is_listed_in_run_json_on_resume(tmp_path, monkeypatch):
    """Killed between the study's write and run.json's: the resume lists it and evaluates nothing twice."""
    places = {"results_dir": str(tmp_path / "results"), "storage": f"sqlite:///{tmp_path / 'studies.db'}"}
    calls = []
    original = RunRecord.add_evaluation

    def killed_on_the_second(self, summary, **kw):
        calls.append(summary["policy"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process stops here: the study has it, run.json not
        return original(self, summary, **kw)

    monkeypatch.setattr(RunRecord, "add_evaluation", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        search(_config(places), progress=False)
    assert len(RunRecord.load(tmp_path / "results" / RUN).data["evaluations"]) == 1
    monkeypatch.setattr(RunRecord, "add_evaluation", original)
    res = search(_config(places), progress=False)
    keys = _study_keys(places["storage"])
    assert len(keys) == len(set(keys)) == 2 + res.evaluated  # nothing evaluated twice
    listed = [e["policy"] for e in RunRecord.load(tmp_path / "results" / RUN).data["evaluations"]]
    assert sorted(listed) == sorted(_digest(k) for k in keys)

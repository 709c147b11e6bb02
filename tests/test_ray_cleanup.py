"""A private Ray instance leaves nothing behind when its driver is killed with SIGKILL.

The watchdog (policysearch/runners/_reaper.py, standard library only) is tested on plain process
trees first; the end-to-end test starts a real private Ray instance through the ray runner
(skipped with the reason when Ray is not installed), as tests/test_ray_runner.py does.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from policysearch.runners import _reaper

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="the clean-up reads Linux's /proc")

ROOT = Path(__file__).resolve().parents[1]


def _alive(procs: dict[int, int]) -> list[int]:
    return [p for p, st in procs.items() if _reaper.start_time(p) == st]


def _wait_gone(procs: dict[int, int], timeout: float) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end and _alive(procs):
        time.sleep(0.2)
    return _alive(procs)


def _read_line(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.split(None, 1)[1].strip()
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no {prefix} line from the driver (exit {proc.poll()})")


TREE = """
import subprocess, sys, time
# a child that starts a grandchild and sleeps: the shape of Ray's head (raylet -> agents)
code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); time.sleep(300)"
subprocess.Popen([sys.executable, "-c", code])
time.sleep(300)
"""


def test_the_watchdog_ends_the_tree_when_the_driver_is_killed(tmp_path):
    record = tmp_path / "rec.json"
    driver_code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {TREE!r}])
        time.sleep(1.5)  # the grandchild exists
        dog = subprocess.Popen([sys.executable, "-I", "-S", {_reaper.__file__!r}, str(os.getpid()), {str(record)!r},
                                str(child.pid)], stdin=subprocess.PIPE, start_new_session=True)
        print("READY", child.pid, flush=True)
        time.sleep(300)
    """)
    driver = subprocess.Popen([sys.executable, "-c", driver_code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(_read_line(driver, "READY", 60))
        end = time.monotonic() + 20
        while time.monotonic() < end and not record.is_file():
            time.sleep(0.1)
        tree = _reaper.descendants({child: _reaper.start_time(child)})
        assert len(tree) == 3  # child, grandchild, great-grandchild
        time.sleep(2 * _reaper.POLL_S)
        assert {int(p) for p in json.loads(record.read_text())["procs"]} >= set(tree)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert _wait_gone(tree, 15) == [], "the driver's tree outlived it"
        end = time.monotonic() + 15  # the watchdog removes its record after the tree is gone
        while time.monotonic() < end and record.exists():
            time.sleep(0.1)
        assert not record.exists()
    finally:
        driver.kill()
        _reaper.end(_reaper.descendants({child: st} if (st := _reaper.start_time(child)) else {}), grace=0)


def test_a_record_whose_driver_and_watchdog_are_gone_is_cleaned_at_the_next_start(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        st = _reaper.start_time(sleeper.pid)
        stale = {"driver": gone.pid, "driver_start": 1, "reaper": gone.pid, "reaper_start": 1,
                 "procs": {str(sleeper.pid): st}}
        live = {**stale, "driver": os.getpid(), "driver_start": _reaper.start_time(os.getpid())}
        (tmp_path / "stale.json").write_text(json.dumps(stale))
        (tmp_path / "live.json").write_text(json.dumps(live))
        (tmp_path / "junk.json").write_text("{not json")
        assert _reaper.clean_stale(tmp_path) == [sleeper.pid]
        assert sleeper.wait(timeout=10) is not None
        assert sorted(p.name for p in tmp_path.iterdir()) == ["live.json"]  # a live driver's record stays
    finally:
        sleeper.kill()


def test_a_reused_pid_is_never_signalled(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        assert _reaper.end({sleeper.pid: _reaper.start_time(sleeper.pid) + 1}, grace=0) == []
        assert sleeper.poll() is None
    finally:
        sleeper.kill()


RAY_DRIVER = """
import os, sys, time
sys.path.insert(0, {root!r})
from policysearch.runners.ray import RayRunner
runner = RayRunner(workers=1, num_cpus=1)
runner._start()
print("READY", os.getpid(), flush=True)
time.sleep(600)
"""


def test_a_killed_ray_driver_leaves_no_ray_process(tmp_path):
    pytest.importorskip("ray", reason='Ray is not installed (pip install "policysearch[ray]")')
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    driver = subprocess.Popen([sys.executable, "-c", RAY_DRIVER.format(root=str(ROOT))], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    tree: dict[int, int] = {}
    try:
        pid = int(_read_line(driver, "READY"))
        time.sleep(3)  # the raylet's agents are up
        table = _reaper.proc_table()
        tree = _reaper.descendants({p: st for p, (pp, st) in table.items() if pp == pid}, table)
        watchdog = [p for p in tree if "_reaper.py" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert len(watchdog) == 1 and len(tree) >= 5  # gcs, raylet, agents, ... and the watchdog
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        assert _wait_gone(tree, 30) == [], "Ray processes outlived their driver"
    finally:
        driver.kill()
        _reaper.end(tree, grace=1)

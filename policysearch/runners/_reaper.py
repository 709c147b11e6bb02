"""Clean up a private Ray instance whose driver is gone (standard library only, Linux ``/proc``).

When a driver that started a private Ray instance (``ray.init()`` with no address) dies without
``ray.shutdown()`` (SIGKILL, out of memory), Ray's head processes stop, but the raylet's agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, about 160 MB) linger, orphaned, for a minute or
more. The ray runner therefore starts this file as a small watchdog process (``python -I -S
_reaper.py DRIVER_PID RECORD ROOT_PID...``; it imports neither Ray nor torch): it follows the process
tree under the instance's root processes (the driver's children that ``ray.init`` started), keeps
it in ``RECORD`` (JSON), and when its stdin closes (the driver closed the runner, or died) it ends
every process of that tree still running, then removes the record.

A record whose driver and watchdog are both gone (the watchdog was killed too) is cleaned by
:func:`clean_stale` at the next start of a private instance. Processes are matched by pid *and*
start time, so a reused pid is never signalled.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from pathlib import Path

__all__ = ["children", "clean_stale", "descendants", "end", "proc_table", "start_time"]

#: seconds between looks at the process tree while the driver lives
POLL_S = 0.5
#: seconds a process gets to exit after SIGTERM before SIGKILL
GRACE_S = 3.0


def proc_table() -> dict[int, tuple[int, int]]:
    """``pid -> (ppid, start time in clock ticks)`` of every process (empty without ``/proc``)."""
    out: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        out[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return out


def start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks since boot), None when it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return None if fields[0] == "Z" else int(fields[19])


def children(pid: int) -> dict[int, int]:
    """The direct children of ``pid``: ``pid -> start time``."""
    return {p: st for p, (pp, st) in proc_table().items() if pp == pid}


def descendants(roots: dict[int, int], table: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """``roots`` still running (same start time) and every process below them: ``pid -> start time``."""
    table = proc_table() if table is None else table
    found = {p: st for p, st in roots.items() if table.get(p, (0, None))[1] == st}
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for p, (pp, st) in table.items():
            if pp == parent and p not in found:
                found[p] = st
                frontier.append(p)
    return found


def end(procs: dict[int, int], grace: float = GRACE_S) -> list[int]:
    """SIGTERM every process of ``procs`` still running as recorded, SIGKILL those left after
    ``grace`` seconds; the pids signalled."""
    hit = [p for p, st in procs.items() if p != os.getpid() and start_time(p) == st]
    for p in hit:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(start_time(p) == procs[p] for p in hit):
        time.sleep(0.1)
    for p in hit:
        if start_time(p) == procs[p]:
            _signal(p, signal.SIGKILL)
    return hit


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _write(record: Path, data: dict) -> None:
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(record)


def clean_stale(folder: Path) -> list[int]:
    """End what records in ``folder`` name when their driver and watchdog are both gone; the pids
    signalled. A record of a live driver or watchdog is left alone."""
    hit: list[int] = []
    for record in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(record.read_text())
            owners = [(int(data["driver"]), int(data["driver_start"])), (int(data["reaper"]), int(data["reaper_start"]))]
            procs = {int(p): int(st) for p, st in data["procs"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            record.unlink(missing_ok=True)  # unreadable: nothing to act on
            continue
        if any(start_time(p) == st for p, st in owners):
            continue
        hit += end(descendants(procs))
        record.unlink(missing_ok=True)
    return hit


def watch(driver: int, record: Path, roots: dict[int, int]) -> None:
    """Follow the tree under ``roots`` until stdin closes, then end it (see the module docstring)."""
    known: dict[int, int] = {}
    base = {"driver": driver, "driver_start": start_time(driver), "reaper": os.getpid(),
            "reaper_start": start_time(os.getpid())}
    while True:
        now = descendants({**roots, **known})
        if now.keys() - known.keys():
            known.update(now)
            _write(record, {**base, "procs": {str(p): st for p, st in known.items()}})
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready and not sys.stdin.buffer.read1(4096):  # EOF: the driver closed us, or is gone
            break
    end(descendants({**roots, **known}))
    record.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver
    driver, record = int(argv[0]), Path(argv[1])
    roots = {int(p): st for p in argv[2:] if (st := start_time(int(p))) is not None}
    watch(driver, record, roots)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

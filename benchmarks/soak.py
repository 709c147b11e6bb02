"""A soak under faults: a tpe search killed with SIGKILL at random moments and restarted, then checked.

    python benchmarks/soak.py [--evaluations 200] [--kills 10] [--eval-size 64] [--calib-size 32]
                              [--timeout 7200] [--seed 0] [--model fmnist_vit] [--ray [--workers 2]]
                              [--workdir DIR] [--run-arg=--no-relu-repair ...]

First an uninterrupted run of the same search (``policysearch run --strategy tpe --trials N`` on the
default model, small evaluation size, its own folder and SQLite study) gives the reference answer.
Then the same search runs in a fresh folder and is killed with SIGKILL at random moments (during
set-up, mid-evaluation, between an evaluation and its record) ``--kills`` times, restarted after
each kill with the same command, and left to finish. With ``--ray`` the search runs on a private
Ray instance (``--runner ray_local``) and a random Ray actor of the driver is killed with SIGKILL
now and then as well. Everything is local (loopback only); the whole soak is bounded by
``--timeout`` seconds and by the counts.

Each driver process is this file in ``--child`` mode: the real CLI (``policysearch.cli.main``) with a
log line (fsync'ed) each time the driver has recorded an evaluation (study and run.json) and so
reports it finished. At the end the script prints:

* kills (driver, Ray actor) and restarts;
* evaluations recorded in the study against the distinct policies they are for (and the reference's);
* duplicates: study trials (and run.json entries) for a policy already recorded;
* lost: evaluations a driver reported recorded before a kill that the final study or run.json lacks,
  and whether run.json lists exactly what the study holds;
* re-evaluated: evaluations a killed driver had computed but not yet recorded (done again, not lost);
* whether the final answer equals the uninterrupted run's.

Exit status 0 when nothing was lost or duplicated and the answers are equal, 1 otherwise, 2 when
the soak could not finish (a driver failed, or ``--timeout``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's policysearch, in this process and in the drivers
RUN = "soak"


# -- the driver process -------------------------------------------------------------------------------

def child(log_path: str, argv: list[str]) -> int:
    """The CLI with a durable log line per recorded evaluation (``recorded``) and per result the
    runner returned (``evaluated``, before it is written)."""
    from policysearch import search as search_mod
    from policysearch.cli import main

    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    original = search_mod._Loop._record

    def log(event: str, key: str) -> None:
        os.write(fd, (json.dumps({"event": event, "key": key, "pid": os.getpid()}) + "\n").encode())
        os.fsync(fd)

    def record(self, p, r, **kw):
        log("evaluated", p.key())
        original(self, p, r, **kw)
        log("recorded", p.key())

    search_mod._Loop._record = record
    return main(argv)


# -- the soak -------------------------------------------------------------------------------------------

def _run_argv(args: argparse.Namespace, folder: Path) -> list[str]:
    argv = ["run", "--strategy", "tpe", "--trials", str(args.evaluations), "--model", args.model,
            "--eval-size", str(args.eval_size), "--calib-size", str(args.calib_size), "--seed", str(args.seed),
            "--run-name", RUN, "--results-dir", str(folder / "results"),
            "--storage", f"sqlite:///{folder / 'studies.db'}", "--no-progress"]
    if args.ray:
        argv += ["--runner", "ray_local", "--workers", str(args.workers)]
    return argv + list(args.run_arg)


def _start(args: argparse.Namespace, folder: Path, attempt: int) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    err = (folder / f"driver-{attempt}.err").open("w")
    return subprocess.Popen([sys.executable, __file__, "--child", str(folder / "events.jsonl"), "--",
                             *_run_argv(args, folder)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


def _events(folder: Path) -> list[dict]:
    path = folder / "events.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return out


def _recorded(folder: Path) -> int:
    return sum(e["event"] == "recorded" for e in _events(folder))


class ActorKiller(threading.Thread):
    """Kill a random Ray actor of the driver with SIGKILL every ``mean_s`` seconds on average."""

    def __init__(self, rng: random.Random, mean_s: float) -> None:
        super().__init__(daemon=True)
        from policysearch.runners import _reaper

        self.reaper, self.rng, self.mean_s = _reaper, rng, mean_s
        self.driver: int | None = None
        self.kills = 0
        self.stopped = threading.Event()

    def actors(self) -> list[int]:
        if self.driver is None:
            return []
        table = self.reaper.proc_table()
        tree = self.reaper.descendants({self.driver: table.get(self.driver, (0, -1))[1]}, table)
        out = []
        for pid in tree:
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::_Worker"):
                out.append(pid)
        return out

    def run(self) -> None:
        while not self.stopped.wait(self.rng.expovariate(1 / self.mean_s)):
            found = self.actors()
            if found:
                try:
                    os.kill(self.rng.choice(found), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass


def reference(args: argparse.Namespace, folder: Path, deadline: float) -> tuple[float, float]:
    """The uninterrupted run; (seconds to its first record, seconds per evaluation)."""
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    proc = _start(args, folder, 0)
    first = None
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(_fail(folder, 0, "the reference run did not finish within --timeout"))
        if first is None and _recorded(folder):
            first = time.monotonic() - t0
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(_fail(folder, 0, f"the reference run failed (exit {proc.returncode})"))
    total = time.monotonic() - t0
    first = first or total
    return first, (total - first) / max(1, _recorded(folder) - 1)


def soak(args: argparse.Namespace, folder: Path, setup_s: float, eval_s: float, deadline: float) -> dict:
    """The killed-and-restarted run; what happened."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed + 1)
    killer = ActorKiller(rng, mean_s=max(2.0, 4 * eval_s)) if args.ray else None
    if killer is not None:
        killer.start()
    gap = max(1, (args.evaluations + 4) // (args.kills + 1))  # kills spread over the run, with room to finish
    kills, during_setup, attempt = 0, 0, 0
    while True:
        attempt += 1
        proc = _start(args, folder, attempt)
        if killer is not None:
            killer.driver = proc.pid
        before = _recorded(folder)
        if kills < args.kills:
            after = rng.randint(0, gap)  # 0: during set-up (or resume)
            delay = rng.uniform(0.5, setup_s) if after == 0 else rng.uniform(0, eval_s)
        else:
            after, delay = None, 0.0
        reached = None
        while proc.poll() is None:
            now = time.monotonic()
            if now > deadline:
                proc.kill()
                proc.wait()
                raise SystemExit(_fail(folder, attempt, "the soak did not finish within --timeout"))
            if after is not None and reached is None and _recorded(folder) - before >= after:
                reached = now
            if reached is not None and now - reached >= delay:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                during_setup += _recorded(folder) == before
                break
            time.sleep(0.05)
        if proc.returncode == -signal.SIGKILL and reached is not None:
            continue
        if proc.returncode != 0:
            raise SystemExit(_fail(folder, attempt, f"a driver failed (exit {proc.returncode})"))
        break
    if killer is not None:
        killer.stopped.set()
    return {"kills": kills, "during_setup": during_setup, "restarts": attempt - 1,
            "actor_kills": killer.kills if killer is not None else 0}


def _fail(folder: Path, attempt: int, what: str) -> int:
    err = folder / f"driver-{attempt}.err"
    tail = err.read_text().strip().splitlines()[-5:] if err.is_file() else []
    print(f"soak: {what}; last lines of {err}:", *tail, sep="\n  ", file=sys.stderr)
    return 2


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _state(folder: Path) -> dict:
    """What the study and run.json of the run in ``folder`` hold."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=RUN, storage=f"sqlite:///{folder / 'studies.db'}")
    trials = [t for t in study.trials if t.user_attrs.get("kind") != "answer" and t.state.is_finished()]
    run = json.loads((folder / "results" / RUN / "run.json").read_text())
    return {"keys": [t.user_attrs["policy_key"] for t in trials],
            "listed": [e["policy"] for e in run.get("evaluations", [])],
            "answer": run["answer"]["policy"], "values": run["answer"]["values"], "status": run["status"]}


def report(args: argparse.Namespace, ref: dict, got: dict, events: list[dict], happened: dict, wall: float) -> int:
    keys, listed = got["keys"], got["listed"]
    dup_study = len(keys) - len(set(keys))
    dup_run = len(listed) - len(set(listed))
    recorded = {e["key"] for e in events if e["event"] == "recorded"}
    lost_study = sorted(recorded - set(keys))
    lost_run = sorted({_digest(k) for k in recorded} - set(listed))
    by_pid: dict[int, set] = {}
    for e in events:
        by_pid.setdefault(e["pid"], set()).add((e["event"], e["key"]))
    redone = sum(1 for evs in by_pid.values() for ev, k in evs if ev == "evaluated" and ("recorded", k) not in evs)
    twice = sum(n - 1 for n in Counter(e["key"] for e in events if e["event"] == "recorded").values() if n > 1)
    equal = got["answer"] == ref["answer"] and got["values"] == ref["values"]
    runner = f"ray_local ({args.workers} actors)" if args.ray else "local"
    print(f"soak: {args.model}, tpe, {args.evaluations} trials, eval size {args.eval_size}, calib size "
          f"{args.calib_size}, seed {args.seed}, runner {runner}; wall {wall:.0f} s")
    print(f"kills: {happened['kills']} driver SIGKILLs ({happened['during_setup']} before the killed driver "
          f"recorded anything), {happened['actor_kills']} Ray actor SIGKILLs; restarts {happened['restarts']}")
    print(f"evaluations: {len(keys)} recorded in the study for {len(set(keys))} distinct policies "
          f"(uninterrupted run: {len(ref['keys'])} for {len(set(ref['keys']))}; same policies: "
          f"{'yes' if set(keys) == set(ref['keys']) else 'no'})")
    print(f"duplicates: {dup_study} in the study, {dup_run} in run.json, {twice} recorded twice by the drivers")
    print(f"lost: {len(lost_study)} absent from the study, {len(lost_run)} absent from run.json "
          f"(of {len(recorded)} the drivers reported recorded); run.json lists "
          f"{len(set(listed) & {_digest(k) for k in keys})} of the study's {len(set(keys))}"
          f"{'' if set(listed) == {_digest(k) for k in keys} else ' and others'}")
    print(f"re-evaluated: {redone} (computed but not yet recorded when their driver was killed)")
    print(f"answer: {'equal to' if equal else 'DIFFERENT from'} the uninterrupted run of the same seed "
          f"(values {got['values']} vs {ref['values']})")
    ok = not (dup_study or dup_run or twice or lost_study or lost_run) and equal and got["status"] == "finished"
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--evaluations", type=int, default=200, help="tpe trials (default 200)")
    p.add_argument("--kills", type=int, default=10, help="driver SIGKILLs (default 10)")
    p.add_argument("--eval-size", type=int, default=64, help="evaluation images per policy (default 64)")
    p.add_argument("--calib-size", type=int, default=32, help="calibration images (default 32)")
    p.add_argument("--timeout", type=float, default=7200, help="seconds for the whole soak (default 7200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="fmnist_vit")
    p.add_argument("--ray", action="store_true", help="run on ray_local and kill Ray actors at random too")
    p.add_argument("--workers", type=int, default=2, help="Ray actors with --ray (default 2)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new folder under /tmp")
    p.add_argument("--run-arg", action="append", default=[], help="one more `policysearch run` argument")
    args = p.parse_args(argv)
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            p.error('--ray needs the ray extra (pip install "policysearch[ray]")')
    work = args.workdir or Path(f"/tmp/policysearch-soak-{os.getpid()}")
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    setup_s, eval_s = reference(args, work / "reference", deadline)
    happened = soak(args, work / "soak", setup_s, eval_s, deadline)
    return report(args, _state(work / "reference"), _state(work / "soak"), _events(work / "soak"), happened,
                  time.monotonic() - t0)


if __name__ == "__main__":
    sys.exit(main())

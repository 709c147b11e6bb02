"""The run record and the run fingerprint: what every stage after the search reads.

A run is ``results/<run>/`` plus one Optuna study of the same name. ``run.json`` in the folder is
written by the driver as the run goes (config, fingerprint, baselines, a summary of each
evaluation, the answer, timings); ``export`` and every later stage (finetune, latency, report)
read it, never objects in memory.

The **fingerprint** names everything that changes an evaluation's result: the model and its
architecture arguments, the weights' content hash, the data spec and its exact calibration and
evaluation selections (sizes, seed, and a digest of the selected images once they are loaded),
weight/activation bits, wiring and the numerics version. Results are reused only under an equal
fingerprint; the objective is not part of it (values are recomputed from stored metrics), so a
run that changes only the objective, under a new name, reuses the evaluations of the same work.
"""
from __future__ import annotations

import csv
import datetime as _dt
import errno
import fcntl
import json
import logging
import math
import os
import platform
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import timm
import torch
import yaml

import policysearch
from policysearch.errors import ConfigError
from policysearch.identity import (
    RUN_SETTINGS,
    diff_fingerprints,
    fingerprint_digest,
    refusal,
    setting_changes,
    settings_refusal,
)
from policysearch.policy import Policy, PolicyDocument, write_policy
from policysearch.rundoc import RUN_FORMAT, RunDocument, SearchStage, Stage, read_run_json
from policysearch.study import redact_url, same_storage

__all__ = [
    "RUN_FORMAT",
    "DiskFullError",
    "RunLockedError",
    "RunRecord",
    "SearchOutputs",
    "check_run_name",
    "disk_full",
    "is_disk_full",
    "lock_run",
    "release_space",
    "reserve_space",
    "reserved_space",
    "resolve_run_dir",
]

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]{0,127}")


class RunLockedError(ConfigError):
    """Another live process is writing this run."""


def check_run_name(name: str) -> str:
    """``name`` if it is a plain folder name that stays inside the results folder, else an error."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", "..") or ".." in name:
        shown = name if isinstance(name, str) and len(name) <= 60 else f"{str(name)[:57]}..."
        raise ConfigError(
            f"--run-name {shown!r} is not a plain name: use 1-128 letters, digits and . _ + = @ -, "
            "starting with a letter or digit, no path separators and no '..'"
        )
    return name


def resolve_run_dir(run: str, results_dir: str | Path = "results") -> Path:
    """The folder of run ``run``: a run name under ``results_dir``, or an existing run folder path."""
    path = Path(run)
    if (path / RUN_FILE).is_file() or (path.is_dir() and (path / "policy.json").is_file()):
        return path
    return Path(results_dir) / check_run_name(run)


# -- fingerprint ------------------------------------------------------------------------------

# -- lock -------------------------------------------------------------------------------------

@contextmanager
def lock_run(run_dir: Path, *, path: Path | None = None, where: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (one writer per run).

    ``flock`` locks die with their process, so a lock file left by a killed run never blocks a
    later resume. The file records who holds it, for the message a second process gets. ``path``:
    another lock file for the same run (its study's, next to an SQLite storage), ``where`` says
    where that run lives in the message.
    """
    path = path or run_dir / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            raise RunLockedError(
                f"run {run_dir.name!r} is already running ({holder}{where}); wait for it to finish, "
                "or choose another --run-name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}, "
                      f"folder {run_dir.resolve()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, or one clear error."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to {folder} ({exc.strerror or exc}); choose a writable --results-dir"
        ) from None


# -- disk full --------------------------------------------------------------------------------

class DiskFullError(ConfigError):
    """A write failed for want of space: the run stopped, and the same command resumes it."""


#: kept in the run folder while a run writes, released when a write finds the disk full so that
#: what the run finished can still be written (run.json, or the study on the same filesystem)
RESERVE_FILE = ".reserve"
RESERVE_BYTES = 1 << 20
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FULL_TEXT = ("database or disk is full", "no space left on device", "disk quota exceeded",
              "could not extend file")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the errors it wraps (SQLAlchemy's ``orig``, causes, contexts)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__


def _is_full(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS) or any(t in str(exc).lower() for t in _FULL_TEXT)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it wraps (SQLAlchemy, Optuna), is a write refused for want of space."""
    return any(_is_full(e) for e in _chain(exc))


def disk_full(what: str, exc: BaseException, *, kept: str = "") -> DiskFullError:
    """The one line a run that ran out of space stops with (``kept``: where the unwritten part is)."""
    exc = next((e for e in _chain(exc) if _is_full(e)), exc)
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
        " ".join(str(exc).split())[:160] or type(exc).__name__
    return DiskFullError(
        f"no space left to write {what} ({cause}){kept}; the run stopped: free some space (or choose "
        "another --results-dir / --storage) and run the same command again to resume it"
    )


def reserve_space(run_dir: Path) -> None:
    """Keep :data:`RESERVE_BYTES` allocated in ``run_dir`` while the run writes (see :func:`release_space`)."""
    path = Path(run_dir) / RESERVE_FILE
    try:
        if path.is_file() and path.stat().st_size >= RESERVE_BYTES:
            return
        with path.open("wb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
            except (AttributeError, OSError) as exc:  # not every filesystem allocates ahead
                if is_disk_full(exc):
                    raise
                f.write(os.urandom(RESERVE_BYTES))  # incompressible: really allocated
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise disk_full(f"the run's {RESERVE_BYTES >> 20} MiB reserve in {run_dir}", exc) from None


@contextmanager
def reserved_space(run_dir: Path) -> Iterator[None]:
    """:func:`reserve_space` while the block runs, released when it ends (however it ends)."""
    reserve_space(run_dir)
    try:
        yield
    finally:
        release_space(run_dir)


def release_space(run_dir: Path) -> bool:
    """Free the run's reserve (True when there was one to free)."""
    try:
        (Path(run_dir) / RESERVE_FILE).unlink()
        return True
    except FileNotFoundError:
        return False


# -- the record -------------------------------------------------------------------------------

def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunRecord:
    """``results/<run>/run.json``: read, updated and rewritten atomically as the run goes."""

    def __init__(self, run_dir: Path, data: dict[str, Any]) -> None:
        self.run_dir = Path(run_dir)
        self.data = data

    @property
    def path(self) -> Path:
        return self.run_dir / RUN_FILE

    @property
    def name(self) -> str:
        return str(self.data.get("name", self.run_dir.name))

    @classmethod
    def load(cls, run_dir: Path) -> "RunRecord":
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise ConfigError(f"no run record at {path}; run `policysearch run` first")
        data = read_run_json(path)  # bounded, typed: every problem one ConfigError
        return cls(Path(run_dir), RunDocument.from_json(data, where=str(path)).to_json())  # v1 read as v2

    @property
    def doc(self) -> RunDocument:
        """The record as its typed document."""
        return RunDocument.from_json(self.data, where=str(self.path))

    @classmethod
    def open(cls, run_dir: Path, *, name: str, fingerprint: Mapping[str, Any],
             settings: Mapping[str, Any] | None = None, storage: str | None = None) -> "RunRecord":
        """The record of a new run, or of a resumed one after checking, before any work, its
        fingerprint, its ``settings`` (strategy, space, objective: :data:`RUN_SETTINGS`) and that its
        study lives in ``storage``. A run that stopped before any evaluation does not hold its
        name: a changed run starts afresh under it."""
        path = Path(run_dir) / RUN_FILE
        new_settings = dict(settings or {})
        if path.is_file():
            rec = cls.load(run_dir)
            old = rec.data.get("fingerprint", {})
            stale = [k for k in diff_fingerprints(old, fingerprint) if k != "data_digest"]
            old_settings = rec.settings()
            changed = setting_changes(old_settings, new_settings)
            moved = storage is not None and rec.data.get("storage") is not None and not same_storage(
                str(rec.data["storage"]), storage)
            if (stale or changed or moved) and rec.never_evaluated():
                log.info("run %r stopped before any evaluation (%s); starting it afresh with these options",
                         name, rec.data.get("status"))
            elif moved:
                raise ConfigError(
                    f"run {name!r} in {Path(run_dir)} keeps its study in {rec.data['storage']}, not "
                    f"{redact_url(str(storage))}; resume it with --storage {rec.data['storage']}, "
                    "or choose another --run-name")
            elif stale:
                raise refusal(name, old, fingerprint, stale)
            elif changed:
                raise settings_refusal(name, old_settings, new_settings, changed)
            else:
                rec.data["resumed"] = int(rec.data.get("resumed", 0)) + 1
                rec.data["status"] = "running"
                return rec
        doc = RunDocument(name=name, status="running", created=_now(),
                          search=SearchStage(fingerprint_fields=dict(fingerprint), evaluations=[]))
        return cls(Path(run_dir), doc.to_json())

    def settings(self) -> dict[str, Any]:
        """The recorded :data:`RUN_SETTINGS` (those a record holds)."""
        config = self.data.get("config") or {}
        out = {k: config[k] for k in RUN_SETTINGS if k != "objective" and config.get(k) is not None}
        if self.data.get("objective"):
            out["objective"] = self.data["objective"]
        return out

    def never_evaluated(self) -> bool:
        """A run that stopped before its first evaluation (nothing of it to keep)."""
        return self.data.get("status") != "finished" and not self.data.get("evaluations")

    def check_data(self, digest: str) -> None:
        """The data digest is known once the data is loaded: refuse a changed selection."""
        fp = self.data.setdefault("fingerprint", {})
        old = fp.get("data_digest")
        if old is not None and old != digest:
            raise refusal(self.name, {"data_digest": old}, {"data_digest": digest}, ["data_digest"])
        fp["data_digest"] = digest

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def add_evaluation(self, summary: Mapping[str, Any], *, unrecorded: Mapping[str, Any] | None = None) -> None:
        """Append ``summary``; ``unrecorded``: the whole evaluation, when the study could not take it
        (the next start records it there, :meth:`take_unrecorded`)."""
        self.data.setdefault("evaluations", []).append(dict(summary))
        if unrecorded is not None:
            self.data.setdefault("unrecorded", []).append(dict(unrecorded))
        self.save()

    def take_unrecorded(self) -> list[dict[str, Any]]:
        """The evaluations the study could not take, removed from the record (saved by the caller)."""
        return list(self.data.pop("unrecorded", None) or [])

    def set_stage(self, stage: Stage) -> None:
        """Record a later stage (finetune, latency, report) under ``stages``."""
        stage.updated = _now()
        self.data.setdefault("stages", {})[stage.name] = stage.to_json()
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        tmp = self.path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(_strict(self.data), indent=1, default=str) + "\n")
            tmp.replace(self.path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a partial copy only takes space; run.json is untouched
            raise


def _strict(obj: Any) -> Any:
    """Non-finite floats as strings: run.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


# -- what a search run records ----------------------------------------------------------------

def sensitivity_rows(uniform: Mapping[str, Any], results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """site x method: gamma, beta and SQNR diff under each uniform policy."""
    rows = []
    for method, policy in uniform.items():
        res = results[method]
        for site, choice in policy.items():
            m = res.sites.get(site.name)
            if m is None or choice.method != method:
                continue
            rows.append({"site": site.name, "kind": site.kind, "method": method,
                         "gamma": m.gamma, "beta": m.beta, "sqnr_diff": m.diff})
    return rows


def _versions() -> dict[str, str]:
    return {"policysearch": policysearch.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "optuna": optuna.__version__, "python": platform.python_version()}


def _brief(result: Any) -> dict[str, Any]:
    return {"values": list(result.values), "error": result.error, **dict(result.metrics)}


@dataclass(frozen=True, kw_only=True)
class SearchOutputs:
    """What a finished search leaves: the answer, the baselines and the run's numbers.

    ``feasibility``: the answer under the run's constraints (``feasible``, ``shortfall``, ...);
    ``strategy_report``: ``{"provenance": {...}, "metrics": {...}}`` the strategy gives about its
    answer (e.g. ilp's predicted metrics, ``predicted_<metric>``, beside the measured ones)."""

    objective: Mapping[str, Any]
    space: Any
    policy: Any
    result: Any
    baselines: Mapping[str, Any]
    sensitivity: list[dict[str, Any]]
    float_metrics: Mapping[str, float]
    timings: Mapping[str, float]
    counts: Mapping[str, int]
    feasibility: Mapping[str, Any] | None = None
    strategy_report: Mapping[str, Any] | None = None


def write_outputs(record: RunRecord, out: SearchOutputs) -> None:
    """config.yaml, policy.json, sensitivity.csv, and the finished run record."""
    run_dir = record.run_dir
    objective, space, policy, result = out.objective, out.space, out.policy, out.result
    feasibility, strategy_report = out.feasibility, out.strategy_report
    resolved = {**record.data.get("config", {}), "objective": dict(objective), "space": space.to_dict()}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    history = [*record.data.get("invocations", []),  # every finished invocation: the whole search's figures
               {"finished": _now(), **out.counts, **dict(out.timings)}]
    record.data.update(
        status="finished", finished=_now(), timings=dict(out.timings), **out.counts, invocations=history,
        baselines={m: _brief(r) for m, r in out.baselines.items()}, float_metrics=dict(out.float_metrics),
        answer={"policy": policy.to_dict(), "values": list(result.values),
                "metrics": {**result.metrics, **dict((strategy_report or {}).get("metrics", {})),
                            "sites": {k: v.to_dict() for k, v in result.sites.items()}},
                **({"feasible": feasibility.get("feasible"), "shortfall": feasibility.get("shortfall", {})}
                   if feasibility else {})},
        outputs={"policy": "policy.json", "config": "config.yaml", "sensitivity": "sensitivity.csv"},
        versions=_versions(),
    )
    for name, value in (("constraints", feasibility), ("strategy_report", (strategy_report or {}).get("provenance"))):
        if value:
            record.data[name] = dict(value)
        else:
            record.data.pop(name, None)  # from an earlier finish of this run
    write_policy(run_dir / "policy.json", policy_document(record))
    with (run_dir / "sensitivity.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["site", "kind", "method", "gamma", "beta", "sqnr_diff"])
        writer.writeheader()
        writer.writerows(out.sensitivity)
    record.save()


def policy_document(record: RunRecord) -> Any:
    """The policy JSON document of a finished run, built from its record alone."""
    data = record.data
    if data.get("status") != "finished" or "answer" not in data:
        raise ConfigError(f"run {record.name!r} has not finished (status {data.get('status')!r}); "
                          "run the same `policysearch run` command again to finish it")
    config, fp, answer = data.get("config", {}), data.get("fingerprint", {}), data["answer"]
    metrics = {**answer["metrics"], "values": answer["values"],
               "float_top1": data.get("float_metrics", {}).get("top1")}
    provenance = {"strategy": config.get("strategy"), "objective": data.get("objective", {}).get("name"),
                  "space": config.get("space"), "seed": config.get("seed"), "data": config.get("data"),
                  "eval_size": config.get("eval_size"), "calib_size": config.get("calib_size"),
                  "run_name": record.name, "fingerprint": fingerprint_digest(fp),
                  "created": data.get("finished", data.get("created")), "versions": data.get("versions", {})}
    if data.get("constraints"):  # --max-latency / --min-top1: whether the answer meets them, and by how much not
        cons = data["constraints"]
        provenance.update(constraints=cons.get("constraints", {}), feasible=cons.get("feasible"),
                          shortfall=cons.get("shortfall", {}))
    if data.get("strategy_report"):  # what the strategy says about its answer (ilp: predicted vs measured)
        provenance["strategy_report"] = data["strategy_report"]
    if data.get("headroom"):  # float, ceiling, best uniform, answer; headroom and verdict with intervals
        metrics["headroom"] = data["headroom"]
        metrics["verdict"] = {k: v for k, v in data.get("verdict", {}).items() if k != "best"}
    if data.get("picked"):  # export --pick best: which evaluated policy this is instead of the answer
        provenance["picked"] = data["picked"]
    model = {"name": config.get("model"), "checkpoint": config.get("checkpoint"),
             "args": fp.get("model_args", {}), "weights": fp.get("weights")}
    for stage in sorted(record.doc.stages.values(), key=lambda st: st.policy_rank):
        stage.policy_fields(metrics=metrics, provenance=provenance, model=model)  # latency, training, ...
    return PolicyDocument(policy=Policy.from_dict(answer["policy"]), model=model, metrics=metrics,
                          provenance=provenance, wiring=fp.get("wiring"))

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
from policysearch.identity import diff_fingerprints, fingerprint_digest, refusal
from policysearch.policy import Policy, PolicyDocument, write_policy
from policysearch.rundoc import RUN_FORMAT, RunDocument, SearchStage, Stage, read_run_json

__all__ = [
    "RUN_FORMAT",
    "RunLockedError",
    "RunRecord",
    "SearchOutputs",
    "check_run_name",
    "lock_run",
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
def lock_run(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (one writer per run).

    ``flock`` locks die with their process, so a lock file left by a killed run never blocks a
    later resume. The file records who holds it, for the message a second process gets.
    """
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunLockedError(
                f"run {run_dir.name!r} is already running ({holder}); wait for it to finish, "
                "or choose another --run-name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}".encode(), 0)
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
    def open(cls, run_dir: Path, *, name: str, fingerprint: Mapping[str, Any]) -> "RunRecord":
        """The record of a new run, or of a resumed one after checking its fingerprint."""
        path = Path(run_dir) / RUN_FILE
        if path.is_file():
            rec = cls.load(run_dir)
            old = rec.data.get("fingerprint", {})
            stale = [k for k in diff_fingerprints(old, fingerprint) if k != "data_digest"]
            if stale:
                raise refusal(name, old, fingerprint, stale)
            rec.data["resumed"] = int(rec.data.get("resumed", 0)) + 1
            rec.data["status"] = "running"
            return rec
        doc = RunDocument(name=name, status="running", created=_now(),
                          search=SearchStage(fingerprint_fields=dict(fingerprint), evaluations=[]))
        return cls(Path(run_dir), doc.to_json())

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

    def add_evaluation(self, summary: Mapping[str, Any]) -> None:
        self.data.setdefault("evaluations", []).append(dict(summary))
        self.save()

    def set_stage(self, stage: Stage) -> None:
        """Record a later stage (finetune, latency, report) under ``stages``."""
        stage.updated = _now()
        self.data.setdefault("stages", {})[stage.name] = stage.to_json()
        self.save()

    def save(self) -> None:
        self.data["updated"] = _now()
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_strict(self.data), indent=1, default=str) + "\n")
        tmp.replace(self.path)


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
    record.data.update(
        status="finished", finished=_now(), timings=dict(out.timings), **out.counts,
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

"""Evaluate on a pool of Ray actors: one per GPU, or one per group of CPU cores, on one machine or a cluster.

``RayRunner`` starts a private Ray instance on this machine (``address: local``) or joins a running
cluster (``address: auto`` or ``HOST:PORT``, ``ray://HOST:PORT``), then keeps a pool of actors.
Each actor builds its evaluator once from the :class:`~policysearch.spec.EvaluatorSpec` (model,
calibration, float references, its own caches), which travels through Ray's object store once
(``ray.put``); afterwards only policies go out and :class:`~policysearch.result.EvalResult` s come
back. ``capacity`` is the number of actors. ``stream`` (the driver's loop) keeps every actor busy:
each time an evaluation finishes, its result goes to the driver (which tells the strategy) and the
freed actor gets the strategy's next policy at once (when it has one), so no actor waits for the
slowest of a batch; ``map`` is the same loop over a fixed list.

Faults: an actor that dies (killed, out of memory, its node lost) is replaced by a new actor, and
the policy it was evaluating is retried on that other actor, at most ``max_retries`` times; after
that the policy's result is a failed one naming the reason, which the driver records as a failed
trial, and the search goes on. ``max_restarts`` deaths in a row without any finished evaluation
in between mean the pool itself is broken: the runner raises and the run can be resumed later.
An exception the evaluator raises for a policy is handled as the local runner handles it
(:func:`~policysearch.runners.local.safe_evaluate`), so both runners give the same results.

Every actor reports what it loaded (content hash of the weights, digest of the calibration and
evaluation images, numerics version); anything that differs from the driver's is refused, so a
cluster node with other files cannot put other results under the run's fingerprint.

Only the driver writes the study and ``run.json``; actors return results and nothing else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.exceptions as rayexc
import torch

from policysearch import __version__
from policysearch.errors import ConfigError, PolicySearchError
from policysearch.models.zoo import weights_identity
from policysearch.numerics import NUMERICS_VERSION
from policysearch.objectives import Objective, load_objective
from policysearch.policy import Policy
from policysearch.result import EvalResult
from policysearch.runners import _reaper
from policysearch.runners.base import Feed, Runner, feed_list
from policysearch.runners.local import safe_evaluate

__all__ = ["RayRunner", "WorkerPoolError"]

log = logging.getLogger(__name__)

#: Errors that mean "the actor (or its node) is gone", not "this policy raised".
_DEATHS = (rayexc.RayActorError, rayexc.WorkerCrashedError, rayexc.NodeDiedError, rayexc.ObjectLostError,
           rayexc.OutOfMemoryError, rayexc.LocalRayletDiedError)
_WAIT_S = 0.5  # ray.wait slice: a Ctrl-C in the driver is handled within this time


class WorkerPoolError(PolicySearchError, RuntimeError):
    """The pool cannot work: actors keep dying, or Ray cannot place them. Resume the run later."""


class _Worker:
    """The actor: builds the evaluator once (``load``), then evaluates policy after policy."""

    def __init__(self, threads: int, fault: Mapping[str, Any] | None, generation: int) -> None:
        torch.set_num_threads(threads)
        self.threads = threads
        self.fault = dict(fault or {})
        self.generation = generation
        self.count = 0
        self.spec_key: str | None = None
        self.evaluator: Any = None

    def load(self, spec: Any) -> dict[str, Any]:
        self.spec_key = None
        t0 = time.perf_counter()
        identity = _identity(spec)
        self.evaluator = spec.evaluator()
        self.spec_key = spec.key()
        return {**identity, "data_digest": self.evaluator.data_digest, "build_s": time.perf_counter() - t0,
                "node": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads(),
                "device": str(self.evaluator.device)}

    def evaluate(self, policy: Policy, spec_key: str) -> tuple[EvalResult, float]:
        if self.spec_key != spec_key:
            raise RuntimeError("this Ray worker has no evaluator for the spec (its load failed)")
        self.count += 1
        self._maybe_die(policy)
        t0 = time.perf_counter()
        time.sleep(float(self.fault.get("slow_policies", {}).get(policy.key(), 0.0)))
        result = safe_evaluate(self.evaluator, policy)
        return result, time.perf_counter() - t0

    def _maybe_die(self, policy: Policy) -> None:
        """Fault injection for tests (``inject_fault``): end this process abruptly."""
        nth = self.fault.get("exit_on_eval")
        if nth is not None and self.generation == 0 and self.count == int(nth):
            os._exit(17)
        if policy.key() in set(self.fault.get("exit_on_policies", ())):
            os._exit(17)


def _identity(spec: Any) -> dict[str, Any]:
    """What decides an actor's results besides the spec itself: weights and numerics."""
    return {"weights": weights_identity(spec.model, spec.checkpoint), "numerics": NUMERICS_VERSION,
            "policysearch": __version__}


@dataclass
class _Slot:
    """One place in the pool: the current actor there and what it has loaded and evaluated."""

    index: int
    generation: int
    actor: Any
    created: float = field(default_factory=time.monotonic)
    spec_key: str | None = None
    load_ref: Any = None
    checked: bool = False  # its load result was checked against the driver's identity
    dead: bool = False  # killed (its work dropped): replaced at the next map
    recent: deque = field(default_factory=lambda: deque(maxlen=2))  # policies it evaluated last


def _prefix(a: Policy, b: Policy) -> int:
    """How many leading sites ``a`` and ``b`` share (the evaluator restarts at the first change)."""
    if (a.weight_bits, a.act_bits) != (b.weight_bits, b.act_bits) or a.sites != b.sites:
        return 0
    n = 0
    for x, y in zip(a.choices, b.choices):
        if x != y:
            break
        n += 1
    return n


class RayRunner(Runner):
    """A pool of Ray actors (see the module docstring).

    Options (the ``runners/ray_*.yaml`` presets set them; ``--address`` / ``--workers`` override):

    * ``address``: ``local`` (start a private Ray instance here; the default), ``auto`` (join the
      cluster ``ray start`` runs on this machine or that ``RAY_ADDRESS`` names), ``HOST:PORT`` or
      ``ray://HOST:PORT``. When this process already called ``ray.init``, that instance is used.
    * ``workers``: actors in the pool, or ``auto``: one per ``gpus_per_worker`` GPUs when the
      cluster has GPUs, otherwise one per ``cpus_per_worker`` CPU cores.
    * ``cpus_per_worker``: CPU cores per actor; torch in the actor uses as many threads.
    * ``gpus_per_worker``: GPUs per actor (``auto``: 1 when the cluster has GPUs, else 0 = CPU actors).
    * ``num_cpus`` / ``num_gpus``: resources of the private instance (``address: local`` only;
      default: the whole machine).
    * ``max_retries``: how often a policy whose actor died is retried on another actor.
    * ``max_restarts``: actor deaths in a row, with no evaluation finished in between, before the
      runner gives up (default: ``(max_retries + 1) * workers + 1``).
    * ``startup_timeout_s``: how long the pool may stay without any result before the runner
      reports that Ray cannot start it (no node with the resources an actor asks for).
    * ``init_options``: extra keyword arguments for ``ray.init``.
    * ``inject_fault``: for tests only. ``{exit_on_eval: k}``: every first-generation actor ends
      its process abruptly at its k-th evaluation; ``{exit_on_policies: [key, ...]}``: any actor
      does so whenever it is given one of these policies; ``{slow_policies: {key: seconds}}``: any
      actor takes that much longer to evaluate one of these policies (a straggler).
    """

    def __init__(self, *, address: str | None = "local", workers: int | str = "auto", cpus_per_worker: int = 1,
                 gpus_per_worker: float | str = "auto", num_cpus: int | None = None, num_gpus: int | None = None,
                 max_retries: int = 2, max_restarts: int | None = None, startup_timeout_s: float = 1800.0,
                 init_options: Mapping[str, Any] | None = None,
                 inject_fault: Mapping[str, Any] | None = None) -> None:
        if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"ray runner: workers must be a positive integer or 'auto', got {workers!r}")
        if isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, int) or cpus_per_worker < 1:
            raise ConfigError(f"ray runner: cpus_per_worker must be a positive integer, got {cpus_per_worker!r}")
        if gpus_per_worker != "auto" and (isinstance(gpus_per_worker, bool)
                                          or not isinstance(gpus_per_worker, (int, float)) or gpus_per_worker < 0):
            raise ConfigError(f"ray runner: gpus_per_worker must be >= 0 or 'auto', got {gpus_per_worker!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"ray runner: max_retries must be an integer >= 0, got {max_retries!r}")
        if max_restarts is not None and (not isinstance(max_restarts, int) or max_restarts < 0):
            raise ConfigError(f"ray runner: max_restarts must be an integer >= 0, got {max_restarts!r}")
        if address is not None and not isinstance(address, str):
            raise ConfigError(f"ray runner: address must be a string (local, auto, HOST:PORT), got {address!r}")
        for key, n in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise ConfigError(f"ray runner: {key} must be an integer >= 0, got {n!r}")
        if isinstance(startup_timeout_s, bool) or not isinstance(startup_timeout_s, (int, float)) \
                or not 0 < startup_timeout_s < float("inf"):
            raise ConfigError(f"ray runner: startup_timeout_s must be a positive number, got {startup_timeout_s!r}")
        for key, opts in (("init_options", init_options), ("inject_fault", inject_fault)):
            if opts is not None and not isinstance(opts, Mapping):
                raise ConfigError(f"ray runner: {key} must be a mapping, got {type(opts).__name__}")
        unknown = set(inject_fault or {}) - {"exit_on_eval", "exit_on_policies", "slow_policies"}
        if unknown:
            raise ConfigError(f"ray runner: unknown inject_fault key(s) {', '.join(sorted(map(str, unknown)))}")
        self.address = address or "local"
        self.workers_option = workers
        self.cpus_per_worker = cpus_per_worker
        self.gpus_option = gpus_per_worker
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.max_retries = max_retries
        self.max_restarts_option = max_restarts
        self.startup_timeout_s = float(startup_timeout_s)
        self.init_options = dict(init_options or {})
        self.fault = dict(inject_fault) if inject_fault else None
        self._owns_ray = False
        self._watchdog: subprocess.Popen | None = None
        self._slots: list[_Slot] = []
        self._gpus_per_worker = 0.0
        self._actor_cls: Any = None
        self._spec_refs: dict[str, tuple[Any, Any]] = {}  # driver spec key -> (actor spec, ObjectRef)
        self._expected: dict[str, dict[str, Any]] = {}
        self._deaths_in_row = 0
        #: counters for benchmarks and reports: evaluations, deaths, retries, failed (after retries),
        #: eval_s (time inside the actors' evaluate), wall_s (submit -> result in the driver), build_s
        self.stats: dict[str, float] = {"evaluations": 0, "deaths": 0, "retries": 0, "failed": 0,
                                        "eval_s": 0.0, "wall_s": 0.0, "build_s": 0.0}

    # -- the pool ------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:  # type: ignore[override]
        self._start()
        return len(self._slots)

    @property
    def max_restarts(self) -> int:
        if self.max_restarts_option is not None:
            return self.max_restarts_option
        return (self.max_retries + 1) * max(len(self._slots), 1) + 1

    def _start(self) -> None:
        if self._slots:
            return
        self._connect()
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        if self.gpus_option == "auto":
            self._gpus_per_worker = 1.0 if gpus >= 1 else 0.0
        else:
            self._gpus_per_worker = float(self.gpus_option)
        if self.workers_option == "auto":
            if self._gpus_per_worker > 0:
                n = int(gpus // self._gpus_per_worker)
                n = min(n, int(cpus // self.cpus_per_worker)) if cpus else n
            else:
                n = int(cpus // self.cpus_per_worker)
            if n < 1:
                raise ConfigError(
                    f"ray runner: the Ray cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s), not enough for one "
                    f"worker of {self.cpus_per_worker} CPU(s) and {self._gpus_per_worker:g} GPU(s)")
        else:
            n = int(self.workers_option)
            need_cpu, need_gpu = n * self.cpus_per_worker, n * self._gpus_per_worker
            if need_cpu > cpus or need_gpu > gpus:
                raise ConfigError(
                    f"ray runner: {n} workers of {self.cpus_per_worker} CPU(s) and {self._gpus_per_worker:g} GPU(s) "
                    f"need {need_cpu:g} CPUs and {need_gpu:g} GPUs; the Ray cluster has {cpus:g} CPUs and "
                    f"{gpus:g} GPUs (`ray status` shows them)")
        self._slots = [self._new_slot(i, 0) for i in range(n)]
        kind = f"{self._gpus_per_worker:g} GPU" if self._gpus_per_worker else f"{self.cpus_per_worker} CPU"
        where = "a private local Ray instance" if self.address == "local" else f"the Ray cluster at {self.address}"
        log.info("ray runner: %d workers (%s each) on %s", n, kind, where if self._owns_ray else "this process's Ray")

    def _connect(self) -> None:
        if ray.is_initialized():  # e.g. a notebook or a test that called ray.init: use that instance
            log.info("ray runner: using the Ray instance this process already joined (address %r not used)",
                     self.address)
            return
        options: dict[str, Any] = {"include_dashboard": False, **self.init_options}
        if self.address == "local":
            # a private instance on this machine: no usage reporting, no token prompts
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            if self.num_cpus is not None:
                options.setdefault("num_cpus", self.num_cpus)
            if self.num_gpus is not None:
                options.setdefault("num_gpus", self.num_gpus)
        elif self.num_cpus is not None or self.num_gpus is not None:
            raise ConfigError("ray runner: num_cpus/num_gpus size a local Ray instance; a cluster's nodes "
                              "declare their own resources (ray start --num-cpus ...)")
        else:
            options.pop("include_dashboard")  # the cluster's head decides
            _probe(self.address)
        private = self.address == "local"
        before = _before_private_start() if private else {}
        try:
            ray.init(address=self.address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            hint = ("; start one with `ray start --head` (and `ray start --address=HEAD:6379` on the other "
                    "machines), or use --runner ray_local") if self.address != "local" else ""
            raise ConfigError(f"ray runner: cannot connect to Ray at {self.address!r} "
                              f"({_first_line(exc)}){hint}") from None
        self._owns_ray = True
        if private:
            self._watchdog = _start_watchdog(before)

    def _new_slot(self, index: int, generation: int) -> _Slot:
        if self._actor_cls is None:
            self._actor_cls = ray.remote(_Worker).options(
                num_cpus=self.cpus_per_worker, num_gpus=self._gpus_per_worker, max_restarts=0, max_task_retries=0)
        actor = self._actor_cls.remote(self.cpus_per_worker, self.fault, generation)
        return _Slot(index=index, generation=generation, actor=actor)

    def _actor_spec(self, spec: Any) -> tuple[Any, Any]:
        """The spec actors build from (its device set for the pool's kind) and its object-store ref."""
        key = spec.key()
        if key not in self._spec_refs:
            device = spec.device
            if self._gpus_per_worker > 0:
                device = "cuda" if device in ("auto",) or device.startswith("cuda") else device
            elif device == "auto":
                device = "cpu"
            actor_spec = dataclasses.replace(spec, device=device) if device != spec.device else spec
            self._spec_refs = {key: (actor_spec, ray.put(actor_spec))}  # one spec at a time, like get_evaluator
            self._expected[key] = self._driver_identity(spec)
        return self._spec_refs[key]

    @staticmethod
    def _driver_identity(spec: Any) -> dict[str, Any]:
        return {**_identity(spec), "data_digest": spec.evaluator().data_digest}

    def _ensure_loaded(self, slot: _Slot, actor_spec: Any, ref: Any) -> None:
        key = actor_spec.key()
        if slot.spec_key != key:
            slot.load_ref = slot.actor.load.remote(ref)  # actor tasks run in order: before its evaluations
            slot.spec_key, slot.checked = key, False

    def _check_loaded(self, slot: _Slot, expected: Mapping[str, Any]) -> None:
        """Compare what the actor loaded with the driver's; raise the actor's own load error."""
        if slot.checked:
            return
        try:
            info = ray.get(slot.load_ref)
        except rayexc.RayTaskError as exc:
            cause = _cause(exc)
            raise ConfigError(f"a Ray worker could not build the evaluator: {_one_line(cause)}") from None
        differ = [k for k in ("weights", "numerics", "policysearch", "data_digest") if info.get(k) != expected.get(k)]
        if differ:
            shown = "; ".join(f"{k}: driver {expected.get(k)!r}, worker {info.get(k)!r}" for k in differ)
            raise ConfigError(
                f"the Ray worker on {info.get('node')} loaded other inputs than the driver ({shown}); every "
                "machine must have the same policysearch version, checkpoint and data at the same paths")
        self.stats["build_s"] += float(info.get("build_s", 0.0))
        slot.checked = True
        log.debug("ray worker %d (pid %s on %s): %s threads, %s, built in %.1fs", slot.index, info.get("pid"),
                  info.get("node"), info.get("threads"), info.get("device"), info.get("build_s", 0.0))

    def _replace(self, slot: _Slot) -> _Slot:
        self._kill(slot)
        new = self._new_slot(slot.index, slot.generation + 1)
        self._slots[slot.index] = new
        return new

    @staticmethod
    def _kill(slot: _Slot) -> None:
        slot.dead = True
        with contextlib.suppress(Exception):  # already gone
            ray.kill(slot.actor, no_restart=True)

    # -- map and stream ------------------------------------------------------------------------
    def map(self, spec: object, policies: Sequence[Policy]) -> Iterator[tuple[Policy, EvalResult]]:
        """:meth:`stream` over a fixed list."""
        policies = list(policies)
        return self.stream(spec, feed_list(policies)) if policies else iter(())

    def stream(self, spec: object, feed: Feed) -> Iterator[tuple[Policy, EvalResult]]:
        """Keep every actor busy: ``feed(free actors)`` at the start and after each result yielded.

        A dead actor's policy is retried first, before anything new is fed."""
        self._start()
        for slot in list(self._slots):
            if slot.dead:
                self._replace(slot)
        actor_spec, ref = self._actor_spec(spec)
        expected = self._expected[spec.key()]
        n_values = len(_directions(spec))
        queue: deque[tuple[Policy, int]] = deque()  # (policy, deaths so far): retries first, then fed ones
        idle: list[_Slot] = list(self._slots)
        inflight: dict[Any, tuple[_Slot, Policy, int, float]] = {}

        def refill() -> None:
            free = len(idle) - len(queue)
            if free > 0:
                queue.extend((p, 0) for p in feed(free))

        try:
            refill()
            t_idle = time.monotonic()
            while queue or inflight:
                while queue and idle:
                    policy, deaths = queue.popleft()
                    slot = max(idle, key=lambda s: (max((_prefix(policy, q) for q in s.recent), default=-1), -s.index))
                    idle.remove(slot)
                    self._ensure_loaded(slot, actor_spec, ref)
                    task = slot.actor.evaluate.remote(policy, actor_spec.key())
                    inflight[task] = (slot, policy, deaths, time.perf_counter())
                done, _ = ray.wait(list(inflight), num_returns=1, timeout=_WAIT_S)
                if not done:
                    if time.monotonic() - t_idle > self.startup_timeout_s and not self._any_loaded(inflight):
                        raise WorkerPoolError(
                            f"ray runner: no worker built its evaluator in {self.startup_timeout_s:g}s; does the cluster "
                            f"have nodes with {self.cpus_per_worker} CPU(s) and {self._gpus_per_worker:g} GPU(s) "
                            "free for each worker? (`ray status` shows them)")
                    continue
                t_idle = time.monotonic()
                for task in done:
                    slot, policy, deaths, t0 = inflight.pop(task)
                    try:
                        result, eval_s = ray.get(task)
                    except _DEATHS as exc:
                        reason = _first_line(exc)
                        idle.insert(0, self._on_death(slot, policy, reason))  # a new actor in its place
                        deaths += 1
                        if deaths <= self.max_retries:
                            self.stats["retries"] += 1
                            queue.appendleft((policy, deaths))
                            continue
                        self.stats["failed"] += 1
                        log.warning("giving up on a policy after %d Ray worker deaths: %s", deaths, reason)
                        result = EvalResult.failed(
                            n_values, f"Ray worker died {deaths} times evaluating this policy (last: {reason})")
                    except rayexc.ActorUnschedulableError as exc:
                        raise WorkerPoolError(f"ray runner: Ray cannot place a worker ({_first_line(exc)})") from None
                    except rayexc.RayTaskError as exc:
                        self._check_loaded(slot, expected)  # a failed load explains it
                        raise _cause(exc) from None  # what the local runner would raise
                    else:
                        self._check_loaded(slot, expected)
                        self._deaths_in_row = 0
                        slot.recent.append(policy)
                        self.stats["evaluations"] += 1
                        self.stats["eval_s"] += eval_s
                        self.stats["wall_s"] += time.perf_counter() - t0
                        idle.append(slot)
                    yield policy, result  # the consumer handles it (tells the strategy) before we go on
                    refill()
        finally:
            for slot, *_ in list(inflight.values()):  # stopped early (Ctrl-C, an error): drop their work
                self._kill(slot)

    @staticmethod
    def _any_loaded(inflight: Mapping[Any, tuple[_Slot, Policy, int, float]]) -> bool:
        """Whether any actor with work in flight has built its evaluator (so Ray could place it)."""
        loads = [slot.load_ref for slot, *_ in inflight.values() if slot.load_ref is not None]
        ready, _ = ray.wait(loads, num_returns=len(loads), timeout=0) if loads else ([], [])
        return bool(ready)

    def _on_death(self, slot: _Slot, policy: Policy, reason: str) -> _Slot:
        self.stats["deaths"] += 1
        self._deaths_in_row += 1
        log.warning("Ray worker %d died while evaluating a policy (%s); starting another", slot.index, reason)
        if self._deaths_in_row > self.max_restarts:
            raise WorkerPoolError(f"ray runner: {self._deaths_in_row} Ray workers died in a row without finishing an "
                               f"evaluation (last: {reason}); giving up (resume the run once the cluster is healthy)")
        return self._replace(slot)

    def close(self) -> None:
        """Kill the actors; shut Ray down when this runner started it."""
        slots, self._slots = self._slots, []
        self._spec_refs.clear()
        self._actor_cls = None
        if not ray.is_initialized():
            return
        for slot in slots:
            self._kill(slot)
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
            _stop_watchdog(self._watchdog)
            self._watchdog = None


# -- a private instance leaves nothing behind ----------------------------------------------------------

def _watchdog_dir() -> Path:
    """Where the watchdogs keep their records (one per private instance; per user)."""
    return Path(tempfile.gettempdir()) / f"policysearch-ray-{os.getuid()}"


def _before_private_start() -> dict[int, int]:
    """Before ``ray.init`` starts a private instance: end what an earlier driver's instance left
    (its driver and watchdog both gone), and note this process's children (``pid -> start``)."""
    if not Path("/proc/self/stat").is_file():  # the clean-up reads Linux's /proc
        return {}
    ended = _reaper.clean_stale(_watchdog_dir())
    if ended:
        log.info("ray runner: ended %d process(es) a killed driver's private Ray instance left", len(ended))
    return _reaper.children(os.getpid())


def _start_watchdog(before: Mapping[int, int]) -> subprocess.Popen | None:
    """A watchdog process (:mod:`policysearch.runners._reaper`) over the processes ``ray.init``
    just started (this process's new children): it ends them if this process dies without
    ``ray.shutdown()``."""
    if not Path("/proc/self/stat").is_file():
        return None
    roots = [p for p, st in _reaper.children(os.getpid()).items() if before.get(p) != st]
    folder = _watchdog_dir()
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        record = folder / f"{os.getpid()}-{time.time_ns()}.json"
        return subprocess.Popen(
            [sys.executable, "-I", "-S", _reaper.__file__, str(os.getpid()), str(record), *map(str, roots)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        log.warning("ray runner: no watchdog for the private Ray instance (%s); if this process is killed, "
                    "`ray stop` ends what it leaves", exc)
        return None


def _stop_watchdog(watchdog: subprocess.Popen | None) -> None:
    """After ``ray.shutdown()``: the watchdog ends anything left and exits."""
    if watchdog is None:
        return
    with contextlib.suppress(OSError):
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=_reaper.GRACE_S + 5)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _probe(address: str, timeout: float = 5.0) -> None:
    """Fail in one line when nothing listens at ``HOST:PORT`` (``ray.init`` would retry for minutes)."""
    if address == "auto":
        return  # Ray itself fails at once when it finds no cluster
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        host, port = hostport, "10001" if address.startswith("ray://") else "6379"
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(
            f"ray runner: cannot connect to Ray at {address!r} (nothing answers at {host}:{port}: {exc}); start "
            "the head with `ray start --head` (and `ray start --address=HEAD:6379` on the other machines), "
            "or use --runner ray_local") from None


def _directions(spec: Any) -> tuple[str, ...]:
    obj = spec.objective
    objective = load_objective(obj) if isinstance(obj, str) else Objective.from_dict(obj)
    return tuple(objective.directions)


def _cause(exc: rayexc.RayTaskError) -> BaseException:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, PolicySearchError):
        return str(exc)
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


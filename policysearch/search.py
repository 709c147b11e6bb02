"""Set-up and the one driver loop: ask -> runner.stream -> record -> tell, for every strategy.

``search(config)`` checks everything it can before any work (names, device, storage, the run
folder, the run's fingerprint), then builds the evaluator, replays what the study and studies of
the same work already hold (resume), evaluates the rest, always adds the uniform baselines, and
leaves ``results/<run>/``: run.json (the record later stages read), config.yaml, policy.json,
sensitivity.csv. Every trial says what it is (``kind``: uniform baseline, rule result, search
candidate); the answer is published as one more trial of kind ``answer`` with policy.json attached
(:func:`policysearch.study.publish_answer`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import re
import shlex
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from policysearch import runners
from policysearch.device import DEVICE_PATTERN, resolve_device
from policysearch.errors import ConfigError, PolicySearchError
from policysearch.identity import data_identity
from policysearch.models.wiring import WIRINGS
from policysearch.models.zoo import weights_identity
from policysearch.numerics import NUMERICS_VERSION
from policysearch.objectives import load_objective
from policysearch.objectives.headroom import best_uniform, ceiling_policy, compare, headroom, verdict
from policysearch.objectives.latency import (
    Constraints,
    derive_metrics,
    evaluator_objective,
    resolve_profile,
    uses_metric,
)
from policysearch.objectives.repair import REPAIR_VERSION, RepairSettings
from policysearch.policy import Policy
from policysearch.report.dashboard import annotate, verdict_attrs
from policysearch.result import EvalResult
from policysearch.run import (
    RUN_FILE,
    RunRecord,
    SearchOutputs,
    check_run_name,
    check_writable,
    disk_full,
    is_disk_full,
    lock_run,
    release_space,
    reserved_space,
    sensitivity_rows,
    write_outputs,
)
from policysearch.runners.base import Feed
from policysearch.spaces import load_space
from policysearch.spec import EvaluatorSpec, get_evaluator
from policysearch.strategies import STRATEGIES, create_strategy
from policysearch.strategies.sqnr import SQNRRule
from policysearch.study import (
    KIND_CANDIDATE,
    KIND_CEILING,
    KIND_RULE,
    KIND_UNIFORM,
    StudyRecorder,
    StudyWriteError,
    default_storage,
    redact_url,
    run_lock_path,
)

__all__ = ["SearchConfig", "SearchResult", "WorkSource", "run_fingerprint", "search", "strategy_feed"]

log = logging.getLogger(__name__)

@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """Everything a run needs; validated once here."""

    strategy: str = "sqnr_diff"
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    model: str = "fmnist_vit"
    checkpoint: str | None = None
    #: architecture overrides (None: the model's own, or inferred from the checkpoint)
    num_classes: int | None = None
    img_size: int | None = None
    in_chans: int | None = None
    data: str = "fmnist-sample"
    space: str = "paper"
    objective: str = "kl"
    runner: str = "local"
    #: options for the runner over its preset's (e.g. ray: address, workers); never part of the
    #: fingerprint: the same work run locally or on Ray gives the same results and resumes across runners
    runner_options: Mapping[str, Any] = field(default_factory=dict)
    trials: int | None = None
    seed: int = 0
    weight_bits: int = 8
    act_bits: int = 8
    #: "paper": every method in one integer pipeline (I-ViT's); "native": each as its paper wires it
    wiring: str = "paper"
    storage: str | None = None
    run_name: str | None = None
    device: str = "auto"
    results_dir: str = "results"
    calib_size: int | None = None
    #: evaluation images scored per policy (the first N of the data's evaluation split, class
    #: balanced in the shipped sample); None = all. 1000 keeps the default job within a minute.
    eval_size: int | None = 1000
    batch_size: int = 256
    #: cost profile (``policysearch profile``) for the ``latency`` metric; None: when a latency
    #: objective or constraint needs one, <results_dir>/profiles/<model>-cpu-b8.json if it exists,
    #: else the method catalogue's costs, else an error saying to profile the model first
    profile: str | None = None
    #: constraints on the answer (policysearch.objectives.latency.Constraints): relative latency at
    #: most, top-1 (a fraction) at least; the best feasible policy is exported, else the closest
    max_latency: float | None = None
    min_top1: float | None = None
    #: a GELU site choosing ``relu`` is evaluated with its block's MLP repaired by a short
    #: distillation to the float block (policysearch.objectives.repair; cached under
    #: <results_dir>/cache/relu_repair); False: ``relu`` only swaps the activation
    relu_repair: bool = True

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits"):
            v = getattr(self, name)
            if not 2 <= v <= 16:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [2, 16], got {v}")
        for name in ("eval_size", "calib_size", "trials", "num_classes", "img_size", "in_chans"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"--device {self.device[:40]!r} is not a device; use auto, cpu, cuda or cuda:N")

        if self.wiring not in WIRINGS:
            raise ConfigError(f"--wiring {self.wiring[:40]!r} is unknown; valid: {', '.join(WIRINGS)}")
        if self.run_name is not None:
            check_run_name(self.run_name)

        Constraints(max_latency=self.max_latency, min_top1=self.min_top1)  # validates both

    @property
    def constraints(self) -> Any:
        """The answer's :class:`~policysearch.objectives.latency.Constraints`."""
        return Constraints(max_latency=self.max_latency, min_top1=self.min_top1)

    @property
    def model_args(self) -> dict[str, int]:
        return {k: v for k, v in (("num_classes", self.num_classes), ("img_size", self.img_size),
                                  ("in_chans", self.in_chans)) if v is not None}


@dataclass(kw_only=True)
class SearchResult:
    run_dir: Path
    run_name: str
    policy: Policy
    result: EvalResult
    baselines: dict[str, EvalResult]
    float_metrics: dict[str, float]
    evaluated: int
    reused: int
    sensitivity: list[dict[str, Any]]
    #: the answer under --max-latency / --min-top1: feasible, shortfall, counts (None without constraints)
    feasibility: dict[str, Any] | None = None
    #: what the strategy reports about its answer (``strategy.report(policy)``, e.g. ilp's predictions)
    strategy_report: dict[str, Any] | None = None
    #: run.json's ``headroom`` and ``verdict`` (policysearch.objectives.headroom, as dicts)
    headroom: dict[str, Any] | None = None
    verdict: dict[str, Any] | None = None


def _run_name(config: SearchConfig) -> str:
    if config.run_name:
        return config.run_name
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", config.model)[:60].strip("-.") or "model"
    return f"{model}-{config.strategy}-w{config.weight_bits}a{config.act_bits}-{stamp}"


class WorkSource(Protocol):
    """Model and data given in memory rather than named by ``config.model`` / ``config.data`` (the
    Python API, :mod:`policysearch.api`): the run's fingerprint and evaluator spec come from it."""

    def fingerprint(self, config: SearchConfig) -> dict[str, Any]: ...

    def spec(self, doc: Any, **overrides: Any) -> EvaluatorSpec: ...


def search(config: SearchConfig, *, progress: bool = True, source: WorkSource | None = None) -> SearchResult:
    """Run the search ``config`` describes; see the module docstring. ``source``: the model and
    data in memory (``config.model`` and ``config.data`` then only name them)."""

    t_start = time.perf_counter()
    objective = load_objective(config.objective)
    strategy_cls = STRATEGIES.get(config.strategy)  # a bad name fails before any work
    latency = _latency_model(config, objective, strategy_cls)  # a missing profile too
    runner = runners.create_runner(config.runner, **config.runner_options)
    resolve_device(config.device)
    run_name = _run_name(config)
    run_dir = Path(config.results_dir) / run_name
    check_writable(run_dir)
    storage = config.storage or default_storage(config.results_dir)
    fingerprint = run_fingerprint(config) if source is None else source.fingerprint(config)
    settings = {"strategy": config.strategy, "space": config.space, "objective": objective.to_dict()}
    study_lock = run_lock_path(storage, run_name)  # the same name from another --results-dir waits on it too
    with lock_run(run_dir), (lock_run(run_dir, path=study_lock, where=f", with its study in {redact_url(storage)}")
                             if study_lock is not None else nullcontext()), reserved_space(run_dir):
        # checked before any work; a refusal leaves the run as it was
        record = RunRecord.open(run_dir, name=run_name, fingerprint=fingerprint, settings=settings, storage=storage)
        recorder = StudyRecorder(
            storage=storage, study_name=run_name, directions=objective.directions,
            fingerprint=fingerprint, objective=objective.to_dict(), run_dir=run_dir, settings=settings,
            attrs={"strategy": config.strategy, "model": config.model, "data": config.data,
                   "space": config.space, "objective": objective.name, "wiring": config.wiring},
        )
        finished_before = record.data.get("finished") is not None and record.data.get("answer") is not None
        try:
            record.update(config=config_dict(config), objective=objective.to_dict(),
                          storage=redact_url(storage), study=run_name)
            spec = (EvaluatorSpec.from_run if source is None else source.spec)(
                record.doc, objective=evaluator_objective(objective).to_dict(),
                repair_cache_dir=str(Path(config.results_dir) / "cache" / "relu_repair"),
                progress=progress and isinstance(runner, runners.LocalRunner),  # calibration; no bars in workers
            )
            return _search(config, spec, objective, runner, record, recorder, progress, t_start, latency)
        except BaseException as exc:  # a refused resume of a finished run leaves it finished (its answer stands)
            _mark_stopped(run_dir, exc, keep_finished=finished_before and isinstance(exc, ConfigError))
            if is_disk_full(exc) and not isinstance(exc, PolicySearchError):
                raise disk_full(f"the run {run_name!r} (in {run_dir} or {redact_url(storage)})", exc) from None
            raise


def run_fingerprint(config: SearchConfig) -> dict[str, Any]:
    """The fingerprint fields of a search config (``data_digest`` is added once data is loaded)."""
    return {
        "model": config.model,
        "model_args": dict(config.model_args),
        "weights": weights_identity(config.model, config.checkpoint),
        "data": data_identity(config.data),
        "calib_size": config.calib_size,
        "eval_size": config.eval_size,
        "seed": config.seed,
        "weight_bits": config.weight_bits,
        "act_bits": config.act_bits,
        "wiring": config.wiring,
        "numerics": NUMERICS_VERSION,
        "relu_repair": _repair_identity(config),
    }


def _repair_identity(config: SearchConfig) -> dict[str, Any] | None:
    """The ReLU repair settings that change results (None: ``relu`` only swaps the activation)."""
    if not config.relu_repair:
        return None
    return {"version": REPAIR_VERSION, **RepairSettings().key_fields()}


def _latency_model(config: SearchConfig, objective: Any, strategy_cls: Any) -> Any:
    """The latency model the run needs (a latency objective, --max-latency, or --min-top1 for a
    strategy that budgets with costs), or the one --profile names; None otherwise."""
    takes_profile = "profile" in {f.name for f in fields(strategy_cls.Options)}
    needed = (uses_metric(objective, "latency") or config.max_latency is not None
              or (config.min_top1 is not None and takes_profile))
    return resolve_profile(config.profile, model=config.model, results_dir=config.results_dir, needed=needed)


def _reconcile(record: Any, recorder: Any, objective: Any) -> None:
    """On resume: evaluations the study could not take (kept in run.json) go into the study, and
    every evaluation the study holds is listed in run.json (a run stopped between the two writes)."""
    unrecorded = record.take_unrecorded()
    for item in unrecorded:
        policy, result = Policy.from_dict(item["policy"]), EvalResult.from_dict(item["result"])
        when = {k: _dt.datetime.fromisoformat(item[k]) if item.get(k) else None for k in ("started", "finished")}
        recorder.record(policy, result, tag=item.get("tag", ""), kind=item.get("kind"),
                        uniform_method=item.get("uniform_method"), **when)
    listed = {e.get("policy") for e in record.data.get("evaluations", [])}
    results = recorder.completed(objective)
    added = 0
    for t in recorder.evaluation_trials():
        digest = _digest(t["key"])
        if t["tag"] != "reused" and digest not in listed and t["key"] in results:
            record.data.setdefault("evaluations", []).append(
                _summary_of(digest, t["counts"], results[t["key"]], t["tag"], t["seconds"]))
            listed.add(digest)
            added += 1
    if unrecorded or added:
        log.info("resuming: %d evaluation(s) recorded in the study from run.json, %d listed in run.json "
                 "from the study", len(unrecorded), added)
        record.save()


def _mark_stopped(run_dir: Path, exc: BaseException, *, keep_finished: bool = False) -> None:
    if not (run_dir / RUN_FILE).is_file():
        return
    try:
        record = RunRecord.load(run_dir)
        if record.data.get("status") == "running":
            if keep_finished:
                record.update(status="finished")
                return
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            record.update(status=status, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    except Exception:  # noqa: BLE001 - never hide the original error
        log.debug("could not mark run %s as stopped", run_dir, exc_info=True)


def _search(config: SearchConfig, spec: Any, objective: Any, runner: Any, record: Any, recorder: Any,
            progress: bool, t_start: float, latency: Any = None) -> SearchResult:
    evaluator = get_evaluator(spec)  # the driver needs the sites; local runners reuse it
    record.check_data(evaluator.data_digest)
    recorder.set_data_digest(evaluator.data_digest)
    _check_constraints(config, evaluator, latency)
    space = load_space(config.space, evaluator.sites, weight_bits=config.weight_bits, act_bits=config.act_bits)
    options = dict(config.strategy_options)
    if config.trials is not None:
        options["trials"] = config.trials
    for name, value in (("max_latency", config.max_latency), ("min_top1", config.min_top1), ("profile", latency)):
        if value is not None:  # a strategy that budgets takes them; others ignore them
            options.setdefault(name, value)
    strategy = create_strategy(config.strategy, space, directions=objective.directions, seed=config.seed, **options)
    recorder.set_choices({s.name: [str(c) for c in space.choices(s.name)] for s in space.sites},
                         space=config.space)
    _reconcile(record, recorder, objective)
    record.update(float_metrics=dict(evaluator.float_metrics), sites=len(evaluator.sites))
    t_setup = time.perf_counter()
    loop = _Loop(recorder=recorder, record=record, runner=runner, spec=spec, objective=objective,
                 progress=progress, kind_of=_kinds(space, strategy), total=_planned(strategy, space),
                 derive=lambda p, r, fresh: derive_metrics(r, p, objective=objective, latency=latency, fresh=fresh))
    try:
        loop.drive(strategy)
        baselines = {m: loop.evaluate(p) for m, p in space.uniform_policies().items()}
        ceiling = loop.evaluate(ceiling_policy(space))  # recorded and reused, never told to the strategy
    finally:
        runner.close()
        loop.close()
    best, feasibility = _answer(config, strategy, space, baselines, objective)
    if best is None:
        raise ConfigError("the search finished without any successful evaluation (every result failed)")
    policy, result = best
    report = getattr(strategy, "report", None)  # optional: what the strategy says about its answer
    strategy_report = report(policy) if callable(report) else None
    sensitivity = sensitivity_rows(space.uniform_policies(), baselines)
    record.data.update(_assess(config, record.name, space, objective, strategy, evaluator.float_metrics,
                               baselines, ceiling, policy, result))
    t_end = time.perf_counter()
    write_outputs(record, SearchOutputs(
        objective=objective.to_dict(), space=space, policy=policy, result=result, baselines=baselines,
        sensitivity=sensitivity, float_metrics=dict(evaluator.float_metrics),
        timings={"setup_s": round(t_setup - t_start, 3), "search_s": round(t_end - t_setup, 3),
                 "total_s": round(t_end - t_start, 3)},
        counts={"evaluated": loop.evaluated, "reused": loop.reused, "lent": loop.lent_used},
        feasibility=feasibility, strategy_report=strategy_report))
    _publish_answer(config, record, recorder, policy)
    return SearchResult(
        run_dir=record.run_dir, run_name=record.name, policy=policy, result=result, baselines=baselines,
        float_metrics=dict(evaluator.float_metrics), evaluated=loop.evaluated, reused=loop.reused,
        sensitivity=sensitivity, feasibility=feasibility, strategy_report=strategy_report,
        headroom=record.data["headroom"], verdict=record.data["verdict"],
    )


def _check_constraints(config: SearchConfig, evaluator: Any, latency: Any) -> None:
    """Once the evaluator is built: the profile covers its sites; --min-top1 has labels to use."""
    if latency is not None:
        latency.check(evaluator.sites)
        if latency.model is not None and latency.model != config.model:
            log.warning("the cost profile %s was measured on %s, not %s", latency.source, latency.model, config.model)
    if config.min_top1 is not None and not evaluator.float_metrics.get("top1", float("nan")) >= 0:
        raise ConfigError(f"--min-top1 needs labelled evaluation images; the data {config.data!r} has none")


def _answer(config: SearchConfig, strategy: Any, space: Any, baselines: Mapping[str, EvalResult],
            objective: Any) -> tuple[tuple[Policy, EvalResult] | None, dict[str, Any] | None]:
    """``strategy.best()``, or under constraints the best feasible evaluated policy (else the
    closest), with its feasibility record."""
    constraints = config.constraints
    if not constraints.active:
        return strategy.best(), None
    evaluated = {p.key(): (p, r) for p, r in strategy.results.values() if space.contains(p)}
    for method, p in space.uniform_policies().items():
        evaluated.setdefault(p.key(), (p, baselines[method]))
    return constraints.choose(strategy.best(), list(evaluated.values()), objective.directions)


def _assess(config: SearchConfig, run_name: str, space: Any, objective: Any, strategy: Any,
            float_metrics: Mapping[str, float], baselines: Mapping[str, EvalResult], ceiling: EvalResult,
            policy: Policy, result: EvalResult) -> dict[str, Any]:
    """run.json's ``headroom`` and ``verdict`` (policysearch.objectives.headroom)."""
    cons = config.constraints
    command = f"policysearch export {shlex.quote(run_name)} --pick best" + (
        f" --results-dir {shlex.quote(config.results_dir)}" if config.results_dir != "results" else "")
    room = headroom(float_metrics=float_metrics, ceiling=ceiling, baselines=baselines, answer=result)
    judged = verdict(objective=objective, answer=(policy, result), baselines=baselines,
                     uniform=space.uniform_policies(), export_command=command,
                     evaluated=[(p, r) for p, r in strategy.results.values() if space.contains(p)],
                     feasible=(lambda r: not cons.shortfall(r.metrics)) if cons.active else None)
    best = best_uniform(baselines)  # every uniform baseline against the best, paired (the summary's intervals)
    versus = {f"uniform {m}": compare(f"uniform {m}", r, f"uniform {best}", baselines[best]).to_dict()
              for m, r in baselines.items() if best is not None and m != best}
    return {"headroom": {**room.to_dict(), "vs_best_uniform": versus}, "verdict": judged.to_dict()}


def _planned(strategy: Any, space: Any) -> int | None:
    """At most how many policies the run handles (the progress bar's total; None: not known
    ahead, e.g. ilp): the strategy's, the uniform baselines and the ceiling."""
    uniform = len(space.uniform_policies())
    trials = getattr(strategy.options, "trials", None)
    if isinstance(strategy, SQNRRule):
        n = uniform + 1
    elif strategy.name == "uniform":
        n = uniform
    elif isinstance(trials, int):  # the optuna strategies; tpe first runs sqnr_diff (uniforms + its pick)
        n = trials + uniform + (1 if hasattr(strategy, "warm") else 0)
    elif strategy.name == "exhaustive":
        n = uniform + sum(len(space.choices(s.name)) - 1 for s in space.sites)
    else:
        return None
    return n + 1


def _kinds(space: Any, strategy: Any) -> Any:
    """``policy -> (kind, uniform method or None, run.json tag)``: what each trial is, for the
    study's readers (uniform baselines, an SQNR rule's pick, any other strategy's candidates)."""

    uniform = {p.key(): m for m, p in space.uniform_policies().items()}
    other = KIND_RULE if isinstance(strategy, SQNRRule) else KIND_CANDIDATE  # a rule asks uniforms + its pick
    tag = {KIND_UNIFORM: "baseline", KIND_RULE: "rule", KIND_CANDIDATE: "candidate", KIND_CEILING: "ceiling"}
    ceiling = ceiling_policy(space).key()

    def kind_of(policy: Policy) -> tuple[str, str | None, str]:
        method = uniform.get(policy.key())
        kind = KIND_CEILING if policy.key() == ceiling else KIND_UNIFORM if method is not None else other
        return kind, method, tag[kind]

    return kind_of


def _publish_answer(config: SearchConfig, record: Any, recorder: Any, policy: Policy) -> None:
    """The answer as a trial of kind ``answer`` with policy.json attached; its numbers in run.json."""
    artifact_dir = Path(config.results_dir) / "artifacts"
    attrs = verdict_attrs(record.data)  # the answer trial says what it is and how it compares
    pub = recorder.publish_answer(policy, stage="search", artifacts=[record.run_dir / "policy.json"],
                                  artifact_dir=artifact_dir, attrs=attrs)
    record.data["answer"].update(trial=pub.number, evaluation_trial=pub.source)
    record.update(artifacts=str(artifact_dir))
    for key in ("verdict", "headroom"):  # the dashboard's study note reads them
        recorder.study.set_user_attr(key, attrs.get(key, ""))
    annotate(recorder.study)  # notes for optuna-dashboard, when it is installed


def config_dict(config: SearchConfig) -> dict[str, Any]:
    return {**asdict(config), "strategy_options": dict(config.strategy_options),
            "runner_options": dict(config.runner_options)}


class _Loop:
    """ask -> (cache | runner.stream) -> record -> tell."""

    def __init__(self, *, recorder: Any, record: Any, runner: Any, spec: Any, objective: Any,
                 progress: bool, kind_of: Any = None, derive: Any = None, total: int | None = None) -> None:
        self.recorder, self.record, self.runner, self.spec = recorder, record, runner, spec
        self.kind_of = kind_of or (lambda policy: ("search candidate", None, "candidate"))
        #: (policy, result, fresh) -> result with the driver's derived metrics (latency, error)
        self.derive = derive or (lambda policy, result, fresh: result)
        self.derived: set[str] = set()  # cache keys whose result carries the derived metrics
        self.cache: dict[str, EvalResult] = recorder.completed(objective)
        self.in_study = set(self.cache)
        self.lent, donors = recorder.reusable(objective)
        self.donors = donors
        self.evaluated = 0
        self.reused = 0
        self.lent_used = 0  # policies taken from other runs of the same work
        self.objective = objective
        self.best: float | None = None  # the best single objective value so far (the bar's postfix)
        self._started: dict[str, tuple[float, _dt.datetime]] = {}  # policy key -> when it went to the runner
        if self.cache:
            log.info("resuming: %d evaluations already in the study", len(self.cache))
        if self.lent:
            log.info("reusing %d evaluations of the same work from run(s) %s", len(self.lent), ", ".join(donors))
        self.bar = _progress(progress, total)

    def close(self) -> None:
        if self.bar is not None:
            if self.bar.total is not None and self.bar.n < self.bar.total:
                self.bar.total = self.bar.n  # the planned total was an upper bound (repeats, early stop)
                self.bar.refresh()
            self.bar.close()

    def _tick(self, result: EvalResult, *, fresh: bool, candidate: bool = True) -> None:
        """One more policy handled: the bar's count, and the best value so far as its postfix."""
        if self.bar is None:
            return
        directions = self.objective.directions
        if candidate and result.ok and len(directions) == 1 and len(result.values) == 1:  # not the ceiling
            v, better = float(result.values[0]), (min if directions[0] == "minimize" else max)
            self.best = v if self.best is None else better(self.best, v)
        if self.bar.total is not None and self.bar.n + 1 > self.bar.total:
            self.bar.total = None  # more than planned: say no total rather than a wrong one
        self.bar.update(1)
        post = {"evaluated": self.evaluated, "reused": self.reused}
        if self.best is not None:
            post[f"best {self.objective.name}"] = f"{self.best:.4g}"
        self.bar.set_postfix(post, refresh=fresh)

    def _cached(self, policy: Policy) -> EvalResult | None:
        key = policy.key()
        hit = self.cache.get(key)
        if hit is not None:
            if key not in self.derived:  # read back from the study: derive once, under this run's profile
                hit = self.cache[key] = self.derive(policy, hit, False)
                self.derived.add(key)
            return hit
        if key in self.lent:
            hit = self.derive(policy, self.lent[key], False)
            self.derived.add(key)
            self.lent_used += 1
            kind, method, _ = self.kind_of(policy)
            self.recorder.record(policy, hit, tag="reused", reused_from=",".join(self.donors), kind=kind,
                                 uniform_method=method)
            self.cache[key] = hit
        return hit

    def drive(self, strategy: Any) -> None:
        """Run ``strategy`` to the end through ``runner.stream``: the runner pulls policies as it
        has room (cached and reused ones are told at once, never evaluated) and each result is
        recorded, then told, as it arrives."""
        def lookup(policy: Policy) -> EvalResult | None:
            hit = self._cached(policy)
            if hit is not None:
                self.reused += 1
                self._tick(hit, fresh=False)
            return hit

        ask = strategy_feed(strategy, lookup)

        def feed(n: int) -> list[Policy]:
            todo = ask(n)
            self._submitted(todo)
            return todo

        stream = self.runner.stream(self.spec, feed)
        try:
            for p, r in self._recorded(stream):
                strategy.tell(p, r)
        finally:
            _close(stream)  # stopped early: the runner drops the work in flight now, not at garbage collection
        if not strategy.finished:
            raise RuntimeError(f"strategy {type(strategy).__name__} asked nothing but is not finished")

    def evaluate(self, policy: Policy) -> EvalResult:
        cached = self._cached(policy)
        if cached is not None:
            return cached
        self._submitted([policy])
        results = self.runner.map(self.spec, [policy])
        try:
            return next(self._recorded(results))[1]
        finally:
            _close(results)

    def _submitted(self, policies: list[Policy]) -> None:
        now = time.perf_counter(), _dt.datetime.now()
        for p in policies:
            self._started[p.key()] = now

    def _recorded(self, results: Iterator[tuple[Policy, EvalResult]]) -> Iterator[tuple[Policy, EvalResult]]:
        """Each fresh result with the derived metrics, recorded (study, run.json) before it is passed on."""
        for p, r in results:
            t1, finished = time.perf_counter(), _dt.datetime.now()
            t0, started = self._started.pop(p.key(), (t1, finished))
            r = self.derive(p, r, True)
            self.derived.add(p.key())
            self._record(p, r, started=started, finished=finished, seconds=t1 - t0)
            self.cache[p.key()] = r
            self.evaluated += 1
            self._tick(r, fresh=True, candidate=self.kind_of(p)[0] != KIND_CEILING)
            yield p, r

    def _record(self, p: Policy, r: EvalResult, *, started: _dt.datetime, finished: _dt.datetime,
                seconds: float) -> None:
        """One finished evaluation into the study and run.json. A write that fails (disk full)
        frees the run's reserve and is tried once more; an evaluation the study still cannot take
        is kept whole in run.json for the next start; then the run stops with one line."""
        kind, method, tag = self.kind_of(p)

        def to_study() -> None:
            self.recorder.record(p, r, tag=tag, started=started, finished=finished, kind=kind, uniform_method=method)

        failed: list[tuple[str, BaseException]] = []  # what could not be written at the first try, and why
        study_error = _failed(to_study)
        if study_error is not None:
            failed.append((f"the study ({redact_url(self.recorder.storage_url)})", study_error))
            if release_space(self.record.run_dir):
                study_error = _failed(to_study)
        kept = None if study_error is None else {
            "policy": p.to_dict(), "result": r.to_dict(), "tag": tag, "kind": kind, "uniform_method": method,
            "started": started.isoformat(), "finished": finished.isoformat()}
        run_error = _failed(lambda: self.record.add_evaluation(_summary(p, r, tag, seconds), unrecorded=kept))
        if run_error is not None:
            failed.append((str(self.record.path), run_error))
            if release_space(self.record.run_dir):
                run_error = _failed(self.record.save)
        if failed:
            raise _write_stop(failed, in_study=study_error is None, in_run=run_error is None)


def _write_stop(failed: list[tuple[str, BaseException]], *, in_study: bool, in_run: bool) -> BaseException:
    """The error a run stops with when an evaluation's record could not be written at once."""
    what, cause = failed[0]
    if isinstance(cause, StudyWriteError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if not is_disk_full(cause):
        return failed[0][1]
    kept = ("; the evaluation was recorded with the run's space reserve" if in_study and in_run else
            "; the evaluation is kept in run.json and goes into the study on resume" if in_run else
            "; the evaluation is in the study and run.json lists it on resume" if in_study else
            "; the last evaluation could not be written and is evaluated again on resume")
    return disk_full(" and ".join(w for w, _ in failed), cause, kept=kept)


def _failed(write: Callable[[], None]) -> BaseException | None:
    """Run ``write``; the storage or file-system error it raised, else None."""
    try:
        write()
    except (StudyWriteError, OSError) as exc:
        log.debug("write failed", exc_info=True)
        return exc
    return None


def strategy_feed(strategy: Any, lookup: Callable[[Policy], EvalResult | None] | None = None) -> Feed:
    """The driver's feed for :meth:`~policysearch.runners.base.Runner.stream`.

    ``feed(n)`` asks ``strategy`` for up to ``n`` policies; one that ``lookup`` answers (a result
    already in the study, or reused from another run) is told at once and asked past, so the feed
    returns only policies to evaluate, up to ``n``; ``[]`` when the strategy has none to give now
    (finished, or waiting for the results in flight).
    """
    def feed(n: int) -> list[Policy]:
        todo: list[Policy] = []
        while len(todo) < n and (asked := strategy.ask(n - len(todo))):
            for p in asked:
                hit = lookup(p) if lookup is not None else None
                if hit is None:
                    todo.append(p)
                else:
                    strategy.tell(p, hit)
        return todo

    return feed


def _close(results: Iterator[Any]) -> None:
    close = getattr(results, "close", None)
    if callable(close):
        close()


def _summary(policy: Policy, result: EvalResult, tag: str, seconds: float) -> dict[str, Any]:
    return _summary_of(_digest(policy.key()), policy.method_counts(), result, tag, seconds)


def _digest(key: str) -> str:
    """run.json's name of a policy (its key's hash)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _summary_of(digest: str, counts: Mapping[str, Any], result: EvalResult, tag: str, seconds: float) -> dict[str, Any]:
    metrics = {k: result.metrics.get(k) for k in ("top1", "agreement", "kl", "logit_sqnr", "latency")
               if k in result.metrics}
    return {"policy": digest, "tag": tag, "counts": dict(counts), "values": list(result.values), **metrics,
            "error": result.error, "seconds": round(seconds, 3)}


def _progress(enabled: bool, total: int | None = None) -> Any:
    """The run's bar: policies handled (evaluated or reused) of at most ``total``, with an ETA."""
    if not enabled:
        return None
    return tqdm(desc="policies", total=total, unit=" policy", leave=False, dynamic_ncols=True)

"""The one driver loop: ask -> map -> tell -> record, for every strategy.

``search(config)`` resolves the space, objective, strategy and runner, replays what the study
already holds (resume), evaluates the rest, always adds the uniform baselines for the summary,
and writes ``results/<run>/``: config.yaml, policy.json, sensitivity.csv.
"""
from __future__ import annotations

import csv
import datetime as _dt
import logging
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from policysearch.errors import ConfigError
from policysearch.policy import Policy, PolicyDocument, write_policy
from policysearch.result import EvalResult

__all__ = ["SearchConfig", "SearchResult", "search"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """Everything a run needs; validated once here."""

    strategy: str = "sqnr_diff"
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    model: str = "fmnist_vit"
    checkpoint: str | None = None
    data: str = "fmnist-sample"
    space: str = "paper"
    objective: str = "kl"
    runner: str = "local"
    trials: int | None = None
    seed: int = 0
    weight_bits: int = 8
    act_bits: int = 8
    storage: str | None = None
    run_name: str | None = None
    device: str = "auto"
    results_dir: str = "results"
    calib_size: int | None = None
    #: evaluation images scored per policy (the first N of the data's evaluation split, class
    #: balanced in the shipped sample); None = all. 1000 keeps the default job within a minute.
    eval_size: int | None = 1000
    batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits"):
            v = getattr(self, name)
            if not 2 <= v <= 16:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [2, 16], got {v}")
        if self.eval_size is not None and self.eval_size < 1:
            raise ConfigError(f"--eval-size must be positive, got {self.eval_size}")
        if self.trials is not None and self.trials < 1:
            raise ConfigError(f"--trials must be positive, got {self.trials}")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name):
            raise ConfigError(f"--run-name must be a plain name, got {self.run_name!r}")


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


def _run_name(config: SearchConfig) -> str:
    if config.run_name:
        return config.run_name
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{config.model}-{config.strategy}-w{config.weight_bits}a{config.act_bits}-{stamp}"


def search(config: SearchConfig, *, progress: bool = True) -> SearchResult:
    from policysearch.objectives import load_objective
    from policysearch.runners import create_runner
    from policysearch.spaces import load_space
    from policysearch.spec import EvaluatorSpec, get_evaluator
    from policysearch.strategies import create_strategy
    from policysearch.study import StudyRecorder, default_storage

    objective = load_objective(config.objective)
    runner = create_runner(config.runner)  # before the (slow) evaluator: fail fast on a bad name
    spec = EvaluatorSpec(
        model=config.model, checkpoint=config.checkpoint, data=config.data, objective=objective.to_dict(),
        device=config.device, calib_size=config.calib_size, eval_size=config.eval_size,
        batch_size=config.batch_size, seed=config.seed,
    )
    evaluator = get_evaluator(spec)  # the driver needs the sites; local runners reuse it
    space = load_space(config.space, evaluator.sites, weight_bits=config.weight_bits, act_bits=config.act_bits)
    options = dict(config.strategy_options)
    if config.trials is not None:
        options["trials"] = config.trials
    strategy = create_strategy(
        config.strategy, space, directions=objective.directions, seed=config.seed, **options
    )
    run_name = _run_name(config)
    run_dir = Path(config.results_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = StudyRecorder(
        storage=config.storage or default_storage(config.results_dir),
        study_name=run_name,
        directions=objective.directions,
        choices={s.name: [str(c) for c in space.choices(s.name)] for s in space.sites},
        attrs={"strategy": config.strategy, "model": config.model, "data": config.data,
               "space": config.space, "objective": objective.name},
    )
    loop = _Loop(recorder=recorder, runner=runner, spec=spec, progress=progress)
    try:
        loop.drive(strategy)
        baselines = {m: loop.evaluate(p, tag="baseline") for m, p in space.uniform_policies().items()}
    finally:
        runner.close()
    best = strategy.best()
    if best is None:
        raise ConfigError("the search finished without any successful evaluation (every result failed)")
    policy, result = best
    sensitivity = _sensitivity(space.uniform_policies(), baselines)
    _write_outputs(run_dir, config, objective.to_dict(), space, policy, result, sensitivity, evaluator)
    return SearchResult(
        run_dir=run_dir, run_name=run_name, policy=policy, result=result, baselines=baselines,
        float_metrics=dict(evaluator.float_metrics), evaluated=loop.evaluated, reused=loop.reused,
        sensitivity=sensitivity,
    )


class _Loop:
    """ask -> (cache | runner.map) -> tell -> record."""

    def __init__(self, *, recorder: Any, runner: Any, spec: Any, progress: bool) -> None:
        self.recorder, self.runner, self.spec = recorder, runner, spec
        self.cache: dict[str, EvalResult] = recorder.completed()
        self.evaluated = 0
        self.reused = 0
        if self.cache:
            log.info("resuming: %d evaluations already in the study", len(self.cache))
        self.bar = _progress(progress)

    def drive(self, strategy: Any) -> None:
        while True:
            asked = strategy.ask(self.runner.capacity)
            if not asked:
                if strategy.finished:
                    return
                raise RuntimeError(f"strategy {type(strategy).__name__} asked nothing but is not finished")
            todo = []
            for p in asked:
                cached = self.cache.get(p.key())
                if cached is not None:
                    self.reused += 1
                    strategy.tell(p, cached)
                else:
                    todo.append(p)
            for p, r in self._map(todo):
                strategy.tell(p, r)

    def evaluate(self, policy: Policy, *, tag: str = "") -> EvalResult:
        cached = self.cache.get(policy.key())
        if cached is not None:
            return cached
        return next(iter(self._map([policy], tag=tag)))[1]

    def _map(self, policies: list[Policy], tag: str = "") -> Any:
        if not policies:
            return
        for p, r in self.runner.map(self.spec, policies):
            self.recorder.record(p, r, tag=tag)
            self.cache[p.key()] = r
            self.evaluated += 1
            if self.bar is not None:
                self.bar.update(1)
                if r.ok:
                    self.bar.set_postfix_str(", ".join(f"{k}={v:.4g}" for k, v in
                                                      list(r.metrics.items())[:3]))
            yield p, r


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="evaluations", unit="policy", leave=False)


def _sensitivity(uniform: Mapping[str, Policy], results: Mapping[str, EvalResult]) -> list[dict[str, Any]]:
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
    import optuna
    import timm
    import torch

    import policysearch

    return {"policysearch": policysearch.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "optuna": optuna.__version__, "python": platform.python_version()}


def _write_outputs(run_dir: Path, config: SearchConfig, objective: dict, space: Any, policy: Policy,
                   result: EvalResult, sensitivity: list[dict[str, Any]], evaluator: Any) -> None:
    resolved = {**asdict(config), "objective": objective, "space": space.to_dict(),
                "strategy_options": dict(config.strategy_options)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    provenance = {"strategy": config.strategy, "objective": objective["name"], "space": config.space,
                  "seed": config.seed, "data": config.data, "eval_size": config.eval_size,
                  "calib_size": config.calib_size, "run_name": run_dir.name,
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "versions": _versions()}
    metrics = {**result.metrics, "values": list(result.values),
               "sites": {k: v.to_dict() for k, v in result.sites.items()},
               "float_top1": evaluator.float_metrics.get("top1")}
    write_policy(run_dir / "policy.json", PolicyDocument(
        policy=policy, model={"name": config.model, "checkpoint": config.checkpoint},
        metrics=metrics, provenance=provenance))
    with (run_dir / "sensitivity.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["site", "kind", "method", "gamma", "beta", "sqnr_diff"])
        writer.writeheader()
        writer.writerows(sensitivity)

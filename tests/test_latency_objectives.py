"""Latency-aware objectives and constraints, and the ilp strategy (issue 10, items 3 and 4).

Profiles are tiny JSON documents written here (no profiling); the strategies run on the
torch-free fake evaluator, the end-to-end runs on ``test_fmnist_vit``.
"""
from __future__ import annotations

import itertools
import json
import logging
import math

import optuna
import pytest

from fake_eval import SITES, fake_evaluate, small_space
from policysearch import methods
from policysearch.cli import main
from policysearch.errors import ConfigError
from policysearch.objectives import load_objective
from policysearch.objectives.latency import (
    DEFAULT_LAMBDA,
    Constraints,
    LatencyModel,
    derive_metrics,
    evaluator_objective,
    latency_weighted,
    relative_latency,
)
from policysearch.policy import Choice, read_policy
from policysearch.result import EvalResult
from policysearch.search import SearchConfig, search
from policysearch.strategies import create_strategy

#: per kind, the profiled ms of each method at every site of that kind (fp32 = 1 ms)
MS = {"softmax": {"fp32": 1.0, "ibert": 1.6, "fqvit": 1.1, "ivit": 0.7},
      "gelu": {"fp32": 1.0, "ibert": 1.4, "ivit": 0.8, "relu": 0.3},
      "layernorm": {"fp32": 1.0, "ibert": 1.3, "fqvit": 1.2, "ivit": 0.9}}
LINEAR_MS = 4.0


def profile_doc(sites, ms=MS, linear=LINEAR_MS, model="test_fmnist_vit"):
    """A ``policysearch.profile/v1`` document over ``sites`` (Site objects) with the times ``ms``."""
    return {"format": "policysearch.profile/v1", "model": model, "device": "cpu", "batch": 8,
            "sites": [{"name": s.name, "kind": s.kind, "shape": [8, 4, 16], "ms": dict(ms[s.kind])} for s in sites],
            "kernels": [], "linear": [{"name": "head", "median_ms": linear}], "totals_ms": {"linear": linear}}


def write_profile(path, sites, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile_doc(sites, **kw)))
    return str(path)


def expected_latency(policy, ms=MS, linear=LINEAR_MS):
    return (linear + sum(ms[s.kind][c.method] for s, c in policy.items())) / (linear + len(policy))


@pytest.fixture
def no_catalogue_costs():
    """The catalogue without costs for the test (restored afterwards)."""
    before = {(s.kind, s.name): s.cost for s in methods.catalogue()}
    methods.set_costs({k: None for k in before})
    yield
    methods.set_costs(before)


def vit_sites():
    from policysearch import find_sites
    from policysearch.models.loading import load_model

    return find_sites(load_model("test_fmnist_vit"))


def config(tmp_path, strategy, **kw):
    base = dict(strategy=strategy, model="test_fmnist_vit", calib_size=32, eval_size=48, trials=3,
                results_dir=str(tmp_path / "results"), storage=f"sqlite:///{tmp_path / 'studies.db'}",
                run_name=f"t-{strategy}", batch_size=48)
    base.update(kw)
    return SearchConfig(**base)


# -- the latency prediction -------------------------------------------------------------------------
def test_relative_latency_from_a_profile_document_or_path(tmp_path):
    space = small_space()
    doc = profile_doc(SITES)
    for policy in space.uniform_policies().values():
        assert relative_latency(policy, doc) == pytest.approx(expected_latency(policy))
    path = write_profile(tmp_path / "p.json", SITES)
    ivit = space.uniform_policies()["ivit"]
    assert relative_latency(ivit, path) == pytest.approx((4.0 + 0.9 * 3 + 0.7 * 2 + 0.8) / 10.0)
    pred = LatencyModel.from_profile(path).predict(ivit)
    assert pred["fixed_ms"] == LINEAR_MS and pred["float_ms"] == pytest.approx(10.0)
    # a profile without per-site times: the kernel table at the site's shape is read instead
    doc2 = profile_doc(SITES)
    doc2["kernels"] = [{"kind": k, "shape": [8, 4, 16], "method": m, "median_ms": t} for k, per in MS.items()
                       for m, t in per.items()]
    for s in doc2["sites"]:
        del s["ms"]
    assert relative_latency(ivit, doc2) == pytest.approx(relative_latency(ivit, doc))


def test_missing_profile_site_or_method_says_to_profile(tmp_path, no_catalogue_costs):
    ivit = small_space().uniform_policies()["ivit"]
    with pytest.raises(ConfigError, match="has no site blocks.0.norm1.*policysearch profile --model test_fmnist_vit"):
        relative_latency(ivit, profile_doc(SITES[1:]))
    with pytest.raises(ConfigError, match="does not exist.*policysearch profile"):
        relative_latency(ivit, str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ConfigError, match="not a policysearch.profile/v1"):
        relative_latency(ivit, str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="no latency profile and no method costs.*policysearch profile --model"):
        relative_latency(ivit)


def test_catalogue_costs_are_the_fallback(no_catalogue_costs):
    methods.set_costs({("softmax", "ivit"): 0.5, ("gelu", "ivit"): 0.8, ("layernorm", "ivit"): 0.9})
    ivit = small_space().uniform_policies()["ivit"]
    # every site weighs 1 (fp32 = 1), no linear part: (3 * 0.9 + 2 * 0.5 + 0.8) / 6
    assert relative_latency(ivit) == pytest.approx((2.7 + 1.0 + 0.8) / 6)
    with pytest.raises(ConfigError, match="no timing of layernorm/ibert at blocks.0.norm1"):
        relative_latency(small_space().uniform_policies()["ibert"])


# -- objectives ----------------------------------------------------------------------------------------
def test_latency_objectives():
    m = {"top1": 0.8, "latency": 0.7, "kl": 0.1}
    lat = load_objective("latency")
    assert lat.directions == ("minimize",) and lat.compute(m) == pytest.approx((0.7,))
    weighted = load_objective("latency_weighted")
    assert weighted.directions == ("minimize",)
    assert weighted.compute({**m, "error": 0.2}) == pytest.approx((0.2 + DEFAULT_LAMBDA * 0.7,))
    assert latency_weighted(0.5).compute({**m, "error": 0.2}) == pytest.approx((0.55,))
    with pytest.raises(ConfigError, match="lambda"):
        latency_weighted(-1)
    both = load_objective("accuracy_and_latency")
    assert both.directions == ("maximize", "minimize") and both.compute(m) == pytest.approx((0.8, 0.7))


def test_driver_derives_latency_and_error():
    obj = load_objective("latency_weighted")
    stripped = evaluator_objective(obj)
    assert stripped.values == ((),) and evaluator_objective(load_objective("kl")) == load_objective("kl")
    ivit = small_space().uniform_policies()["ivit"]
    model = LatencyModel.from_profile(profile_doc(SITES))
    fresh = EvalResult(values=stripped.compute({"top1": 0.75}), metrics={"top1": 0.75})
    out = derive_metrics(fresh, ivit, objective=obj, latency=model, fresh=True)
    lat = expected_latency(ivit)
    assert out.ok and out.metrics["latency"] == pytest.approx(lat) and out.metrics["error"] == pytest.approx(0.25)
    assert out.values == pytest.approx((0.25 + DEFAULT_LAMBDA * lat,))
    # read back from a study under an objective it could not compute: recomputed, no longer failed
    stale = EvalResult(values=obj.compute({"top1": 0.75}), metrics={"top1": 0.75})
    assert not stale.ok and derive_metrics(stale, ivit, objective=obj, latency=model, fresh=False).ok
    # the evaluator's own failure stands
    broken = EvalResult(values=(0.0,), metrics={"top1": 0.1}, error="non-finite logits")
    assert derive_metrics(broken, ivit, objective=obj, latency=model, fresh=True).error == "non-finite logits"
    failed = EvalResult.failed(1, "boom")
    assert derive_metrics(failed, ivit, objective=obj, latency=model, fresh=True) is failed


# -- constraints ------------------------------------------------------------------------------------
def test_constraints_choose_best_feasible_else_closest():
    space = small_space()
    pols = list(space.uniform_policies().values())
    res = [EvalResult(values=(v,), metrics={"top1": t, "latency": lat})
           for v, t, lat in ((0.9, 0.90, 1.2), (0.5, 0.80, 0.8), (0.7, 0.85, 0.9))]
    cands = list(zip(pols, res))
    c = Constraints(max_latency=1.0, min_top1=0.82)
    chosen, info = c.choose(cands[0], cands, ("maximize",))  # the strategy's best (0.9) is too slow
    assert chosen == cands[2] and info["feasible"] and info["shortfall"] == {} and info["feasible_count"] == 1
    chosen, info = c.choose(cands[2], cands, ("maximize",))
    assert chosen == cands[2]
    tight = Constraints(max_latency=0.5, min_top1=0.95)  # nobody meets it: the least total shortfall
    chosen, info = tight.choose(cands[0], cands, ("maximize",))
    assert chosen == cands[1] and info["feasible"] is False and info["feasible_count"] == 0
    assert info["shortfall"] == pytest.approx({"latency": 0.3, "top1": 0.15})
    for bad, msg in (({"max_latency": 0}, "relative to float"), ({"min_top1": 75}, "fraction"),
                     ({"max_latency": math.nan}, "number")):
        with pytest.raises(ConfigError, match=msg):
            Constraints(**bad)
    with pytest.raises(ConfigError, match="--min-top1"):
        SearchConfig(min_top1=1.5)


# -- ilp on the fake evaluator -----------------------------------------------------------------------------
def fake_with_top1(policy, **kw):
    """fake_evaluate plus an additive top-1 (1 - mean of the per-site scores / 10)."""
    r = fake_evaluate(policy, **kw)
    if not r.ok:
        return r
    from fake_eval import site_score

    top1 = 1.0 - sum(site_score(s.name, c) for s, c in policy.items()) / (10 * len(policy))
    return EvalResult(values=r.values, metrics={**r.metrics, "top1": top1}, sites=r.sites)


def drive(strategy, evaluate=fake_with_top1):
    asked = []
    while batch := strategy.ask(3):
        for p in batch:
            strategy.tell(p, evaluate(p))
        asked += batch
    assert strategy.finished
    return asked


def all_policies(space):
    return [space.policy(c) for c in itertools.product(*space.options)]


def test_ilp_under_a_latency_budget_only_some_policies_meet(caplog):
    space, doc = small_space(), profile_doc(SITES)
    every = all_policies(space)
    lat = {p.key(): relative_latency(p, doc) for p in every}
    free = create_strategy("ilp", space, directions=("maximize",))
    drive(free)
    unconstrained = lat[free.best()[0].key()]
    budget = max(v for v in lat.values() if v < unconstrained - 1e-9)  # the unconstrained best is too slow
    s = create_strategy("ilp", space, directions=("maximize",), max_latency=budget, profile=doc)
    with caplog.at_level(logging.INFO, logger="policysearch.strategies.ilp"):
        asked = drive(s)
    # the fake objective is additive, so the ILP finds the brute-force optimum of the feasible set
    feasible = [p for p in every if lat[p.key()] <= budget + 1e-12]
    assert 0 < len(feasible) < len(every)
    optimum = max(feasible, key=lambda p: fake_evaluate(p).value)
    sol = s.solution(s.base())
    assert sol.policy == optimum and sol.feasible and optimum in asked
    best = s.best()
    assert lat[best[0].key()] <= budget and best[1].value == pytest.approx(fake_evaluate(optimum).value)
    rep = s.report(best[0])
    prov = rep["provenance"]
    assert prov["mode"] == "metric" and prov["budget"] == {"max_latency": budget}
    assert prov["predicted"]["value"] == pytest.approx(prov["measured"]["value"])  # additive: exact
    assert prov["predicted"]["latency"] <= budget
    assert rep["metrics"]["predicted_value"] == pytest.approx(best[1].value)
    assert "ilp: predicted value" in caplog.text and "measured value" in caplog.text


def test_ilp_min_top1_minimises_latency():
    space, doc = small_space(), profile_doc(SITES)
    every = all_policies(space)
    top1 = {p.key(): fake_with_top1(p).metrics["top1"] for p in every}
    bar = sorted(top1.values())[len(every) // 2]
    s = create_strategy("ilp", space, directions=("maximize",), min_top1=bar, profile=doc)
    drive(s)
    sol = s.solution(s.base())
    ok = [p for p in every if top1[p.key()] >= bar - 1e-12]
    fastest = min(relative_latency(p, doc) for p in ok)
    assert s.mode == "latency" and sol.feasible
    assert relative_latency(sol.policy, doc) == pytest.approx(fastest)
    assert top1[sol.policy.key()] >= bar - 1e-12
    assert s.best()[0] in ok


def test_ilp_infeasible_budget_takes_the_closest(caplog):
    space, doc = small_space(), profile_doc(SITES)
    s = create_strategy("ilp", space, directions=("maximize",), max_latency=0.1, profile=doc)
    with caplog.at_level(logging.WARNING):
        drive(s)
    sol = s.solution(s.base())
    fastest = min(relative_latency(p, doc) for p in all_policies(space))
    assert sol.feasible is False and relative_latency(sol.policy, doc) == pytest.approx(fastest)
    assert sol.shortfall["latency"] == pytest.approx(fastest - 0.1)
    assert "by prediction" in caplog.text
    assert s.report()["provenance"]["predicted_feasible"] is False


def test_ilp_budget_needs_costs(no_catalogue_costs):
    with pytest.raises(ConfigError, match="policysearch profile"):
        create_strategy("ilp", small_space(), max_latency=0.9)
    with pytest.raises(ConfigError, match="strategy 'ilp'.*--max-latency"):
        create_strategy("ilp", small_space(), max_latency=-1, profile=profile_doc(SITES))
    with pytest.raises(ConfigError, match="ilp: base 'relu'"):
        create_strategy("ilp", small_space(), base="relu")


def test_ilp_skips_failed_choices():
    space, doc = small_space(), profile_doc(SITES)
    s = create_strategy("ilp", space, directions=("maximize",), max_latency=0.95, profile=doc)
    drive(s, evaluate=lambda p: fake_with_top1(p, nan_method="fqvit"))
    chosen = s.solution(s.base()).policy
    assert all(c.method != "fqvit" for c in chosen.choices) and s.best()[1].ok


# -- end to end on test_fmnist_vit ----------------------------------------------------------------
def test_latency_objective_end_to_end(tmp_path):
    sites = vit_sites()
    profile = write_profile(tmp_path / "profile.json", sites)
    res = search(config(tmp_path, "uniform", objective="latency", profile=profile), progress=False)
    assert all(c.method == "ivit" for c in res.policy.choices)  # the fastest method everywhere
    assert res.result.metrics["latency"] == pytest.approx(expected_latency(res.policy))
    assert res.result.values == pytest.approx((res.result.metrics["latency"],))
    study = optuna.load_study(study_name="t-uniform", storage=f"sqlite:///{tmp_path / 'studies.db'}")
    assert all("m.latency" in t.user_attrs for t in study.trials)
    doc = read_policy(tmp_path / "results" / "t-uniform" / "policy.json")
    assert doc.metrics["latency"] == pytest.approx(res.result.metrics["latency"])
    assert "feasible" not in doc.provenance  # no constraints
    # the same work under another objective, another run: reused, latency re-derived, nothing evaluated
    again = search(config(tmp_path, "uniform", objective="latency_weighted", profile=profile, run_name="t-w"),
                   progress=False)
    assert again.evaluated == 0 and again.reused >= 3
    r = again.result
    assert r.values == pytest.approx((1 - r.metrics["top1"] + DEFAULT_LAMBDA * r.metrics["latency"],))


def test_default_profile_location_and_missing_profile(tmp_path, no_catalogue_costs):
    with pytest.raises(ConfigError, match="test_fmnist_vit-cpu-b8.json does not exist.*policysearch profile --model "
                                          "test_fmnist_vit"):
        search(config(tmp_path, "uniform", objective="latency"), progress=False)
    write_profile(tmp_path / "results" / "profiles" / "test_fmnist_vit-cpu-b8.json", vit_sites())
    res = search(config(tmp_path, "uniform", objective="accuracy_and_latency"), progress=False)
    assert "latency" in res.result.metrics and len(res.result.values) == 2


def test_constraints_end_to_end_feasible_and_infeasible(tmp_path, capsys):
    profile = write_profile(tmp_path / "profile.json", vit_sites())
    res = search(config(tmp_path, "uniform", objective="kl", profile=profile, max_latency=0.95, min_top1=0.0),
                 progress=False)
    assert res.feasibility["feasible"] and res.result.metrics["latency"] <= 0.95
    assert all(c.method == "ivit" for c in res.policy.choices)  # the only uniform policy under 0.95
    argv = ["run", "--strategy", "uniform", "--model", "test_fmnist_vit", "--calib-size", "32", "--eval-size", "48",
            "--batch-size", "48", "--results-dir", str(tmp_path / "results"), "--storage",
            f"sqlite:///{tmp_path / 'studies.db'}", "--run-name", "t-tight", "--no-progress",
            "--profile", profile, "--max-latency", "0.5", "--min-top1", "0.999"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "NOT met by any evaluated policy" in out and "latency by" in out
    run_dir = tmp_path / "results" / "t-tight"
    doc = read_policy(run_dir / "policy.json")
    assert doc.provenance["feasible"] is False and doc.provenance["constraints"] == {"max_latency": 0.5,
                                                                                      "min_top1": 0.999}
    assert doc.provenance["shortfall"]["latency"] > 0 and doc.provenance["shortfall"]["top1"] > 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["answer"]["feasible"] is False and record["constraints"]["feasible_count"] == 0
    def total_shortfall(m):
        return max(0.0, m["latency"] - 0.5) + max(0.0, 0.999 - m["top1"])

    # the closest evaluated policy (here: the uniform baselines) by total shortfall is exported
    assert total_shortfall(record["answer"]["metrics"]) == pytest.approx(
        min(total_shortfall(b) for b in record["baselines"].values()))
    assert sum(doc.provenance["shortfall"].values()) == pytest.approx(total_shortfall(record["answer"]["metrics"]))
    assert main(argv[:-2] + ["--min-top1", "75"]) == 2
    assert "fraction in [0, 1]" in capsys.readouterr().err


def test_ilp_end_to_end_reports_predicted_and_measured(tmp_path):
    sites = vit_sites()
    profile = write_profile(tmp_path / "profile.json", sites)
    space = tmp_path / "two.yaml"  # ibert or ivit at every site: 9 single-site changes
    space.write_text("methods: {softmax: [ibert, ivit], gelu: [ibert, ivit], layernorm: [ibert, ivit]}\n")
    uniform_lat = sorted(expected_latency(p) for p in small_vit_uniforms(sites))
    budget = (uniform_lat[0] + uniform_lat[1]) / 2  # between the fastest and the next uniform policy
    res = search(config(tmp_path, "ilp", profile=profile, max_latency=budget, space=str(space)), progress=False)
    assert res.result.metrics["latency"] <= budget and res.feasibility["feasible"]
    prov = res.strategy_report["provenance"]
    assert prov["mode"] == "metric" and {"value", "latency", "top1"} <= set(prov["predicted"])
    assert set(prov["measured"]) == set(prov["predicted"]) and prov["predicted"]["latency"] <= budget
    doc = read_policy(tmp_path / "results" / "t-ilp" / "policy.json")
    assert doc.provenance["strategy_report"]["predicted"] == pytest.approx(prov["predicted"])
    assert doc.provenance["feasible"] is True
    if res.policy.choices == tuple(Choice.parse(c) for c in prov["chosen"]):
        assert doc.metrics["predicted_value"] == pytest.approx(prov["predicted"]["value"])


def small_vit_uniforms(sites):
    from policysearch.spaces import load_space

    return [p for m, p in load_space("paper", sites).uniform_policies().items() if m in ("ibert", "ivit")]

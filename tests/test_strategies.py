"""The shared conformance suite (every registered strategy must pass it), then per-strategy tests."""
from __future__ import annotations

import json
import logging
import math

import pytest

from fake_eval import SITES, SMALL, fake_evaluate, site_score, small_space
from policysearch.errors import ConfigError
from policysearch.policy import Choice, Policy
from policysearch.registry import UnknownNameError
from policysearch.result import EvalResult, SiteMetrics
from policysearch.sites import Site
from policysearch.spaces.space import SearchSpace
from policysearch.strategies import (
    create_strategy,
    list_strategies,
    rule_sqnr_absdiff,
    rule_sqnr_diff,
    rule_sqnr_drop,
    rule_sqnr_output,
)

ALL = list_strategies()
OPTIONS = {"tpe": {"trials": 6}, "nsga2": {"trials": 8, "population_size": 4}, "random": {"trials": 8}}


def make(name, seed=0, directions=("maximize",), space=None, **options):
    return create_strategy(name, space or small_space(), directions=directions, seed=seed,
                           **{**OPTIONS.get(name, {}), **options})


def drive(strategy, n=2, limit=300, stop_after=None, evaluate=fake_evaluate, **fake):
    """ask(n) -> tell every result -> repeat; checks the contract on the way; returns all asked."""
    asked = []
    for _ in range(limit):
        batch = strategy.ask(n)
        if not batch:
            assert strategy.finished, "asked nothing but is not finished"
            return asked
        keys = [p.key() for p in batch]
        assert len(batch) <= n and len(set(keys)) == len(keys), "duplicate policies in one batch"
        assert not {p.key() for p in asked} & set(keys), "asked a policy twice"
        for p in batch:
            strategy.tell(p, evaluate(p, **fake))
        asked += batch
        if stop_after is not None and len(asked) >= stop_after:
            return asked
    raise AssertionError("did not finish")


def keys(policies):
    return [p.key() for p in policies]


# -- conformance -----------------------------------------------------------------------------------
def test_registered_names_and_unknown_name():
    assert set(ALL) == {"uniform", "sqnr_diff", "sqnr_drop", "sqnr_absdiff", "sqnr_output", "exhaustive", "ilp",
                        "tpe", "nsga2", "random", "unified"}
    with pytest.raises(UnknownNameError, match="valid: exhaustive, ilp, nsga2, random, sqnr_absdiff, sqnr_diff"):
        create_strategy("bogus", small_space())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [2, 4])
def test_asked_policies_lie_in_space_and_search_finishes(name, n):
    s = make(name)
    asked = drive(s, n=n)
    space = small_space()
    assert asked and all(space.contains(p) for p in asked)
    best = s.best()
    assert best is not None and best[1].ok and space.contains(best[0])
    assert s.finished and s.ask(n) == []


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_sequence_and_result(name):
    a, b = make(name, seed=3), make(name, seed=3)
    assert keys(drive(a)) == keys(drive(b))
    assert a.best()[0] == b.best()[0]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("cut", [1, 3, 5])
def test_state_survives_save_and_load(name, cut):
    full = make(name)
    full_asked = keys(drive(full, n=1))
    part = make(name)
    drive(part, n=1, stop_after=cut)
    state = json.loads(json.dumps(part.state_dict(), allow_nan=False))
    resumed = make(name)
    resumed.load_state_dict(state)
    assert full_asked[:cut] + keys(drive(resumed, n=1)) == full_asked
    assert resumed.best() == full.best()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("cut", [1, 2, 4])
def test_state_with_a_pending_policy(name, cut):
    """Saved while a policy is pending: the resumed strategy asks it again first, then goes on
    exactly as the original did once it was told."""
    ref, sizes = make(name), []
    while batch := ref.ask(2):
        sizes.append(len(batch))
        for p in batch:
            ref.tell(p, fake_evaluate(p))
    pairs = [i for i, k in enumerate(sizes) if k == 2]
    target = next((i for i in pairs if i >= cut), pairs[-1])  # a batch of 2, at or after `cut`
    full, part = make(name), make(name)
    for step in range(target + 1):  # identical history up to that batch
        batch = full.ask(2)
        assert keys(part.ask(2)) == keys(batch)
        if step == target:
            break
        for s in (full, part):
            for p in batch:
                s.tell(p, fake_evaluate(p))
    for s in (full, part):
        s.tell(batch[0], fake_evaluate(batch[0]))
    full.tell(batch[1], fake_evaluate(batch[1]))
    resumed = make(name)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    again = resumed.ask(1)
    assert keys(again) == [batch[1].key()]
    resumed.tell(again[0], fake_evaluate(again[0]))
    assert keys(drive(resumed)) == keys(drive(full))
    assert resumed.best() == full.best()


@pytest.mark.parametrize("name", ALL)
def test_nan_results_do_not_crash(name):
    s = make(name)
    drive(s, nan_method="fqvit")
    best = s.best()
    assert best is not None and best[1].ok and all(c.method != "fqvit" for c in best[0].choices)
    json.dumps(s.state_dict(), allow_nan=False)  # strict JSON even with NaN results


@pytest.mark.parametrize("name", ALL)
def test_all_failed_finishes_without_best(name):
    s = make(name)
    drive(s, fail_all=True)
    assert s.finished and s.best() is None and s.pareto() == []


@pytest.mark.parametrize("name", ALL)
def test_no_duplicates_pending_and_no_deadlock(name):
    s = make(name)
    pending = []
    while batch := s.ask(3):  # ask without telling until it must wait
        pending += batch
        assert len(pending) < 200
    assert pending and len(set(keys(pending))) == len(pending)
    assert not s.finished
    for p in pending:
        s.tell(p, fake_evaluate(p))
    asked = drive(s, n=3)
    assert not set(keys(asked)) & set(keys(pending)) and s.best() is not None


@pytest.mark.parametrize("name", ALL)
def test_minimize_and_results_told_without_asking(name):
    s = make(name, directions=("minimize",))
    stray = small_space().uniform_policies()["ivit"]
    s.tell(stray, fake_evaluate(stray))  # the driver replays cached trials on resume
    outside = Policy(sites=(Site(name="other", kind="gelu"),), choices=(Choice(method="relu"),))
    s.tell(outside, EvalResult(values=(-100.0,)))  # not in the space: recorded, never best
    asked = drive(s)
    assert stray.key() not in keys(asked)
    best = s.best()
    assert best is not None and best[0] != outside
    ok = [r.value for p, r in s.results.values() if r.ok and small_space().contains(p)]
    if name not in ("sqnr_diff", "sqnr_drop", "sqnr_absdiff", "sqnr_output", "unified"):  # best: the rule's pick
        assert best[1].value == min(ok)


@pytest.mark.parametrize("name", ALL)
def test_wrong_number_of_values_counts_as_failure(name):
    s = make(name)
    drive(s, n_values=2)
    assert s.best() is None and all(not r.ok for _, r in s.results.values())


@pytest.mark.parametrize("name", ALL)
def test_load_state_checks(name):
    s = make(name)
    drive(s, stop_after=2)
    state = s.state_dict()
    with pytest.raises(ValueError, match="fresh"):
        s.load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        make(name, seed=1).load_state_dict(state)
    other = "uniform" if name != "uniform" else "random"
    with pytest.raises(ConfigError, match="strategy state"):
        make(other).load_state_dict(state)


def test_unknown_option_and_ignored_trials(caplog):
    with pytest.raises(ConfigError, match="unknown option.*population_size.*valid: trials"):
        create_strategy("random", small_space(), population_size=4)
    with pytest.raises(ConfigError, match="directions"):
        create_strategy("uniform", small_space(), directions=("up",))
    with caplog.at_level(logging.WARNING):
        s = create_strategy("sqnr_diff", small_space(), trials=5)
    assert "ignoring trials=5" in caplog.text and not s.finished


# -- uniform ---------------------------------------------------------------------------------------
def test_uniform_evaluates_one_policy_per_method():
    s = make("uniform")
    asked = drive(s, n=4)
    uniform = small_space().uniform_policies()
    assert keys(asked) == keys(uniform.values()) and list(uniform) == ["ibert", "fqvit", "ivit"]
    assert s.best()[1].value == max(fake_evaluate(p).value for p in asked)


# -- SQNR rules ------------------------------------------------------------------------------------
#: (gamma, beta) per method: diff = beta - gamma, drop = gamma - beta, output = beta.
#: ibert: diff -20, drop 20, beta 60;  ivit: diff 10, drop -10, beta 40;  fqvit: diff 5, drop -5, beta 75
#: (|diff|: ibert 20, ivit 10, fqvit 5).
TABLE = {"ibert": (80.0, 60.0), "ivit": (30.0, 40.0), "fqvit": (70.0, 75.0)}


def table_fake(policy, table=TABLE):
    sites = {s.name: SiteMetrics(gamma=table[c.method][0], beta=table[c.method][1]) for s, c in policy.items()}
    return EvalResult(values=(1.0,), sites=sites)


@pytest.mark.parametrize("name, expected", [
    ("sqnr_diff", {"softmax": "ibert", "layernorm": "ibert", "gelu": "ibert"}),   # lowest beta - gamma
    ("sqnr_drop", {"softmax": "ivit", "layernorm": "ivit", "gelu": "ivit"}),      # lowest gamma - beta
    ("sqnr_absdiff", {"softmax": "fqvit", "layernorm": "ivit", "gelu": "ivit"}),  # lowest |beta - gamma|
    ("sqnr_output", {"softmax": "fqvit", "layernorm": "ibert", "gelu": "ibert"}),  # highest beta
])
def test_sqnr_rules_pick_the_expected_methods(name, expected):
    s = make(name)
    asked = drive(s, n=4, evaluate=table_fake)
    uniform = small_space().uniform_policies()
    assert keys(asked[:3]) == keys(uniform.values())  # the uniform runs first, then the mixed one
    policy = s.best()[0]
    assert {site.kind: c.method for site, c in policy.items()} == expected
    mixed_is_uniform = policy.key() in keys(uniform.values())
    assert len(asked) == (3 if mixed_is_uniform else 4) and (mixed_is_uniform or asked[-1] == policy)
    table = s.selection()
    assert list(table) == [x.name for x in SITES]
    row = table["blocks.0.attn.softmax"]
    assert set(row.candidates) == {"ibert", "fqvit", "ivit"} and row.choice.method == expected["softmax"]
    assert table["blocks.0.mlp.act"].to_dict()["candidates"].keys() == {"ibert", "ivit"}


def test_rules_are_named_functions():
    m = SiteMetrics(gamma=50.0, beta=45.0)
    assert (rule_sqnr_diff(m), rule_sqnr_drop(m), rule_sqnr_output(m)) == (-5.0, 5.0, -45.0)
    assert rule_sqnr_absdiff(m) == 5.0 == m.absdiff
    assert rule_sqnr_absdiff(SiteMetrics(gamma=45.0, beta=50.0)) == 5.0
    assert all(f.__doc__ for f in (rule_sqnr_diff, rule_sqnr_drop, rule_sqnr_absdiff, rule_sqnr_output))


def test_sqnr_absdiff_picks_what_neither_signed_reading_picks():
    """Softmax candidates: ibert diff -12, fqvit diff +9, ivit diff +2. The literal reading takes
    the largest fall (ibert), the drop reading the largest rise (fqvit), |diff| the smallest change
    (ivit). At the other sites ibert -3 vs ivit +3: equal |diff|, so the space's first (ibert)."""
    table = {"ibert": (62.0, 50.0), "fqvit": (41.0, 50.0), "ivit": (48.0, 50.0)}
    gelu_ln = {"ibert": (53.0, 50.0), "ivit": (47.0, 50.0)}

    def fake(policy):
        return EvalResult(values=(1.0,), sites={
            s.name: SiteMetrics(gamma=(table if s.kind == "softmax" else gelu_ln)[c.method][0],
                                beta=50.0) for s, c in policy.items()})

    picks = {}
    for name in ("sqnr_diff", "sqnr_drop", "sqnr_absdiff"):
        s = make(name)
        drive(s, evaluate=fake)
        picks[name] = {site.kind: c.method for site, c in s.best()[0].items()}
    assert [p["softmax"] for p in picks.values()] == ["ibert", "fqvit", "ivit"]
    assert picks["sqnr_absdiff"] == {"layernorm": "ibert", "softmax": "ivit", "gelu": "ibert"}
    assert picks["sqnr_drop"]["gelu"] == "ivit" and picks["sqnr_diff"]["gelu"] == "ibert"
    row = make("sqnr_absdiff")
    drive(row, evaluate=fake)
    keys_ = {c: k for c, (_, k) in row.selection()["blocks.0.attn.softmax"].candidates.items()}
    assert keys_ == {"ibert": 12.0, "fqvit": 9.0, "ivit": 2.0}


def test_sqnr_uses_each_methods_own_uniform_run():
    """The fqvit run executes I-BERT GELU (FQ-ViT has none): that measurement is not a candidate."""
    def fake(policy):
        uniform_fqvit = policy["blocks.0.attn.softmax"].method == "fqvit"
        sites = {}
        for s, c in policy.items():
            g, b = TABLE[c.method]
            if s.kind == "gelu" and uniform_fqvit:
                g, b = 90.0, 10.0  # ibert GELU in the fqvit run: diff -80 would win if it counted
            elif s.kind == "gelu":
                g, b = {"ibert": (50.0, 45.0), "ivit": (50.0, 40.0)}[c.method]  # ivit: diff -10 wins
            sites[s.name] = SiteMetrics(gamma=g, beta=b)
        return EvalResult(values=(1.0,), sites=sites)
    s = make("sqnr_diff")
    drive(s, evaluate=fake)
    assert s.best()[0]["blocks.0.mlp.act"].method == "ivit"
    assert s.selection()["blocks.0.mlp.act"].candidates["ibert"][1] == -5.0


def test_sqnr_ties_follow_space_order_and_unmeasured_sites_fall_back():
    def fake(policy):
        sites = {s.name: SiteMetrics(gamma=50.0, beta=40.0) for s, _ in policy.items() if s.name != "norm"}
        value = 2.0 if policy["norm"].method == "ivit" else 1.0
        return EvalResult(values=(value,), sites=sites)
    s = make("sqnr_diff")
    drive(s, evaluate=fake)
    table = s.selection()
    assert all(table[x.name].choice == small_space().choices(x.name)[0] for x in SITES if x.name != "norm")
    assert table["norm"].key is None and table["norm"].choice.method == "ivit"  # best uniform run's


def test_sqnr_best_is_the_mixed_policy_even_if_worse():
    uniform = keys(small_space().uniform_policies().values())
    s = make("sqnr_output")
    table = {**TABLE, "ivit": (30.0, 70.0)}  # output rule: softmax fqvit, the rest ivit
    drive(s, evaluate=lambda p: EvalResult(values=(1.0 if p.key() in uniform else 0.5,),
                                          sites=table_fake(p, table).sites))
    mixed = s.mixed()
    assert s.best() == (mixed, s.result_of(mixed)) and s.best()[1].value == 0.5


# -- exhaustive ------------------------------------------------------------------------------------
def _changed_site(policy, base):
    diff = [i for i, (a, b) in enumerate(zip(policy.choices, base.choices)) if a != b]
    assert len(diff) == 1
    return diff[0]


@pytest.mark.parametrize("n", [1, 4])
def test_exhaustive_groups_changes_per_site_and_combines_best(n):
    space = small_space()
    s = make("exhaustive")
    asked = drive(s, n=n)
    uniform = space.uniform_policies()
    assert keys(asked[:3]) == keys(uniform.values())
    base = max(uniform.values(), key=lambda p: fake_evaluate(p).value)
    changes = asked[3:-1]
    assert len(changes) == sum(len(o) - 1 for o in space.options)
    assert [_changed_site(p, base) for p in changes] == sorted(_changed_site(p, base) for p in changes)
    combined = asked[-1]
    for site, choice in combined.items():
        assert choice == max(space.choices(site.name), key=lambda c: site_score(site.name, c))
    assert s.best()[0] == combined  # additive fake: the per-site optimum is the global one


def test_exhaustive_with_a_given_base():
    space = small_space()
    s = make("exhaustive", base="ivit")
    asked = drive(s)
    assert asked[0] == space.uniform_policies()["ivit"]
    assert len(asked) == 1 + sum(len(o) - 1 for o in space.options) + 1
    with pytest.raises(ConfigError, match="not a method"):
        make("exhaustive", base="relu")
    with pytest.raises(ConfigError, match="not in the space"):
        make("exhaustive", base=["ivit", "ivit", "relu", "ivit", "ivit", "ivit"])
    with pytest.raises(ConfigError, match="invalid base policy.*not allowed for gelu"):
        make("exhaustive", base=["fqvit"] * len(SITES))
    listed = make("exhaustive", base=[str(c) for c in asked[0].choices])
    assert listed.ask(1) == [asked[0]]


# -- optuna strategies -----------------------------------------------------------------------------
def test_tpe_starts_with_the_sqnr_diff_policies():
    ref_asked = keys(drive(make("sqnr_diff"), n=1))
    tpe = make("tpe", trials=6)
    tpe_asked = keys(drive(tpe, n=1))
    assert tpe_asked[: len(ref_asked)] == ref_asked
    assert len(tpe_asked) == len(ref_asked) + 6
    assert len(tpe.study.trials) >= len(tpe_asked)  # warm-start results are trials of the study


@pytest.mark.parametrize("name", ["tpe", "nsga2", "random"])
def test_optuna_strategies_stop_when_the_space_is_exhausted(name):
    space = SearchSpace.from_preset({"methods": {"softmax": ["ibert", "ivit"], "gelu": ["ivit"],
                                                 "layernorm": ["ivit"]}}, SITES[:3])
    s = make(name, space=space, trials=50)
    asked = drive(s, n=2)
    assert len(asked) == len(set(keys(asked))) == space.size() == 2


def test_nsga2_multi_objective_pareto():
    s = make("nsga2", directions=("maximize", "minimize"))
    drive(s, n=2, n_values=2)
    front = s.pareto()
    assert front and all(r.ok for _, r in front)
    assert s.best() in front and s.best()[1].value == max(r.value for _, r in s.results.values() if r.ok)


def test_random_with_bit_choices():
    space = SearchSpace.from_preset({"methods": {"softmax": ["ivit"], "gelu": ["ivit"], "layernorm": ["ivit"]},
                                     "bits": {"softmax": [6, 8]}}, SITES)
    assert space.choices("blocks.0.attn.softmax") == (Choice(method="ivit", bits=6), Choice(method="ivit", bits=8))
    s = create_strategy("random", space, trials=3)
    asked = drive(s)
    assert all(space.contains(p) for p in asked) and len(set(keys(asked))) == len(asked) == 3
    assert math.prod(len(space.choices(x.name)) for x in SITES) == space.size() == 4


def test_optuna_info_logging_is_silenced_locally():
    import optuna

    before = optuna.logging.get_verbosity()
    drive(make("random"))
    assert optuna.logging.get_verbosity() == before


def test_small_preset_matches_fake_space():
    assert small_space().to_dict()["size"] == 144 and SMALL["methods"]["gelu"] == ["ibert", "ivit"]


def test_repeated_proposals_end_the_search():
    s = make("random", trials=100, max_duplicates=1)
    asked = drive(s, n=3)
    assert s.finished and len(set(keys(asked))) == len(asked) < 144
    assert s.stalled or s.asked == 100


def test_strategies_and_spaces_are_torch_free():
    """No module of strategies/ or spaces/ imports torch or timm (static check: the package root
    imports the model API)."""
    import ast
    from pathlib import Path

    import policysearch

    root = Path(policysearch.__file__).parent
    for path in [*(root / "strategies").glob("*.py"), *(root / "spaces").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("torch", "timm") or n.startswith("policysearch.models")
                           for n in names), f"{path.name} imports {names}"


def test_unified_harmonic_score_and_pick():
    from policysearch.strategies import harmonic_score

    w = {"sensitivity": 1.0, "perturbation": 1.0, "cost": 0.0}
    assert harmonic_score({"sensitivity": 1.0, "perturbation": 1.0}, w, 0.0) == 1.0
    assert harmonic_score({"sensitivity": 1.0, "perturbation": 0.5}, w, 0.0) == pytest.approx(2 / 3)
    assert harmonic_score({"sensitivity": 1.0, "perturbation": 0.0}, w, 0.0) == 0.0
    s = make("unified")
    drive(s)
    base = s.base()
    scores = s.scores(base)
    chosen = s.best()[0]
    for i, site in enumerate(small_space().sites):
        rows = [r for r in scores if r.site == site.name]
        top = max(r.score for r in rows)
        assert chosen.choices[i] == next(r.choice for r in rows if r.score == top)
        assert all(0 <= q <= 1 for r in rows for q in r.quality.values())
    # perturbation: the single-site change's objective loss against the base (maximize: base - change)
    r = next(r for r in scores if r.choice != base[r.site])
    change = s.result_of(base.replace({r.site: r.choice}))
    assert r.raw["perturbation"] == pytest.approx(s.result_of(base).value - change.value)
    assert r.raw["sensitivity"] == change.sites[r.site].beta

"""ASQNR's dB convention (20·log10 stored, 10·log10 on request) and the SQNR rules under both."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fake_eval import fake_evaluate, small_space
from policysearch.objectives.sqnr import MAX_DB, asqnr, convert_db
from policysearch.report.text import site_sqnr_table, summary_text
from policysearch.result import EvalResult, SiteMetrics
from policysearch.strategies import (
    create_strategy,
    rule_sqnr_absdiff,
    rule_sqnr_diff,
    rule_sqnr_drop,
    rule_sqnr_output,
)

RULES = (rule_sqnr_diff, rule_sqnr_drop, rule_sqnr_absdiff, rule_sqnr_output)
SQNR_STRATEGIES = ("sqnr_diff", "sqnr_drop", "sqnr_absdiff", "sqnr_output")


def noisy(seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 10, generator=g)
    return x, x + noise * torch.randn(4, 3, 10, generator=g) * torch.rand(4, 1, 1, generator=g)


# ---- asqnr(db=...) -------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, noise", [(0, 1e-3), (1, 0.1), (2, 3.0), (3, 1e-6)])
def test_asqnr_10_log10_is_exactly_half(seed, noise):
    x, q = noisy(seed, noise)
    v20, v10 = asqnr(x, q), asqnr(x, q, db=10)
    assert v10 == v20 / 2 and asqnr(x, q, db=20) == v20
    ratio = float(((x**2).mean((1, 2)).double() / ((x - q) ** 2).mean((1, 2)).double()).mean())
    # eq. 10 as the paper writes it (the last case is above the cap: MAX_DB, and MAX_DB / 2)
    assert v20 == pytest.approx(min(20 * math.log10(ratio), MAX_DB), rel=1e-5)


def test_asqnr_cap_and_non_finite_in_both_conventions():
    x = torch.randn(2, 8)
    assert asqnr(x, x) == MAX_DB and asqnr(x, x, db=10) == MAX_DB / 2
    q = x.clone()
    q[0, 0] = math.nan
    assert asqnr(x, q) == -math.inf and asqnr(x, q, db=10) == -math.inf


@pytest.mark.parametrize("db", [0, 1, 15, 40, 20.5, True, "20", None])
def test_asqnr_and_convert_db_reject_other_conventions(db):
    x, q = noisy(0, 0.1)
    with pytest.raises(ValueError, match="20.*or 10"):
        asqnr(x, q, db=db)
    with pytest.raises(ValueError, match="to_db"):
        convert_db(1.0, 20, db)
    with pytest.raises(ValueError, match="from_db"):
        convert_db(1.0, db, 20)


def test_convert_db():
    assert convert_db(37.5, 20, 10) == 18.75 and convert_db(18.75, 10, 20) == 37.5
    assert convert_db(-3.0, 20, 20) == -3.0 and convert_db(MAX_DB, 20, 10) == MAX_DB / 2
    assert convert_db(-math.inf, 20, 10) == -math.inf and math.isnan(convert_db(math.nan, 10, 20))
    x, q = noisy(5, 0.2)
    assert convert_db(asqnr(x, q), 20, 10) == asqnr(x, q, db=10)


# ---- the rules do not depend on the convention ---------------------------------------------------
def test_rule_rankings_identical_under_both_conventions():
    """Candidates measured from tensors with asqnr(db=20) and asqnr(db=10): for every rule the
    keys in 10·log10 are exactly half, so every ranking (and every pick) is the same."""
    candidates = {}
    for i, (gamma_noise, beta_noise) in enumerate([(0.01, 0.1), (0.3, 0.02), (0.05, 0.05), (0.001, 0.5),
                                                    (0.2, 0.2), (0.02, 0.004)]):
        (xg, qg), (xb, qb) = noisy(2 * i, gamma_noise), noisy(2 * i + 1, beta_noise)
        candidates[f"m{i}"] = {db: SiteMetrics(gamma=asqnr(xg, qg, db=db), beta=asqnr(xb, qb, db=db))
                               for db in (20, 10)}
    orders = []
    for rule in RULES:
        k20 = {c: rule(m[20]) for c, m in candidates.items()}
        k10 = {c: rule(m[10]) for c, m in candidates.items()}
        assert all(k10[c] == k20[c] / 2 for c in candidates)
        order = sorted(candidates, key=k20.get)
        assert order == sorted(candidates, key=k10.get)
        orders.append(order)
    # a constructed set on which the four rules rank the candidates four different ways
    assert len({tuple(o) for o in orders}) == 4


def _in_10_log10(result: EvalResult) -> EvalResult:
    sites = {k: SiteMetrics(gamma=convert_db(m.gamma, 20, 10), beta=convert_db(m.beta, 20, 10))
             for k, m in result.sites.items()}
    return EvalResult(values=result.values, metrics=result.metrics, sites=sites, error=result.error)


@pytest.mark.parametrize("name", SQNR_STRATEGIES)
def test_sqnr_strategies_pick_the_same_policy_under_both_conventions(name):
    picks = []
    for evaluate in (fake_evaluate, lambda p: _in_10_log10(fake_evaluate(p))):
        s = create_strategy(name, small_space())
        while batch := s.ask(4):
            for p in batch:
                s.tell(p, evaluate(p))
        picks.append((s.best()[0], {k: v.key for k, v in s.selection().items()}))
    (p20, keys20), (p10, keys10) = picks
    assert p20 == p10
    assert all(keys10[k] == keys20[k] / 2 for k in keys20)


# ---- reports --------------------------------------------------------------------------------------
def _fake_run():
    space = small_space()
    policy = space.uniform_policies()["ivit"]
    result = fake_evaluate(policy)
    result = EvalResult(values=result.values, sites=result.sites,
                        metrics={"top1": 0.9, "agreement": 0.95, "kl": 0.01, "logit_sqnr": 31.5,
                                 "mean_sqnr_diff": -4.25})
    return SimpleNamespace(run_name="r", evaluated=4, reused=0, policy=policy, result=result,
                           baselines={"ivit": result}, float_metrics={"top1": 0.91}, run_dir=Path("out"))


def test_site_table_and_summary_print_either_convention():
    res = _fake_run()
    t20 = site_sqnr_table(res.policy, res.result).splitlines()
    t10 = site_sqnr_table(res.policy, res.result, db=10).splitlines()
    assert len(t20) == len(t10) == 1 + len(res.policy.sites)
    for line20, line10, (site, _) in zip(t20[1:], t10[1:], res.policy.items()):
        m = res.result.sites[site.name]
        v20, v10 = (list(map(float, line.split()[-3:])) for line in (line20, line10))
        assert v20 == pytest.approx([m.gamma, m.beta, m.diff], abs=0.005)
        assert v10 == pytest.approx([m.gamma / 2, m.beta / 2, m.diff / 2], abs=0.005)
    s20, s10 = summary_text(res), summary_text(res, db=10)
    assert "SQNR in dB, 20·log10" in s20 and "31.50" in s20 and "-4.25" in s20
    assert "SQNR in dB, 10·log10" in s10 and "15.75" in s10 and "-2.12" in s10
    assert "\n".join(t10) in s10
    with pytest.raises(ValueError, match="20.*or 10"):
        summary_text(res, db=15)
    with pytest.raises(ValueError, match="20.*or 10"):
        site_sqnr_table(res.policy, res.result, db=3)

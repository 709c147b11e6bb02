"""A torch-free stand-in for the evaluator: deterministic per-site SQNR and objective values.

``fake_evaluate(policy)`` gives each (site, choice) a fixed pseudo-random score, gamma and beta
(hashes of the names), independent of the rest of the policy: the objective is the sum of the
per-site scores, so per-site independent search finds the optimum and tests can predict it.
"""
from __future__ import annotations

import hashlib

from policysearch.policy import Policy
from policysearch.result import EvalResult, SiteMetrics
from policysearch.sites import Site
from policysearch.spaces.space import SearchSpace

__all__ = ["SITES", "SMALL", "fake_evaluate", "site_score", "small_space"]

#: Six sites across the three kinds, in forward order.
SITES = (
    Site(name="blocks.0.norm1", kind="layernorm"),
    Site(name="blocks.0.attn.softmax", kind="softmax"),
    Site(name="blocks.0.mlp.act", kind="gelu"),
    Site(name="blocks.1.norm1", kind="layernorm"),
    Site(name="blocks.1.attn.softmax", kind="softmax"),
    Site(name="norm", kind="layernorm"),
)
#: 2-3 choices per site: 2 * 3 * 2 * 2 * 3 * 2 = 144 policies.
SMALL = {"methods": {"softmax": ["ibert", "fqvit", "ivit"], "gelu": ["ibert", "ivit"], "layernorm": ["ibert", "ivit"]}}


def small_space() -> SearchSpace:
    return SearchSpace.from_preset(SMALL, SITES, name="small")


def _u(*parts: object) -> float:
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def site_score(site: str, choice: object) -> float:
    """The objective contribution of one (site, choice)."""
    return _u(site, choice)


def fake_evaluate(policy: Policy, *, nan_method: str | None = None, fail_all: bool = False,
                  n_values: int = 1) -> EvalResult:
    """value = sum of per-(site, choice) scores; gamma/beta depend on the site and its choice.

    A policy using ``nan_method`` anywhere (or any policy, with ``fail_all``) gets NaN values,
    i.e. a failed result; ``n_values`` > 1 adds pseudo-random extra objectives.
    """
    if fail_all or (nan_method is not None and any(c.method == nan_method for c in policy.choices)):
        return EvalResult(values=(float("nan"),) * n_values)
    sites = {s.name: SiteMetrics(gamma=40 + 20 * _u(s.name, c, "g"), beta=30 + 20 * _u(s.name, c, "b"))
             for s, c in policy.items()}
    score = sum(site_score(s.name, c) for s, c in policy.items())
    values = (score,) + tuple(_u(policy.key(), i) for i in range(1, n_values))
    return EvalResult(values=values, metrics={"score": score}, sites=sites)

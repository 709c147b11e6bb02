"""A torch-free stand-in for the evaluator: deterministic per-site SQNR and objective values."""
from __future__ import annotations

import hashlib
import math

from policysearch.policy import Policy
from policysearch.result import EvalResult, SiteMetrics
from policysearch.spaces.site import Site
from policysearch.spaces.space import SearchSpace

SITES = (
    Site(name="blocks.0.norm1", kind="layernorm"),
    Site(name="blocks.0.attn.softmax", kind="softmax"),
    Site(name="blocks.0.mlp.act", kind="gelu"),
    Site(name="blocks.1.norm1", kind="layernorm"),
    Site(name="blocks.1.attn.softmax", kind="softmax"),
    Site(name="norm", kind="layernorm"),
)


def small_space() -> SearchSpace:
    return SearchSpace.from_preset(
        {"methods": {"softmax": ["ibert", "fqvit", "ivit"], "gelu": ["ibert", "ivit"],
                     "layernorm": ["ibert", "ivit"]}}, SITES, name="small")


def _u(*parts: object) -> float:
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def fake_evaluate(policy: Policy, *, nan_method: str | None = None, n_values: int = 1) -> EvalResult:
    """value = sum of per-(site, choice) scores; gamma/beta depend on the site and its choice."""
    if nan_method is not None and any(c.method == nan_method for c in policy.choices):
        return EvalResult(values=(math.nan,) * n_values)
    sites = {s.name: SiteMetrics(gamma=40 + 20 * _u(s.name, c, "g"), beta=30 + 20 * _u(s.name, c, "b"))
             for s, c in policy.items()}
    score = sum(_u(s.name, c) for s, c in policy.items())
    values = (score,) + tuple(_u(policy.key(), i) for i in range(1, n_values))
    return EvalResult(values=values, metrics={"score": score}, sites=sites)

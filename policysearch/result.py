"""What evaluating one policy returns (torch-free: strategies read it, the driver records it)."""
from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EvalResult", "PerImage", "SiteMetrics"]


@dataclass(frozen=True, kw_only=True)
class SiteMetrics:
    """ASQNR (dB, paper eq. 10) of a site's input (gamma) and output (beta) against float.

    Stored in the 20·log10 convention of :func:`policysearch.objectives.sqnr.asqnr`; see
    :func:`policysearch.objectives.sqnr.convert_db` for 10·log10 (exactly half).
    """

    gamma: float
    beta: float

    @property
    def diff(self) -> float:
        """Eq. 11 read literally: SQNR diff = beta - gamma."""
        return self.beta - self.gamma

    @property
    def drop(self) -> float:
        """SQNR lost across the site: gamma - beta."""
        return self.gamma - self.beta

    @property
    def absdiff(self) -> float:
        """How much the SQNR changes across the site, either way: |beta - gamma|."""
        return abs(self.beta - self.gamma)

    def to_dict(self) -> dict[str, float]:
        return {"gamma": self.gamma, "beta": self.beta, "diff": self.diff}


@dataclass(frozen=True, kw_only=True)
class PerImage:
    """Per evaluation image, for paired intervals (:mod:`policysearch.stats`): whether top-1 was
    right (``None`` without labels), whether it agreed with float, and KL(float || quantized).

    Kept encoded (base64 of packed bits / little-endian float32), so a result stays small, hashable
    and JSON-ready in the study; :meth:`arrays` decodes."""

    n: int
    correct: str | None
    agree: str
    kl: str

    @classmethod
    def from_arrays(cls, *, correct: Any, agree: Any, kl: Any) -> "PerImage":
        import numpy as np  # deferred: result belongs to the light layer (policy, strategies); numpy only here

        kl = np.asarray(kl, dtype="<f4").reshape(-1)
        return cls(n=len(kl), correct=None if correct is None else _bits(correct), agree=_bits(agree),
                   kl=base64.b64encode(kl.tobytes()).decode())

    def arrays(self) -> dict[str, Any]:
        """``{"correct": bool array or None, "agree": bool array, "kl": float64 array}``."""
        import numpy as np  # deferred: result belongs to the light layer (policy, strategies); numpy only here

        def bits(text: str) -> Any:
            raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
            return np.unpackbits(raw)[: self.n].astype(bool)

        return {"correct": None if self.correct is None else bits(self.correct), "agree": bits(self.agree),
                "kl": np.frombuffer(base64.b64decode(self.kl), dtype="<f4").astype(np.float64)}

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "correct": self.correct, "agree": self.agree, "kl": self.kl}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PerImage":
        return cls(n=int(data["n"]), correct=data.get("correct"), agree=str(data["agree"]), kl=str(data["kl"]))


def _bits(values: Any) -> str:
    import numpy as np  # deferred: result belongs to the light layer (policy, strategies); numpy only here

    return base64.b64encode(np.packbits(np.asarray(values, dtype=bool).reshape(-1)).tobytes()).decode()


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """Objective value(s), model-level metrics and per-site SQNR for one policy.

    ``values`` follow the objective's ``directions``. A failed or non-finite evaluation keeps
    ``error`` set; strategies must treat it as the worst possible result, never crash on it.
    """

    values: tuple[float, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    sites: Mapping[str, SiteMetrics] = field(default_factory=dict)
    error: str | None = None
    #: per-image scores on the evaluation images (None: not measured, e.g. a result from before)
    images: PerImage | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if self.error is None and not all(math.isfinite(v) for v in self.values):
            object.__setattr__(self, "error", f"non-finite objective value(s) {self.values}")

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def value(self) -> float:
        return self.values[0]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "values": list(self.values),
            "metrics": dict(self.metrics),
            "sites": {k: v.to_dict() for k, v in self.sites.items()},
            "error": self.error,
        }
        if self.images is not None:
            out["images"] = self.images.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalResult":
        return cls(
            values=tuple(data["values"]),
            metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
            sites={
                k: SiteMetrics(gamma=float(v["gamma"]), beta=float(v["beta"]))
                for k, v in data.get("sites", {}).items()
            },
            error=data.get("error"),
            images=PerImage.from_dict(data["images"]) if data.get("images") else None,
        )

    @classmethod
    def failed(cls, n_values: int, error: str) -> "EvalResult":
        return cls(values=(math.nan,) * n_values, error=error)

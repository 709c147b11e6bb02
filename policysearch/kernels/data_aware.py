"""Data-aware integer operators after IPTQ-ViT (Kim, Lee, Kim, WACV 2026, arXiv 2511.15369).

Their constants are fitted, per site, to the inputs that site saw on the calibration images
(``QuantSite`` observes the range while calibrating and calls :meth:`fit` before first use).
The paper's code is not public; the forms below are those its abstract and public readings state,
and every choice they leave open is named here.

``gelu/poly_gelu`` (Data-aware Poly-GELU). I-BERT's i-GELU, ``GELU(x) = x/2 (1 + L(x/sqrt 2))``,
with its second-order erf term replaced by a fourth-order one::

    L(u) = sign(u) * (a * (min(|u|, -b) + b)^4 + 1)

``(a, b)`` minimise the squared error to ``erf`` on :data:`FIT_POINTS` evenly spaced points of
``u = x / sqrt 2`` over the site's observed ``[min x, max x]`` (open choice: uniform points, not
the empirical distribution). The fit is closed-form least squares for ``a`` at each ``b`` of a
grid (``-b`` from 0.25 to 6 in steps of 0.01), then the same on a 1e-5 grid within 0.01 of the
best; ``a`` is then negative by construction. ``gelu/poly_gelu_fixed`` uses the pair quoted by
public readings of the paper, :data:`FIXED_PAIR`.

Integer evaluation (no float operation between the input and output integers; the integer
constants are derived once from ``a``, ``b`` and the input scale ``s``, as I-BERT derives its own)::

    x_int = round(x / s)                         s_e = s / sqrt 2
    b_int = round(b / s_e)                       k1  = max(0, ceil(log2(b_int^2)) - 15)
    t     = min(|x_int|, -b_int) + b_int         u   = floor(t^2 / 2^k1)        (u <= 2^15)
    scale_L = a s_e^4 2^(2 k1)  (negative)       one = floor(1 / scale_L)        (negative)
    k2    = max(0, ceil(log2 |one|) - 14)
    L_int = floor(sign(x_int) (u^2 + one) / 2^k2),   one2 = floor(one / 2^k2)
    out_int = -x_int (L_int + one2)              out_scale = -s scale_L 2^k2 / 2   (positive)

Every intermediate stays below 2^31 for inputs up to 16 bits; the integers are held in float64
(exact to 2^53). Deviation from the references' convention: ``x / s`` is rounded (the references
leave float noise in it), so the output depends on the input integers alone.

``softmax/fit_exp``: I-BERT's softmax (:class:`~policysearch.kernels.ibert.IBertSoftmax`: i-exp
``exp(x) = 2^-z (a p^2 + b p + c)`` with ``x = z x0 + p``, ``x0 = -0.6931``, then its 16-bit
requantisation and ``2^32 / sum`` normalisation, on the same accumulator input) whose polynomial
``(a, b, c)`` minimises the squared error to ``exp`` on :data:`FIT_POINTS` evenly spaced points of
the shifted input ``x - rowmax`` over the observed ``[max(min, 30 x0), 0]`` (open choice: the
absolute error, uniform points). On a range wider than a few periods this lands near I-BERT's
own constants; it gains where the shifted inputs span little (flat attention rows). A fit whose
``a`` is not positive (not expected for exp) falls back to I-BERT's constants.

LayerNorm has no data-aware method: its non-linear part is the integer square root of the
variance, computed exactly by Newton's iteration (I-ViT) or a float sqrt (I-BERT), so there is no
approximation whose constants a range could tune (see ``docs/architecture.md``).

Without a calibrated range (an uncalibrated model quantizes dynamically) the kernel fits on the
range of each call's own input, like the dynamic activation ranges.

Gradients: IPTQ-ViT is post-training and publishes no training graph, so in QAT both STE modes
give the float operator's gradient (the descriptors say ``reference_ste=False``); the forward
value is the integer one in every mode.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from policysearch.kernels._common import IEXP_COEF, IEXP_N, IEXP_X0, as_scale, exp2_int, with_ste
from policysearch.kernels.ibert import IBertSoftmax

__all__ = ["FIT_POINTS", "FIXED_PAIR", "FitExpSoftmax", "PolyGELU", "fit_exp_poly", "fit_poly_gelu",
           "poly_erf"]

#: points of the fixed fitting grid over the observed range
FIT_POINTS = 2001
#: (a, b) quoted by public readings of IPTQ-ViT (``gelu/poly_gelu_fixed``)
FIXED_PAIR = (-0.019913, -2.698088)
_SQRT2 = math.sqrt(2.0)


def poly_erf(u: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The float form ``L(u) = sign(u) (a (min(|u|, -b) + b)^4 + 1)``."""
    return torch.sign(u) * (a * (torch.clamp(u.abs(), max=-b) + b) ** 4 + 1.0)


def _ls_a(u_abs: torch.Tensor, target: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per clip point ``c = -b`` (a vector): the least-squares ``a`` and its squared error."""
    g = (torch.minimum(u_abs[None, :], c[:, None]) - c[:, None]) ** 4
    gg = (g * g).sum(1)
    a = (g * target).sum(1) / torch.where(gg > 0, gg, torch.ones_like(gg))
    sse = ((a[:, None] * g - target) ** 2).sum(1)
    return a, torch.where(gg > 0, sse, torch.full_like(sse, math.inf))


def fit_poly_gelu(lo: float, hi: float) -> tuple[float, float]:
    """``(a, b)`` of :func:`poly_erf` fitted to ``erf`` over ``x`` in ``[lo, hi]`` (module docstring)."""
    lo, hi = _check_range(lo, hi, "poly_gelu")
    u = torch.linspace(lo, hi, FIT_POINTS, dtype=torch.float64) / _SQRT2
    u_abs = u.abs()
    target = torch.special.erf(u_abs) - 1.0  # sign(u) (a g + 1) - erf(u) = sign(u) (a g - (|erf| - 1))
    coarse = torch.arange(25, 601, dtype=torch.float64) / 100.0
    a, sse = _ls_a(u_abs, target, coarse)
    c0 = float(coarse[int(torch.argmin(sse))])
    fine = c0 + torch.arange(-1000, 1001, dtype=torch.float64) * 1e-5
    fine = fine[fine > 0]
    a, sse = _ls_a(u_abs, target, fine)
    i = int(torch.argmin(sse))
    return float(a[i]), -float(fine[i])


def fit_exp_poly(lo: float) -> tuple[float, float, float]:
    """``(a, b, c)`` of i-exp's polynomial fitted to ``exp`` over ``[max(lo, 30 x0), 0]``."""
    lo = max(_check_range(lo, 0.0, "fit_exp")[0], IEXP_N * IEXP_X0)
    x = torch.linspace(lo, 0.0, FIT_POINTS, dtype=torch.float64)
    z = torch.floor(x / IEXP_X0)
    p = x - z * IEXP_X0
    w = torch.exp2(-z)
    design = torch.stack([w * p * p, w * p, w], dim=1)
    coef = torch.linalg.lstsq(design, torch.exp(x)[:, None], driver="gelsd").solution[:, 0]
    a, b, c = (float(v) for v in coef)
    return (a, b, c) if a > 0 else IEXP_COEF


def _check_range(lo: float, hi: float, what: str) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what}: the observed input range [{lo}, {hi}] is not finite")
    if hi - lo < 1e-6:  # a constant input: fit on a small interval around it
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


class _Fitted(nn.Module):
    """A kernel with fitted constants: ``fit(lo, hi)``, ``constants()`` for the policy JSON."""

    fixed: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.fitted_range: tuple[float, float] | None = None

    def fit(self, lo: float, hi: float) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def load_fit(self, constants: dict[str, float], fitted_range: tuple[float, float] | None) -> None:
        """Take the constants :meth:`constants` gave (a saved integer artifact) instead of fitting."""
        self._set_constants(constants)
        self.fitted_range = fitted_range

    def _set_constants(self, constants: dict[str, float]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _ensure(self, x: torch.Tensor) -> None:
        """No fitted range (uncalibrated): fit on this call's own input (dynamic)."""
        if self.fitted_range is None and not self.fixed:
            self.fit(*self.input_range(x))
            self.fitted_range = None  # dynamic: refit on every call

    @staticmethod
    def input_range(x: torch.Tensor) -> tuple[float, float]:
        finite = x[torch.isfinite(x)]
        return (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)


class PolyGELU(_Fitted):
    """Data-aware Poly-GELU (module docstring); ``fixed=True`` keeps :data:`FIXED_PAIR`."""

    def __init__(self, *, fixed: bool = False) -> None:
        super().__init__()
        self.fixed = fixed
        self.a, self.b = FIXED_PAIR

    def fit(self, lo: float, hi: float) -> None:
        if not self.fixed:
            self.a, self.b = fit_poly_gelu(lo, hi)
        self.fitted_range = (float(lo), float(hi))  # as passed: the site compares it to its range

    def _set_constants(self, constants: dict[str, float]) -> None:
        self.a, self.b = float(constants["a"]), float(constants["b"])

    def row_local(self) -> bool:
        """Elementwise once its constants are fixed (fitted on calibration, or the fixed pair); an
        uncalibrated kernel fits on each call's whole input, a statistic of the batch."""
        return self.fixed or self.fitted_range is not None

    def constants(self) -> dict[str, float]:
        out = {"a": self.a, "b": self.b}
        if self.fitted_range is not None and not self.fixed:
            out.update(lo=self.fitted_range[0], hi=self.fitted_range[1])
        return out

    def integers(self, s: torch.Tensor) -> dict[str, float]:
        """The integer constants at input scale ``s``, as Python numbers (float64).

        They depend only on the scale and the fitted pair, so they are computed once per call on
        the host, not in the tensor graph: an exported ONNX model then holds exactly these values.
        """
        s_e = float(s) / _SQRT2
        b_int = float(round(self.b / s_e))  # round, not floor: the clip point moves by <= s_e / 2
        k1 = max(math.ceil(math.log2(b_int * b_int)) - 15, 0)
        scale_l = self.a * s_e**4 * 2.0 ** (2 * k1)
        one = float(math.floor(1.0 / scale_l))
        k2 = max(math.ceil(math.log2(abs(one))) - 14, 0)
        return {"b_int": b_int, "k1": float(k1), "one": one, "k2": float(k2), "one2": float(math.floor(one / 2.0**k2)),
                "out_scale": -float(s) * scale_l * 2.0**k2 / 2}

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = as_scale(scale, x)
        with torch.no_grad():
            self._ensure(x.detach())
            c = self.integers(s)
            x_int = torch.round(x.detach().double() / s.double())
            t = torch.clamp(x_int.abs(), max=-c["b_int"]) + c["b_int"]
            u = torch.floor(t * t / 2.0 ** c["k1"])
            l_int = torch.floor(torch.sign(x_int) * (u * u + c["one"]) / 2.0 ** c["k2"])
            out_int = -x_int * (l_int + c["one2"])
            out_scale = torch.tensor(c["out_scale"], dtype=torch.float32, device=x.device)
            y = (out_int * float(out_scale)).float()
        return with_ste(x, y, lambda: nn.functional.gelu(x)), out_scale


class FitExpSoftmax(_Fitted, IBertSoftmax):
    """I-BERT's softmax with the i-exp polynomial fitted to the site's shifted inputs."""

    def __init__(self, output_bit: int = 8) -> None:
        super().__init__()  # _Fitted, then IBertSoftmax (output_bit set below)
        self.output_bit = output_bit
        self.coef = IEXP_COEF

    def fit(self, lo: float, hi: float = 0.0) -> None:
        self.coef = fit_exp_poly(lo)
        self.fitted_range = (float(lo), float(hi))

    def _set_constants(self, constants: dict[str, float]) -> None:
        self.coef = (float(constants["a"]), float(constants["b"]), float(constants["c"]))

    def constants(self) -> dict[str, float]:
        a, b, c = self.coef
        out = {"a": a, "b": b, "c": c}
        if self.fitted_range is not None:
            out["lo"] = self.fitted_range[0]
        return out

    @staticmethod
    def input_range(x: torch.Tensor) -> tuple[float, float]:
        shifted = x - x.amax(dim=-1, keepdim=True)
        return _Fitted.input_range(shifted)

    def _i_exp(self, x_int: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """I-BERT's ``int_exp`` (``_common.i_exp_poly``) with this kernel's polynomial."""
        a, b, c = self.coef
        x0_int = torch.floor(IEXP_X0 / s)
        x_int = torch.maximum(x_int, IEXP_N * x0_int)
        q = torch.floor(x_int / x0_int)
        r = x_int - x0_int * q
        z = r * (r + torch.floor((b / a) / s)) + torch.floor((c / a) / s**2)
        exp_int = torch.clamp(torch.floor(z * exp2_int(IEXP_N - q)), min=0)
        return exp_int, a * s**2 / 2**IEXP_N

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = as_scale(scale, x)
        with torch.no_grad():
            self._ensure(x.detach())
            x_int = x.detach() / s
            x_int = torch.nan_to_num(x_int - x_int.amax(dim=-1, keepdim=True), nan=0.0, neginf=-3.0e38)
            x_int, s_exp = self._coarsen(x_int, s)
            exp_int, exp_scale = self._i_exp(x_int, s_exp)
            exp_int = self._requant16(exp_int, exp_scale)
            factor = torch.floor(2**32 / exp_int.sum(dim=-1, keepdim=True))
            out_int = torch.floor(exp_int * factor / 2 ** (32 - self.output_bit))
            out_scale = torch.tensor(1.0 / 2**self.output_bit, device=x.device)
        return with_ste(x, out_int * out_scale, lambda: x.softmax(-1)), out_scale


def poly_gelu(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return PolyGELU()


def poly_gelu_fixed(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return PolyGELU(fixed=True)


def fit_exp(*, bits: int | None, norm: nn.LayerNorm | None) -> nn.Module:
    return FitExpSoftmax(bits if bits is not None else 8)

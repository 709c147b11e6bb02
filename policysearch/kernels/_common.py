"""Shared pieces of the integer kernels: STE wrapping, the i-exp polynomials.

Conventions of every official reference, kept here: integers are simulated in float32,
``x_int = x / scale`` is *not* rounded (but in I-BERT's / I-ViT's GELU and LayerNorm), "floor" is ``torch.floor`` and "round" ``torch.round``
(half to even), and float32 intermediates are kept where the references have them (so
``2**31 - 1`` becomes ``2**31`` when it meets a float32 tensor).

Gradients (QAT). The forward pass is always the integer computation, value for value, with or
without autograd. What flows backward is chosen by :func:`ste_gradients` (default ``"float"``):

* ``"float"``: the gradient of the float operator the kernel replaces (softmax, GELU, LayerNorm)
  evaluated at the kernel's input: a smooth surrogate.
* ``"reference"``: as I-BERT's and I-ViT's QAT code computes it: the gradient of the integer
  computation itself, with every floor and round passed straight through (``floor_ste`` /
  ``round_ste``: identity backward), the scales and integer constants held fixed (they come from
  ``torch.no_grad`` blocks or from running ranges there). FQ-ViT has no training code; its
  operators get the same rule. No kernel builds this graph op by op: each computes its derivative
  in closed form without autograd (every floor and round passing, the constants held as the graph
  holds them), next to or fused with its integer pass (which stays the forward value, bit for
  bit), and applies it in one backward node; ``tests/test_ste_closed_form.py`` checks each against
  the op-by-op graph (equal up to float rounding). Deviations from the references' graphs are
  listed per kernel.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.quant.ste import floor_ste, round_ste

__all__ = ["STE_MODES", "IntSqrtLayerNorm", "as_scale", "current_ste", "exp2_int", "exp2_int_traceable",
           "floor_ste", "i_exp_poly", "i_exp_poly_parts", "i_exp_poly_ste", "i_exp_scale", "round_ste", "shift_exp", "softmax_front", "softmax_grad", "shift_exp_parts", "shift_exp_ste",
           "reference_grad", "row_max", "ste_gradients", "value_with_grad_of", "with_grad_coef", "with_ste"]

def as_scale(scale: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A float32 scale tensor on ``x``'s device, shape () / (1,) / (C,) broadcasting on the last dim."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return s.reshape(()) if s.numel() == 1 else s.reshape(-1)


#: how gradients pass the integer kernels in QAT (module docstring)
STE_MODES = ("float", "reference")
_STE_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("policysearch_ste_mode", default="float")


def current_ste() -> str:
    """The gradient rule the kernels use now: ``"float"`` (default) or ``"reference"``."""
    return _STE_MODE.get()


@contextlib.contextmanager
def ste_gradients(mode: str) -> Iterator[None]:
    """Within the block, kernels pass gradients by ``mode`` (see :data:`STE_MODES`); forward
    values never change. The mode is read when the forward pass runs."""
    if mode not in STE_MODES:
        raise ValueError(f"unknown STE mode {mode!r}; valid: {', '.join(STE_MODES)}")
    token = _STE_MODE.set(mode)
    try:
        yield
    finally:
        _STE_MODE.reset(token)


class _ValueWithGradOf(torch.autograd.Function):
    """Forward: ``value`` exactly (no float re-association); backward: into ``surrogate``."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # noqa: ANN001
        return None, grad


_LN2 = math.log(2.0)


def value_with_grad_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` (a tensor computed without autograd) whose gradient flows into ``surrogate``."""
    return _ValueWithGradOf.apply(value, surrogate)


def reference_grad(x: torch.Tensor, params: tuple[torch.Tensor, ...] = ()) -> bool:
    """Whether this call must build the ``"reference"`` gradient (autograd on, ``x`` or a param
    needing a gradient, :func:`current_ste` ``"reference"``): kernels whose closed form shares its
    work with the integer pass take their fused path then."""
    return (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
            and current_ste() == "reference")


def with_ste(x: torch.Tensor, y_int: torch.Tensor, y_float: Callable[[], torch.Tensor],
             y_reference: Callable[[], torch.Tensor] | None = None, *,
             params: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """The integer result ``y_int`` forward (exactly); backward, by :func:`current_ste`: the
    gradient of ``y_float()`` (the float operator) or of ``y_reference()`` (the integer
    computation with straight-through floors and rounds, built with autograd on). Nothing is
    built unless ``x`` or one of ``params`` (a LayerNorm's weight and bias) needs a gradient."""
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return y_int
    graph = y_reference if (y_reference is not None and current_ste() == "reference") else y_float
    surrogate = graph()
    if not surrogate.requires_grad:
        return y_int
    return value_with_grad_of(y_int, surrogate)


class _LayerNormGrad(torch.autograd.Function):
    """Backward of :meth:`IntSqrtLayerNorm._reference_graph`: ``out = (floor(y f / 2) + bias_int)
    base w`` with ``f = floor(NUM / std(y))``, ``y = x / s - round(mean)``; the forward returns
    ``out_int`` (a surrogate value: ``with_ste`` forwards the integer pass)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, s: torch.Tensor,  # noqa: ANN001, PLR0913
                y: torch.Tensor, dstd: torch.Tensor, factor: torch.Tensor, dfactor: torch.Tensor,
                out_int: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, s, y, dstd, factor, dfactor, out_int, base)
        return out_int

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        weight, s, y, dstd, factor, dfactor, out_int, base = ctx.saved_tensors
        lead = tuple(range(grad.dim() - 1))
        g_w = g_b = g_x = None
        if ctx.needs_input_grad[1]:
            g_w = (grad * out_int).sum(dim=lead) * base
        if ctx.needs_input_grad[2]:
            g_b = grad.sum(dim=lead) * (base * weight) / base / weight
        if ctx.needs_input_grad[0]:
            g_out = grad * (base * weight)
            g_std = (g_out * y).sum(dim=-1, keepdim=True).mul_(0.5).mul_(dfactor)
            g_y = g_out.mul_(factor).mul_(0.5).add_(dstd.mul(g_std))
            g_x = g_y.sub_(g_y.mean(dim=-1, keepdim=True)).div_(s)
        return g_x, g_w, g_b, *([None] * 7)


def exp2_int(k: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """``2.0 ** k`` for integer-valued float ``k``, built from the float32 bits.

    Exact for ``k`` in [-126, 127], like ``2 ** k`` in the references, and several times cheaper
    than ``torch.pow``. Outside that range it saturates to ``0`` / ``inf`` as float32 ``2 ** k``
    does (I-ViT's GELU reaches ``2^(n - q) = inf`` on very negative rows at fine input scales).
    The biased exponent ``(k + 127) * 2^23`` (at most ``255 * 2^23``) is exact in float32, so the
    arithmetic stays in float until the one cast: no integer shift, which is slow on CPU.
    ``inplace=True`` may overwrite ``k`` (the result then reuses its buffer).
    """
    bits = (k.clamp_(-127.0, 128.0) if inplace else torch.clamp(k, -127.0, 128.0)).add_(127.0).mul_(8388608.0)
    if inplace:  # the int32 conversion in the same buffer: element by element, same width
        ints = bits.view(torch.int32)
        return ints.copy_(bits).view(torch.float32)
    return bits.to(torch.int32).view(torch.float32)


def exp2_int_traceable(k: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """:func:`exp2_int` without the float32 bit cast (which the ONNX tracer rejects): the same
    values, ``Pow(2, k)`` with the same saturation; swapped in by ``policysearch.deploy.onnx_export``."""
    k = torch.clamp(k, -127.0, 128.0)
    return torch.where(k <= -127.0, torch.zeros_like(k), torch.pow(torch.full_like(k, 2.0), k))


# I-BERT i-exp (IntSoftmax.int_polynomial / int_exp), shared by I-BERT and FQ-ViT.
IEXP_X0 = -0.6931  # ~ -ln 2
IEXP_N = 30
IEXP_COEF = (0.35815147, 0.96963238, 1.0)


def i_exp_poly(x_int: torch.Tensor, s: torch.Tensor, *, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """I-BERT's integer exp of ``x_int <= 0`` at scale ``s``: ``(exp_int, exp_scale)``.

    Each step is the reference's float32 operation in the reference's order (no fused
    multiply-add), written in place; ``inplace=True`` may overwrite ``x_int``.
    """
    a, b, c = IEXP_COEF
    b_over_a, c_over_a = b / a, c / a  # Python floats, as the reference stores them
    x0_int = torch.floor(IEXP_X0 / s)
    floor_at = IEXP_N * x0_int
    x_int = x_int.clamp_(min=floor_at) if inplace and floor_at.dim() == 0 else torch.maximum(x_int, floor_at)
    q = torch.floor_(x_int / x0_int)
    z = q * x0_int
    r = x_int.sub_(z)  # r = x_int - x0_int * q
    b_int = torch.floor(b_over_a / s)
    c_int = torch.floor(c_over_a / s**2)
    # z = r * (r + b_int) + c_int, in z's buffer: 0 * finite + r is r exactly
    z = z.mul_(0.0).add_(r).add_(b_int).mul_(r).add_(c_int)
    # 2^(n-q) can reach 2^30 * c_int (~1e12): float32 as in the reference
    exp_int = torch.clamp_(torch.floor_(z.mul_(exp2_int(q.neg_().add_(IEXP_N), inplace=True))), min=0)
    return exp_int, i_exp_scale(s)


def i_exp_scale(s: torch.Tensor) -> torch.Tensor:
    """The scale of :func:`i_exp_poly`'s ``exp_int`` at input scale ``s``: ``a s^2 / 2^n``."""
    return IEXP_COEF[0] * s**2 / 2**IEXP_N


def shift_exp(x_int: torch.Tensor, s: torch.Tensor, n: int, *, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """I-ViT's ``int_exp_shift``: e^x by shifts, log2(e) ~ 1.0111b, linear 2^f ~ 1 + f/2.

    Written with in-place operations (``inplace=True`` may overwrite ``x_int``); divisions by
    powers of two are exact multiplications. Same integers as the reference.
    """
    # (x + floor(x/2)) - floor(x/16) in the reference's order: x_int is not integral, so the
    # float32 sums must associate the same way
    sixteenth = torch.floor_(x_int * 0.0625)
    half = torch.floor_(x_int * 0.5)
    t = (x_int.add_(half) if inplace else half.add_(x_int)).sub_(sixteenth)
    x0_int = torch.floor(-1.0 / s)
    t = torch.clamp_(t, min=n * x0_int) if x0_int.dim() == 0 else torch.maximum(t, n * x0_int)
    # q = floor(t / x0_int) and r = t - q * x0_int, formed in the spent buffers when they fit
    spent = x0_int.dim() == 0 and inplace
    q = torch.floor_(half.copy_(t).div_(x0_int) if spent else t / x0_int)
    qx0 = sixteenth.copy_(q).mul_(x0_int) if x0_int.dim() == 0 else q * x0_int
    exp_int = t.sub_(qx0).mul_(0.5).sub_(x0_int)  # r / 2 - x0_int, r = x - x0 * q
    return torch.clamp_(torch.floor_(exp_int.mul_(exp2_int(q.neg_().add_(n), inplace=True))), min=0), s / 2**n


class _ExpSTE(torch.autograd.Function):
    """An integer exp whose backward is the closed form of its straight-through graph.

    ``forward(x_int, value, coef)``: returns ``value`` (the integer pass, computed without
    autograd); backward: ``grad * coef``, the derivative ``d value / d x_int`` that the
    reference's op-by-op graph (every floor straight through) gives, computed once in the forward.
    """

    @staticmethod
    def forward(ctx, x_int: torch.Tensor, value: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(coef)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (coef,) = ctx.saved_tensors
        return grad * coef, None, None


def with_grad_coef(x: torch.Tensor, value: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``value`` (computed without autograd) whose gradient is ``grad * coef`` into ``x``: an
    elementwise operator's straight-through gradient in closed form (``coef = d value / d x``)."""
    return _ExpSTE.apply(x, value, coef)


class _SoftmaxGrad(torch.autograd.Function):
    """Backward of a softmax kernel's straight-through graph in closed form (:func:`softmax_grad`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,  # noqa: ANN001
                d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, d, idx)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        a, b, d, idx = ctx.saved_tensors
        row = (grad * d).sum(dim=-1, keepdim=True)
        g = torch.mul(grad, a).addcmul_(b, row)
        return g.scatter_add_(-1, idx, g.sum(dim=-1, keepdim=True).neg_()), None, None, None, None, None


def softmax_grad(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor,
                 idx: torch.Tensor) -> torch.Tensor:
    """``y`` (computed without autograd), whose gradient into ``x`` is ``G_i - [i = idx] sum_j G_j`` with ``G_i = g_i a_i +
    b_i sum_j g_j d_j``: a softmax kernel's straight-through gradient (the row maximum at ``idx``
    subtracted, as ``max``'s gradient; a per-element derivative ``a`` and a row-sum term through
    ``d`` and ``b``). The parts come from :func:`softmax_front` and the kernel, without autograd."""
    return _SoftmaxGrad.apply(x, y, a, b, d, idx)


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.max(dim=-1, keepdim=True)``: the row maxima and the index of each row's first maximum
    (the documented choice of ``torch.max``, whose gradient goes there), from ``amax`` and one
    comparison: on CPU ``max`` with indices is not vectorized (about 20x slower than ``amax``). A
    row with a NaN gets NaN and some index in range (its gradient is NaN in any case)."""
    top = x.amax(dim=-1, keepdim=True)
    n = x.shape[-1]
    rank = torch.arange(n, 0, -1, dtype=torch.float32, device=x.device)  # n - index
    # 1 where x equals the maximum (sign(x - top) + 1, float passes only; an all -inf row's NaN
    # differences count as maxima, so its index is 0 as torch.max's), 0 below
    first = torch.sub(x, top).sign_().add_(1.0).nan_to_num_(nan=1.0).mul_(rank).amax(dim=-1, keepdim=True)
    return top, first.neg_().add_(n).clamp_(max=n - 1).long()


def softmax_front(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The softmax graphs' first steps without autograd: ``u = nan_to_num(x / s - max)`` (``-inf``
    to ``-3e38``), ``d u / d x_i`` where the row maximum passes nothing (``1 / s`` where ``x / s - max``
    is finite, else 0: ``nan_to_num``'s gradient) and the maximum's index (``max``'s gradient)."""
    x_int = x / s
    top, idx = row_max(x_int)
    u = x_int.sub_(top)
    du = torch.isfinite(u).to(u.dtype).div_(s)
    return torch.nan_to_num_(u, nan=0.0, neginf=-3.0e38), du, idx


def _max_mask(x: torch.Tensor, floor_at: torch.Tensor) -> torch.Tensor:
    """``torch.maximum(x, floor_at)``'s gradient for ``x``: 1 above, 1/2 at a tie, 0 below
    (``(sign(x - floor_at) + 1) / 2``: float passes only, no bool tensors)."""
    return (x - floor_at).sign_().add_(1.0).mul_(0.5)


def i_exp_poly_ste(x_int: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """:func:`i_exp_poly` with I-BERT's gradient (``int_exp`` with ``floor_ste``): ``exp_int``.

    The value is the integer pass. The gradient is the closed form of the reference's graph: with
    ``q = floor_ste(x / x0)`` and ``r = x - x0 q``, ``dr/dx = 1 - x0 / x0 = 0``, so only
    ``2^(n - q)`` carries it: ``d exp / dx = -ln 2 * z 2^(n - q) / x0`` where ``x > n x0`` (half at
    the tie, as ``torch.maximum``) and ``exp_int > 0`` (``torch.clamp`` passes no gradient at its
    bound); the op-by-op graph gives the same up to float rounding
    (tested) at a fraction of the cost. ``s`` carries no gradient (the reference computes the
    constants under ``torch.no_grad``)."""
    with torch.no_grad():
        exp_int, coef = i_exp_poly_parts(x_int.detach(), s.detach(), grad=x_int.requires_grad)
    return exp_int if coef is None else _ExpSTE.apply(x_int, exp_int, coef)


def i_exp_poly_parts(x: torch.Tensor, s: torch.Tensor, *, grad: bool = True,
                     inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`i_exp_poly_ste`'s value and its derivative ``d exp / dx`` (``None`` unless ``grad``),
    without autograd: for closed forms built on it. :func:`i_exp_poly`'s operations, keeping
    ``z 2^(n - q)`` before the floor, in a few buffers (``inplace=True`` may overwrite ``x``)."""
    a, b, c = IEXP_COEF
    x0_int = torch.floor(IEXP_X0 / s)
    floor_at = IEXP_N * x0_int
    mask = torch.sub(x, floor_at).sign_().add_(1.0).mul_(0.5) if grad else None  # _max_mask
    xc = torch.maximum(x, floor_at, out=x) if inplace else torch.maximum(x, floor_at)
    q = torch.floor_(xc / x0_int)
    r = xc.sub_(x0_int * q)
    zp = torch.add(r, torch.floor((b / a) / s)).mul_(r).add_(torch.floor((c / a) / s**2))
    zp = zp.mul_(exp2_int(q.neg_().add_(IEXP_N), inplace=True))
    exp_int = torch.floor(zp).clamp_(min=0)
    if not grad:
        return exp_int, None
    # the clamp at 0 passes where exp_int > 0 (torch's clamp stops the gradient at its bound)
    mask = mask.mul_(r.copy_(exp_int).clamp_(max=1.0))
    return exp_int, zp.mul_((-_LN2) / x0_int).mul_(mask)


def shift_exp_ste(x_int: torch.Tensor, s: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`shift_exp` with I-ViT's gradient (``int_exp_shift`` with ``floor_ste``): ``exp_int``.

    The value is the integer pass. The gradient is the closed form of the reference's graph:
    ``t = x + floor(x/2) - floor(x/16)`` passes ``1.4375``, ``r = t - x0 q`` passes ``1 - x0 / x0 =
    0``, so only ``2^(n - q)`` carries it: ``d exp / dx = -1.4375 ln 2 * (r/2 - x0) 2^(n - q) / x0``
    where ``t > n x0`` (half at the tie), ``exp_int > 0`` and ``n - q < 127`` (the clamps' open
    bounds, as ``torch.clamp``'s gradient); the op-by-op graph gives the
    same up to float rounding (tested). One guard the reference lacks: the exponent ``n - q`` is
    capped at 127 (where the integer pass saturates to ``inf`` the gradient is then 0, not NaN)."""
    with torch.no_grad():
        exp_int, coef = shift_exp_parts(x_int.detach(), s.detach(), n, grad=x_int.requires_grad)
    return exp_int if coef is None else _ExpSTE.apply(x_int, exp_int, coef)


def shift_exp_parts(x: torch.Tensor, s: torch.Tensor, n: int, *, grad: bool = True, inplace: bool = False,
                    nonpositive: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`shift_exp_ste`'s value (the graph's, exponent capped at 127) and its derivative
    ``d exp / dx`` (``None`` unless ``grad``), without autograd: for closed forms built on it.
    In place in a few buffers (``inplace=True`` may overwrite ``x``): the same values.
    ``nonpositive=True``: the caller's ``x`` is ``<= 0`` (or NaN), so ``t <= x <= 0`` (``floor(x/2)
    <= floor(x/16)``), ``q >= 0`` and ``n - q <= n <= 127``: the cap never acts and is skipped; the
    value is then :func:`shift_exp`'s, bit for bit."""
    x0_int = torch.floor(-1.0 / s)
    floor_at = n * x0_int
    t = torch.floor_(x * 0.5).add_(x).sub_(torch.floor_(x * 0.0625))  # x + floor(x/2) - floor(x/16)
    work = x if inplace else torch.empty_like(t)
    mask = torch.sub(t, floor_at, out=work).sign_().add_(1.0).mul_(0.5) if grad else None  # _max_mask
    tc = torch.maximum(t, floor_at, out=t)
    q = torch.floor_(tc / x0_int)
    r = tc.sub_(x0_int * q) if x0_int.dim() else tc.sub_(q * x0_int)
    k = q.neg_().add_(n)
    capped = not (nonpositive and n <= 127)
    cap = torch.sub(126.5, k).mul_(2.0).clamp_(0.0, 1.0) if grad and capped else None  # n - q < 127 passes
    ep = r.mul_(0.5).sub_(x0_int).mul_(exp2_int(k.clamp_(max=127.0) if capped else k, inplace=True))
    exp_int = torch.floor(ep).clamp_(min=0)
    if not grad:
        return exp_int, None
    passes = mask.mul_(torch.clamp(exp_int, max=1.0))  # the clamp at 0 passes where exp > 0
    if cap is not None:
        passes = passes.mul_(cap)
    coef = ep.mul_((-1.4375 * _LN2) / x0_int).mul_(passes)
    return exp_int, coef.nan_to_num_(nan=0.0, posinf=0.0)  # a saturated 2^127 row (inf * 0): no gradient


class IntSqrtLayerNorm(nn.Module):
    """The LayerNorm shared by I-BERT and I-ViT; they differ in the integer std and numerator.

    ``y = floor((x_int - round(mean)) * floor(NUMERATOR / std_int) / 2) + floor(b / w / s_o)`` with
    ``out_scale = sqrt(C) / 2^30 * weight``, reduced over the last dim of any rank. ``x_int =
    round(x / s)`` (the references: ``x / s``, within 2^-23 of the integer) and ``mean = sum / C``:
    sums of exact integers do not depend on the summation order, so another library (ONNX Runtime)
    computes the same integers (numerics 2026.12.4). Width: the
    normalized term is at most ``2^30`` in magnitude (``|x_i - mean| <= std_int``, the root of the
    row's sum of squares), so with a bias term below ``2^30`` the output integers fit int32
    (formed in float32 as in the references).
    """

    NUMERATOR: float = 2**31

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def std_int(self, y_int: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def std_int_grad(self, y_int: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference graph's ``std_int`` of ``y_int`` (not integral: ``x / s`` there) and its
        straight-through derivative ``d std_int / d y_int`` (each floor passing), without autograd."""
        raise NotImplementedError

    @staticmethod
    def _base(x: torch.Tensor) -> torch.Tensor:
        # a float32 tensor, as the reference's dim_sqrt / 2^30: on CUDA, dividing by a Python
        # float multiplies by its reciprocal, which moves bias_int by a few units
        return torch.full((), math.sqrt(x.shape[-1]) / 2**30, dtype=torch.float32, device=x.device)

    def _reference_graph(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The reference's QAT graph's gradient (I-BERT / I-ViT ``IntLayerNorm.forward``: ``x_int =
        x / s``, ``round_ste`` on the mean, ``floor_ste`` on each floor, the output scale ``sqrt(C) /
        2^30 * weight`` carrying the weight's gradient) in closed form (:class:`_LayerNormGrad`),
        equal to the op-by-op graph up to float rounding (tested). One deviation: the reference
        computes ``bias_int`` from ``bias.data`` (its LayerNorm biases never train); here ``bias_int``
        passes the bias's gradient straight through, which makes it the float one."""
        weight, bias = self.norm.weight, self.norm.bias
        with torch.no_grad():
            x_int = x.detach() / s
            y = x_int - torch.round(x_int.mean(dim=-1, keepdim=True))
            std, dstd = self.std_int_grad(y)
            factor = torch.floor(self.NUMERATOR / std)
            dfactor = (-self.NUMERATOR / std) / std
            base = self._base(x)
            out_int = torch.floor(y * factor / 2) + torch.floor((bias.detach() / weight.detach()) / base)
        return _LayerNormGrad.apply(x, weight, bias, s, y, dstd, factor, dfactor, out_int, base)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = as_scale(scale, x)
        weight, bias = self.norm.weight, self.norm.bias
        with torch.no_grad():
            x_int = torch.round(x.detach() / s)  # exact integers: the reductions then are order-free
            y_int = x_int - torch.round(x_int.sum(dim=-1, keepdim=True) / x.shape[-1])
            factor = torch.floor(self.NUMERATOR / self.std_int(y_int))
            # floor(y_int * factor / 2): halving is exact
            y_int = torch.floor_(y_int.mul_(factor).mul_(0.5))
            base = self._base(x)
            y_int = y_int.add_(torch.floor((bias.detach() / weight.detach()) / base))
            out_scale = base * weight.detach()
        n = self.norm
        return with_ste(x, y_int.mul_(out_scale),
                        lambda: F.layer_norm(x, n.normalized_shape, weight, bias, n.eps),
                        lambda: self._reference_graph(x, s), params=(weight, bias)), out_scale

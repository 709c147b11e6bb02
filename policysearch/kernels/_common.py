"""Shared pieces of the integer kernels: the registry, STE wrapping, the i-exp polynomials.

Conventions of every official reference, kept here: integers are simulated in float32,
``x_int = x / scale`` is *not* rounded, "floor" is ``torch.floor`` and "round" ``torch.round``
(half to even), and float32 intermediates are kept where the references have them (so
``2**31 - 1`` becomes ``2**31`` when it meets a float32 tensor).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from policysearch.methods import MethodSpec, get_method
from policysearch.registry import Registry

__all__ = ["KERNELS", "IntSqrtLayerNorm", "KernelEntry", "as_scale", "exp2_int", "i_exp_poly", "register_kernel",
           "shift_exp", "with_ste"]

#: ``factory(*, bits, norm) -> nn.Module``: ``bits`` is the output bit width (the catalogue's
#: default filled in; ``None`` for a method without one), ``norm`` the replaced ``nn.LayerNorm``.
KernelFactory = Callable[..., nn.Module]


@dataclass(frozen=True, kw_only=True)
class KernelEntry:
    """A kernel factory registered against its catalogue entry (which gives its bits)."""

    factory: KernelFactory
    spec: MethodSpec

    @property
    def bits(self) -> tuple[int, ...]:
        """Allowed output bits; () = the method has none."""
        return self.spec.out_bits

    @property
    def default_bits(self) -> int | None:
        return self.spec.default_bits


#: ``"kind/method"`` -> entry; one per catalogue entry (``policysearch.methods``).
KERNELS: Registry[KernelEntry] = Registry("kernel")


def register_kernel(kind: str, method: str,
                    factory: KernelFactory | None = None) -> Callable[[KernelFactory], KernelFactory] | KernelFactory:
    """Register the kernel factory of the catalogue's ``kind``/``method``.

    ``register_kernel("gelu", "relu", lambda **_: IntReLU())`` or, as a decorator,
    ``@register_kernel("softmax", "ibert")`` on a factory. A method the catalogue does not declare
    is an :class:`~policysearch.errors.UnknownNameError`; a second kernel for one method is an error.
    """
    spec = get_method(kind, method)

    def add(f: KernelFactory) -> KernelFactory:
        KERNELS.register(spec.key, KernelEntry(factory=f, spec=spec))
        return f

    return add if factory is None else add(factory)


def as_scale(scale: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A float32 scale tensor on ``x``'s device, shape () / (1,) / (C,) broadcasting on the last dim."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return s.reshape(()) if s.numel() == 1 else s.reshape(-1)


def with_ste(x: torch.Tensor, y_int: torch.Tensor, y_float: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Integer result forward, gradient of the float operator backward (for QAT)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return y_int
    yf = y_float()
    return yf + (y_int - yf).detach()


def exp2_int(k: torch.Tensor) -> torch.Tensor:
    """``2.0 ** k`` for integer-valued float ``k``, built from the float32 bits.

    Exact for ``k`` in [-126, 127], like ``2 ** k`` in the references, and several times cheaper
    than ``torch.pow``. Outside that range it saturates to ``0`` / ``inf`` as float32 ``2 ** k``
    does (I-ViT's GELU reaches ``2^(n - q) = inf`` on very negative rows at fine input scales).
    """
    k = torch.clamp(k, -127.0, 128.0).to(torch.int32)
    return ((k + 127) << 23).view(torch.float32)


# I-BERT i-exp (IntSoftmax.int_polynomial / int_exp), shared by I-BERT and FQ-ViT.
IEXP_X0 = -0.6931  # ~ -ln 2
IEXP_N = 30
IEXP_COEF = (0.35815147, 0.96963238, 1.0)


def i_exp_poly(x_int: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """I-BERT's integer exp of ``x_int <= 0`` at scale ``s``: ``(exp_int, exp_scale)``."""
    a, b, c = IEXP_COEF
    b_over_a, c_over_a = b / a, c / a  # Python floats, as the reference stores them
    x0_int = torch.floor(IEXP_X0 / s)
    x_int = torch.maximum(x_int, IEXP_N * x0_int)
    q = torch.floor(x_int / x0_int)
    r = x_int - x0_int * q
    b_int = torch.floor(b_over_a / s)
    c_int = torch.floor(c_over_a / s**2)
    z = r * (r + b_int) + c_int
    poly_scale = a * s**2
    # 2^(n-q) can reach 2^30 * c_int (~1e12): float32 as in the reference
    exp_int = torch.clamp_(torch.floor_(z * exp2_int(IEXP_N - q)), min=0)
    return exp_int, poly_scale / 2**IEXP_N


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
    q = torch.floor_(t / x0_int)
    exp_int = t.sub_(q * x0_int).mul_(0.5).sub_(x0_int)  # r / 2 - x0_int, r = x - x0 * q
    return torch.clamp_(torch.floor_(exp_int.mul_(exp2_int(q.neg_().add_(n)))), min=0), s / 2**n


class IntSqrtLayerNorm(nn.Module):
    """The LayerNorm shared by I-BERT and I-ViT; they differ in the integer std and numerator.

    ``y = floor((x_int - round(mean)) * floor(NUMERATOR / std_int) / 2) + floor(b / w / s_o)`` with
    ``out_scale = sqrt(C) / 2^30 * weight``, reduced over the last dim of any rank.
    """

    NUMERATOR: float = 2**31

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def std_int(self, y_int: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = as_scale(scale, x)
        weight, bias = self.norm.weight, self.norm.bias
        with torch.no_grad():
            x_int = x.detach() / s
            y_int = x_int - torch.round(x_int.mean(dim=-1, keepdim=True))
            factor = torch.floor(self.NUMERATOR / self.std_int(y_int))
            y_int = torch.floor(y_int * factor / 2)
            # a float32 tensor, as the reference's dim_sqrt / 2^30: on CUDA, dividing by a Python
            # float multiplies by its reciprocal, which moves bias_int by a few units
            base = torch.full((), math.sqrt(x.shape[-1]) / 2**30, dtype=torch.float32, device=x.device)
            y_int = y_int + torch.floor((bias.detach() / weight.detach()) / base)
            out_scale = base * weight.detach()
        n = self.norm
        return with_ste(x, y_int * out_scale,
                        lambda: F.layer_norm(x, n.normalized_shape, weight, bias, n.eps)), out_scale

"""Op-by-op straight-through graphs (``floor_ste`` / ``round_ste``) of the integer exps, I-ViT's GELU
and FQ-ViT's Log-Int-Softmax: the oracles that the kernels' closed-form reference gradients are tested against
(``test_kernels.py``, ``test_ste_closed_form.py``)."""
from __future__ import annotations

import torch

from policysearch.kernels._common import value_with_grad_of
from policysearch.kernels.fqvit import log_round
from policysearch.quant.ste import floor_ste, round_ste


def i_exp_poly_graph(x_int: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """I-BERT's ``int_exp`` with ``floor_ste`` (its constants written out, not imported)."""
    a, b, c = 0.35815147, 0.96963238, 1.0
    x0_int = torch.floor(-0.6931 / s)
    x_int = torch.maximum(x_int, 30 * x0_int)
    q = floor_ste(x_int / x0_int)
    r = x_int - x0_int * q
    z = r * (r + torch.floor((b / a) / s)) + torch.floor((c / a) / s**2)
    return torch.clamp(floor_ste(z * torch.pow(2.0, 30 - q)), min=0)


def shifted_rows(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x / s`` minus its row maximum, as the softmaxes form it (NaN rows 0, -inf finite)."""
    x_int = x / s
    return torch.nan_to_num(x_int - x_int.max(dim=-1, keepdim=True).values, nan=0.0, neginf=-3.0e38)


def shift_exp_graph(x_int: torch.Tensor, s: torch.Tensor, n: int) -> torch.Tensor:
    """I-ViT's ``int_exp_shift`` with ``floor_ste`` (the exponent capped at 127, as the kernel)."""
    t = x_int + floor_ste(x_int / 2) - floor_ste(x_int / 16)
    x0_int = torch.floor(-1.0 / s)
    t = torch.maximum(t, n * x0_int)
    q = floor_ste(t / x0_int)
    e = (t - x0_int * q) / 2 - x0_int
    return torch.clamp(floor_ste(e * torch.pow(2.0, torch.clamp(n - q, max=127.0))), min=0)


def ivit_gelu_graph(x: torch.Tensor, s: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """I-ViT's ``IntGELU`` (with the kernel's one deviation: ``x_int = round(x / s)``, straight through)."""
    num = 2**31 - 1
    pre_x_int = round_ste(x / s)
    s_sig = s * 1.702
    x_max = pre_x_int.max(dim=-1, keepdim=True).values
    exp_int = shift_exp_graph(pre_x_int - x_max, s_sig, 23)
    exp_max = shift_exp_graph(-x_max, s_sig, 23)
    total = torch.clamp(exp_int + exp_max, max=num)
    factor = floor_ste(num / total)
    sig_int = floor_ste(exp_int * factor / 2 ** (32 - bits))
    return pre_x_int * sig_int * (s / 2 ** (bits - 1))


def fqvit_softmax_graph(x: torch.Tensor, s: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """FQ-ViT's Log-Int-Softmax with straight-through roundings (the ``log2`` code passing the
    gradient of ``log2(ratio)``, the ``fqvit`` module docstring)."""
    top = 2**bits - 1
    exp_int = i_exp_poly_graph(shifted_rows(x, s), s)
    zero = (exp_int == 0).detach()
    ratio = round_ste(exp_int.sum(dim=-1, keepdim=True) / torch.where(zero, torch.ones_like(exp_int), exp_int))
    ratio = torch.clamp(ratio, min=1.0)
    with torch.no_grad():
        code_int = log_round(ratio)
        mask = zero | (code_int >= 2**bits)
    code = torch.clamp(value_with_grad_of(code_int, torch.log2(ratio)), 0, top)
    return torch.pow(2.0, top - code).masked_fill(mask, 0.0) * 2.0**-top

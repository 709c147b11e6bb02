"""Quantized attention for timm's ``Attention`` (ViT/DeiT) and ``WindowAttention`` (Swin).

``native`` wiring (:class:`QuantAttention`, :class:`QuantWindowAttention`): the softmax is explicit (fused attention would hide it): ``q``, ``k``, ``v`` are quantized per
tensor, ``q·kᵀ`` is the integer accumulator with scale ``s_q·s_k·d^-½``, the softmax site runs its
method on it, ``attn·v`` uses the softmax's own output grid, and the projection's input is
requantized dyadically from the ``attn·v`` accumulator (HAWQ-V3 / I-ViT). In float mode the
module computes exactly what the timm module computes.

``paper`` wiring (:class:`PaperAttention`, :class:`PaperWindowAttention`), I-ViT's
``vit_quant.Attention`` / ``swin_quant.WindowAttention``: ``forward(x, scale[, mask]) -> (y, s)``
with ``x`` on the grid ``scale``. ``qkv`` (integer accumulator) -> ONE 8-bit quantizer on the qkv
output (``qkv_act``, I-ViT's ``qact1``: q, k and v share its scale) -> ``q_int·k_intᵀ`` with scale
``s_qkv²·d^-½`` -> 8-bit ``attn_act`` (``qact_attn1``) -> [Swin: ``+`` the relative-position bias
table quantized to 8 bits (``table_act``, ``qact_table``), both requantized and added on the
8-bit grid of ``bias_act`` (``qact2``)] -> the softmax site (Swin: the -100 mask added inside it)
-> ``p_int·v_int`` on the softmax's output grid times ``s_qkv`` -> 8-bit ``av_act``
(``qact2`` / ``qact3``) -> ``proj`` -> 16-bit ``proj_act`` (``qact3`` / ``qact4``). The site's
input quantizer (``attn_act`` in ViT, ``bias_act`` in Swin) runs at the site's ``Choice.bits``
(else ``act_bits``). Without autograd both matmuls run on the integers with
``quant.intmm.exact_matmul``: float32 where ``K * max|a| * max|b| < 2^24`` proves it exact (8-bit
``q·kᵀ`` over a head of 64: 2^20; ``attn·v`` over 197 tokens with softmax integers measured per
call), float64 otherwise (wider policies); an 8-bit ``q·kᵀ`` with large heads (a ViT's) runs as
int8 GEMMs instead, one per head (``quant.intmm.int_bmm``: the same integers, faster); with
autograd on the dequantized tensors. Disabled, every step is the float timm computation.
"""
from __future__ import annotations

import torch
from torch import nn

from policysearch.models.site import QuantSite
from policysearch.models.slicing import ATTENTION_SLICE_FACTOR, calibrated, run_sliced, slice_step
from policysearch.quant import IntAct, IntLinear, QuantAct, QuantLinear
from policysearch.quant.intmm import exact_matmul, int_bmm, to_float32

__all__ = ["PaperAttention", "PaperWindowAttention", "QuantAttention", "QuantWindowAttention"]


class _AttnBase(nn.Module):
    def __init__(self, src: nn.Module, site: QuantSite, observer: str) -> None:
        super().__init__()
        self.num_heads = src.num_heads
        self.scale = src.scale
        self.qkv = QuantLinear(src.qkv, observer)
        self.proj = QuantLinear(src.proj, observer)
        self.attn_drop = src.attn_drop
        self.proj_drop = src.proj_drop
        self.q_act, self.k_act, self.v_act = QuantAct(observer), QuantAct(observer), QuantAct(observer)
        self.softmax = site
        self.enabled = False
        self.calibrating = False
        self.act_bits = 8
        self.qk_bits = 8

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _attend(self, x: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B, N, C) -> attention output before the projection, (B, N, C')."""
        B, N, _ = x.shape
        q, k, v = self._qkv(x)
        quant = self.enabled and not self.calibrating
        if not quant:
            if self.calibrating:
                for act, t in ((self.q_act, q), (self.k_act, k), (self.v_act, v)):
                    act.observer.update(t)
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            attn = self.softmax(attn, None, mask)
            out = self.attn_drop(attn) @ v
            return out.transpose(1, 2).reshape(B, N, -1), None
        qq, s_q = self.q_act(q, self.qk_bits)
        kq, s_k = self.k_act(k, self.qk_bits)
        vq, s_v = self.v_act(v, self.act_bits)
        acc_scale = (s_q * s_k * self.scale).reshape(())
        acc = (qq * self.scale) @ kq.transpose(-2, -1)  # = q_int k_int * acc_scale
        if bias is not None:  # relative-position bias on the accumulator grid
            acc = acc + torch.round(bias / acc_scale) * acc_scale
        attn = self.softmax(acc, acc_scale, mask)
        out = self.attn_drop(attn) @ vq
        return out.transpose(1, 2).reshape(B, N, -1), s_v

    def _project(self, out: torch.Tensor, s_v: torch.Tensor | None) -> torch.Tensor:
        pre = None
        kern_scale = getattr(self.softmax, "last_out_scale", None)
        if s_v is not None and kern_scale is not None:
            pre = kern_scale * s_v
        return self.proj_drop(self.proj(out, pre))


class QuantAttention(_AttnBase):
    """Replaces ``timm.layers.Attention`` (no qk-norm, no scale-norm, no gate)."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("policysearch: attention masks are not supported in ViT sites")
        out, s_v = self._attend(x, None, None)
        return self._project(out, s_v)


class QuantWindowAttention(_AttnBase):
    """Replaces ``timm.models.swin_transformer.WindowAttention``."""

    def __init__(self, src: nn.Module, site: QuantSite, observer: str) -> None:
        super().__init__(src, site, observer)
        self.window_area = src.window_area
        self.relative_position_bias_table = src.relative_position_bias_table
        self.register_buffer("relative_position_index", src.relative_position_index, persistent=False)

    def _rel_bias(self) -> torch.Tensor:
        return _gather_bias(self.relative_position_bias_table, self.relative_position_index, self.window_area)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out, s_v = self._attend(x, self._rel_bias(), _window_mask(mask, x.shape, self.num_heads))
        return self._project(out, s_v)


def _gather_bias(table: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """timm's relative-position bias of one window, ``(1, heads, n, n)``."""
    b = table[index.view(-1)].view(n, n, -1)
    return b.permute(2, 0, 1).contiguous().unsqueeze(0)


def _window_mask(mask: torch.Tensor | None, shape: torch.Size, heads: int) -> torch.Tensor | None:
    """Swin's per-window shift mask ``(num_win, N, N)`` expanded to ``(B_, heads, N, N)``."""
    if mask is None:
        return None
    B_, N = shape[0], shape[1]
    num_win = mask.shape[0]
    full = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, heads, -1, -1)
    return full.reshape(-1, heads, N, N)


def _ints(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.div(x, scale).round_()


#: per-head products at least this large (M * N * K) run ``q·kᵀ`` as int8 GEMMs, one per head
#: (a ViT's 197 x 197 x 64); smaller ones (Swin's 49-token windows, many per batch) stay batched
INT8_HEAD_MACS = 2**18


def _int8_heads(q: torch.Tensor, bits: int) -> bool:
    N, d = q.shape[-2], q.shape[-1]
    return bits <= 8 and N * N * d >= INT8_HEAD_MACS and not torch.jit.is_tracing()


class _PaperAttnBase(nn.Module):
    def __init__(self, src: nn.Module, site: QuantSite, observer: str) -> None:
        super().__init__()
        self.num_heads = src.num_heads
        self.scale = src.scale
        self.qkv = IntLinear(src.qkv, observer)
        self.qkv_act = IntAct(observer)
        self.attn_act = IntAct(observer)
        self.softmax = site
        self.av_act = IntAct(observer)
        self.proj = IntLinear(src.proj, observer)
        self.proj_act = IntAct(observer, bits=16, role="residual")
        self.attn_drop = src.attn_drop
        self.proj_drop = src.proj_drop
        self.enabled = False
        site._input_act = [self.attn_act]
        self.qkv_act.keep_ints = True  # the matmuls work on its integers
        self.av_act.keep_ints, self.proj.source = True, [self.av_act]

    def _logits(self, q: torch.Tensor, k: torch.Tensor, s: torch.Tensor | None,
                qkv_int: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if qkv_int is not None:
            qi, ki, _ = qkv_int.unbind(0)
            acc_scale = s * s * self.scale
            bits = self.qkv_act.bits
            if _int8_heads(qi, bits):  # the same exact integers, on int8 GEMMs
                q8, k8 = qi.to(torch.int8), ki.to(torch.int8)
                return to_float32(int_bmm(q8, k8.transpose(-2, -1))).mul_(acc_scale), acc_scale
            lim = 2 ** (bits - 1)
            return exact_matmul(qi, ki.transpose(-2, -1), lim, lim).to(torch.float32).mul_(acc_scale), acc_scale
        attn = (q * self.scale) @ k.transpose(-2, -1)
        return attn, (s * s * self.scale) if s is not None else None

    def _attend(self, x: torch.Tensor, scale: torch.Tensor | None, mask: torch.Tensor | None,
                bias: tuple[torch.Tensor, torch.Tensor | None] | None,
                ints: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, _ = x.shape
        y, s_acc = self.qkv(x, scale, ints=ints)
        y, s = self.qkv_act(y, s_acc, owned=True)
        integer = s is not None and not (torch.is_grad_enabled() and y.requires_grad)
        qkv = y.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        qkv_int = None
        if integer:
            qkv_int = self.qkv_act.ints_of(y, s).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn, s_attn = self._logits(q, k, s, qkv_int)
        attn, s_attn = self.attn_act(attn, s_attn, owned=qkv_int is not None)
        if bias is not None:
            attn, s_attn = self.bias_act(attn, s_attn, bias[0], bias[1])
        p, s_p = self.softmax(attn, s_attn, mask)
        p = self.attn_drop(p)
        s_out = s_p * s if (s_p is not None and s is not None) else None
        if integer and s_p is not None:
            lim = 2 ** (self.qkv_act.bits - 1)
            out = exact_matmul(_ints(p, s_p), qkv_int[2], None, lim).to(torch.float32).mul_(s_out)
        else:
            out = p @ v
        out = out.transpose(1, 2).reshape(B, N, -1)  # a copy
        out, s_out = self.av_act(out, s_out, owned=not out.requires_grad)
        y, s_y = self.proj(out, s_out)
        y, s_y = self.proj_act(y, s_y, owned=True)
        return self.proj_drop(y), s_y


class PaperAttention(_PaperAttnBase):
    """``timm.layers.Attention`` in the ``paper`` wiring (no qk-norm, no scale-norm, no gate)."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        step = self._slice_rows(x, scale)
        if not step:
            return self._attend(x, scale, None, None)
        return run_sliced(lambda xs, s, q: self._attend(xs, s, None, None, q), x, scale, step, self.qkv)

    def _slice_rows(self, x: torch.Tensor, scale: torch.Tensor | None) -> int:
        """Images to run at a time (0: all at once; ``models.slicing``): attention works image by
        image; a slice holds about ``ATTENTION_SLICE_FACTOR * SLICE_ELEMENTS`` attention scores (or
        qkv outputs)."""
        if scale is None or torch.is_grad_enabled() or x.dim() != 3:
            return 0
        if not calibrated(self.qkv_act, self.attn_act, self.av_act, self.proj_act) or not self.softmax.row_local():
            return 0
        N, C = x.shape[1], x.shape[2]
        return slice_step(x.shape[0], max(self.num_heads * N * N, N * 3 * C), ATTENTION_SLICE_FACTOR)


class PaperWindowAttention(_PaperAttnBase):
    """``timm.models.swin_transformer.WindowAttention`` in the ``paper`` wiring."""

    def __init__(self, src: nn.Module, site: QuantSite, observer: str) -> None:
        super().__init__(src, site, observer)
        self.window_area = src.window_area
        self.relative_position_bias_table = src.relative_position_bias_table
        self.register_buffer("relative_position_index", src.relative_position_index, persistent=False)
        self.table_act = IntAct(observer)
        self.bias_act = IntAct(observer)
        site._input_act = [self.bias_act]

    def _rel_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        table, s_t = self.table_act(self.relative_position_bias_table)
        return _gather_bias(table, self.relative_position_index, self.window_area), s_t

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._attend(x, scale, _window_mask(mask, x.shape, self.num_heads), self._rel_bias())

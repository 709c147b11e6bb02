"""Quantized attention for timm's ``Attention`` (ViT/DeiT) and ``WindowAttention`` (Swin).

The softmax is explicit (fused attention would hide it): ``q``, ``k``, ``v`` are quantized per
tensor, ``q·kᵀ`` is the integer accumulator with scale ``s_q·s_k·d^-½``, the softmax site runs its
method on it, ``attn·v`` uses the softmax's own output grid, and the projection's input is
requantized dyadically from the ``attn·v`` accumulator (HAWQ-V3 / I-ViT). In float mode the
module computes exactly what the timm module computes.
"""
from __future__ import annotations

import torch
from torch import nn

from policysearch.models.site import QuantSite
from policysearch.quant import QuantAct, QuantLinear

__all__ = ["QuantAttention", "QuantWindowAttention"]


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
        n = self.window_area
        b = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return b.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        full_mask = None
        if mask is not None:
            num_win = mask.shape[0]
            full_mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, self.num_heads, -1, -1)
            full_mask = full_mask.reshape(-1, self.num_heads, N, N)
        out, s_v = self._attend(x, self._rel_bias(), full_mask)
        return self._project(out, s_v)

"""The ``paper`` wiring: one integer pipeline for every method, after I-ViT's reference ViT and Swin.

I-ViT (``zkkli/I-ViT``: ``models/vit_quant.py``, ``swin_quant.py``, ``layers_quant.py``) passes a
pair ``(x, scale)`` between modules, ``x`` the dequantized integers; so does this wiring, with
timm's modules rebuilt around that pair. Activations are quantized where I-ViT quantizes them
(``(bits)``: 8 means the policy's ``act_bits``, 16 is fixed):

==========================  ===================================================================
hand-over                   what is passed on
==========================  ===================================================================
image                       ``patch_embed.in_act`` (8): the input image (``qact_input``)
patch embedding             integer conv accumulator, per-channel ``s_x·s_w`` -> [Swin:
                            ``pre_norm_act`` (8) -> ``patch_embed.norm`` site] -> ``out_act``
                            (16, ``PatchEmbed.qact``)
class / dist / reg tokens   rounded onto the patch tokens' 16-bit grid (I-ViT's ``cat`` shares it)
position embedding          ``paper_stem.pos_act`` (16, ``qact_pos``); the sum requantized and
                            added on the grid of ``paper_stem.sum_act`` (16, ``qact1``)
block, attention half       residual (16) -> ``norm1`` site -> ``norm1_act`` (8, ``qact1``) ->
                            attention (``attention.PaperAttention``: qkv -> one 8-bit qkv
                            quantizer -> ``q·kᵀ`` -> 8-bit softmax input [Swin: + 8-bit bias table,
                            8-bit requant] -> softmax site -> ``attn·v`` -> 8-bit -> proj ->
                            16-bit) -> ``res1``: branch and identity requantized to one 16-bit
                            grid and added as integers (I-ViT's ``qact2(x, s, identity, s_id)``)
block, MLP half             ``norm2`` site -> ``norm2_act`` (8, ``qact3``) -> fc1 -> ``gelu_act``
                            (8, ``qact_gelu``) -> GELU site -> ``act_out`` (8, ``qact1``) -> fc2 ->
                            ``out_act`` (16, ``qact2``) -> ``res2`` (16, ``qact4``)
Swin patch merging          the 16-bit residual gathered 2x2 -> ``norm`` site -> ``norm_act``
                            (8, ``qact1``) -> reduction -> ``out_act`` (8, ``qact2``: the next
                            stage's residual starts at 8 bits, as ``swin_quant.PatchMerging``)
head                        ``norm`` site -> ``paper_head.norm_act`` (8, ``qact2``) -> pooling
                            (token: a row; average: the integer sum on the grid ``s / N``) ->
                            [average: ``pool_act`` (8, Swin's ``qact3``)] -> [``fc_norm`` site ->
                            ``fc_norm_act`` (8)] -> head: the integer logits accumulator,
                            dequantized (distilled: the two heads' mean, in float)
==========================  ===================================================================

Every site of a kind receives the same tensor whatever its method (``precision``); a method's
own input form is made inside ``QuantSite``. Requantizations are dyadic (``quant.IntAct``).
Deviations from I-ViT's code, each deliberate: ranges are calibrated on float forwards (I-ViT
trains them by QAT, EMA 0.95); the class token is clamped to the 16-bit patch grid (I-ViT
rounds it without a clamp before requantizing); Swin without an absolute position embedding skips
I-ViT's second back-to-back 16-bit requantization (``qact1`` right after ``PatchEmbed.qact``);
an average pool is requantized from its exact integer sum rather than from the rounded mean;
the ViT head's ``norm_act`` quantizes every token and then takes the class token (I-ViT takes
``x[:, 0]`` before its ``qact2``: same integers for a given scale, but here the calibrated range
covers the patch tokens too); every requantization clamps to its width (``quant.IntAct``).
Not supported in this wiring (one clear error): attention pooling, max pooling, dynamic image
size, an MLP with an inner norm, other block types.
"""
from __future__ import annotations

import torch
from timm.layers.format import Format, nchw_to
from timm.models.swin_transformer import window_partition, window_reverse
from torch import nn

from policysearch.models.site import QuantSite
from policysearch.models.slicing import calibrated, run_sliced, slice_step
from policysearch.quant import IntAct, IntConv2d, IntLinear, onto_grid

__all__ = [
    "PaperHead",
    "PaperMlp",
    "PaperPatchEmbed",
    "PaperPatchMerging",
    "PaperStem",
    "PaperSwinBlock",
    "PaperViTBlock",
]

Carry = tuple[torch.Tensor, "torch.Tensor | None"]


def _feed(act: IntAct, consumer: nn.Module) -> None:
    """``consumer`` (an IntLinear / IntConv2d right after ``act``) takes ``act``'s kept integers."""
    act.keep_ints = True
    consumer.source = [act]


def _link_out(site: nn.Module, act: IntAct) -> None:
    if isinstance(site, QuantSite):
        site._out_act = [act]


def _norm(site: nn.Module, x: torch.Tensor, s: torch.Tensor | None) -> Carry:
    if isinstance(site, QuantSite):
        return site(x, s)
    return site(x), s  # nn.Identity


def _layer_scale(ls: nn.Module, y: torch.Tensor, s: torch.Tensor | None) -> Carry:
    gamma = getattr(ls, "gamma", None)
    if gamma is None:
        return ls(y), s
    return y * gamma, (s * gamma.detach() if s is not None else None)  # a per-channel grid


class PaperMlp(nn.Module):
    """timm ``Mlp``: fc1 -> ``gelu_act`` -> GELU site -> ``act_out`` -> fc2 -> ``out_act`` (16)."""

    def __init__(self, src: nn.Module, observer: str) -> None:
        super().__init__()
        self.fc1 = IntLinear(src.fc1, observer)
        self.gelu_act = IntAct(observer)
        self.act = src.act
        self.drop1 = src.drop1
        self.act_out = IntAct(observer)
        self.fc2 = IntLinear(src.fc2, observer)
        self.drop2 = src.drop2
        self.out_act = IntAct(observer, bits=16, role="residual")
        if isinstance(self.act, QuantSite):
            self.act._input_act = [self.gelu_act]
        _feed(self.act_out, self.fc2)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> Carry:
        step = self._slice_rows(x, scale)
        if not step:
            return self._forward(x, scale)
        return run_sliced(self._forward, x, scale, step, self.fc1)

    def _slice_rows(self, x: torch.Tensor, scale: torch.Tensor | None) -> int:
        """Entries of dim 0 to run at a time (0: all at once; ``models.slicing``): the MLP works
        token by token; a slice holds about ``SLICE_ELEMENTS`` hidden activations."""
        if scale is None or torch.is_grad_enabled() or not isinstance(self.act, QuantSite) or x.dim() < 2:
            return 0
        if not calibrated(self.gelu_act, self.act_out, self.out_act) or not self.act.row_local():
            return 0
        return slice_step(x.shape[0], x[0].numel() // x.shape[-1] * self.fc1.out_features)

    def _forward(self, x: torch.Tensor, scale: torch.Tensor | None, ints: torch.Tensor | None = None) -> Carry:
        y, s = self.fc1(x, scale, ints=ints)
        y, s = self.gelu_act(y, s, owned=True)  # fc1's fresh accumulator
        y, s = self.act(y, s) if isinstance(self.act, QuantSite) else (self.act(y), None)
        y, s = self.act_out(self.drop1(y), s)
        y, s = self.fc2(y, s)
        return self.out_act(self.drop2(y), s, owned=True)


class PaperViTBlock(nn.Module):
    """timm ViT ``Block`` (pre-norm): two halves, each ending in a 16-bit integer residual add."""

    def __init__(self, src: nn.Module, observer: str) -> None:
        super().__init__()
        self.norm1 = src.norm1
        self.norm1_act = IntAct(observer)
        self.attn = src.attn
        self.ls1, self.drop_path1 = src.ls1, src.drop_path1
        self.res1 = IntAct(observer, bits=16, role="residual")
        self.norm2 = src.norm2
        self.norm2_act = IntAct(observer)
        self.mlp = src.mlp
        self.ls2, self.drop_path2 = src.ls2, src.drop_path2
        self.res2 = IntAct(observer, bits=16, role="residual")
        _link_out(self.norm1, self.norm1_act)
        _link_out(self.norm2, self.norm2_act)
        _feed(self.norm1_act, self.attn.qkv)
        _feed(self.norm2_act, self.mlp.fc1)

    def attn_half(self, carry: Carry) -> Carry:
        x, s = carry
        y, t = _norm(self.norm1, x, s)
        y, t = self.norm1_act(y, t)
        y, t = self.attn(y, t)
        y, t = _layer_scale(self.ls1, y, t)
        return self.res1(self.drop_path1(y), t, x, s)

    def mlp_half(self, carry: Carry) -> Carry:
        x, s = carry
        y, t = _norm(self.norm2, x, s)
        y, t = self.norm2_act(y, t)
        y, t = self.mlp(y, t)
        y, t = _layer_scale(self.ls2, y, t)
        return self.res2(self.drop_path2(y), t, x, s)

    def forward(self, carry: Carry) -> Carry:
        return self.mlp_half(self.attn_half(carry))


class PaperSwinBlock(nn.Module):
    """timm ``SwinTransformerBlock`` (NHWC): shifted windows around the paper attention."""

    def __init__(self, src: nn.Module, observer: str) -> None:
        super().__init__()
        self.src_block = [src]  # window geometry and mask helpers (not a submodule)
        self.norm1 = src.norm1
        self.norm1_act = IntAct(observer)
        self.attn = src.attn
        self.drop_path1 = src.drop_path1
        self.res1 = IntAct(observer, bits=16, role="residual")
        self.norm2 = src.norm2
        self.norm2_act = IntAct(observer)
        self.mlp = src.mlp
        self.drop_path2 = src.drop_path2
        self.res2 = IntAct(observer, bits=16, role="residual")
        self.window_size, self.shift_size = src.window_size, src.shift_size
        self.window_area = src.window_area
        self.dynamic_mask = getattr(src, "dynamic_mask", False)
        self.register_buffer("attn_mask", src.attn_mask, persistent=False)
        _link_out(self.norm1, self.norm1_act)
        _link_out(self.norm2, self.norm2_act)
        _feed(self.norm2_act, self.mlp.fc1)  # (norm1_act's output is windowed before the qkv)

    def _windows(self, x: torch.Tensor, s: torch.Tensor | None) -> Carry:
        B, H, W, C = x.shape
        has_shift = any(self.shift_size)
        shifted = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2)) if has_shift else x
        pad_h = (self.window_size[0] - H % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - W % self.window_size[1]) % self.window_size[1]
        shifted = torch.nn.functional.pad(shifted, (0, 0, 0, pad_w, 0, pad_h))  # zeros: on every grid
        _, Hp, Wp, _ = shifted.shape
        windows = window_partition(shifted, self.window_size).view(-1, self.window_area, C)
        mask = self.src_block[0].get_attn_mask(shifted) if self.dynamic_mask else self.attn_mask
        out, t = self.attn(windows, s, mask)
        out = out.view(-1, self.window_size[0], self.window_size[1], C)
        shifted = window_reverse(out, self.window_size, Hp, Wp)[:, :H, :W, :].contiguous()
        return (torch.roll(shifted, shifts=self.shift_size, dims=(1, 2)) if has_shift else shifted), t

    def attn_half(self, carry: Carry) -> Carry:
        x, s = carry
        y, t = _norm(self.norm1, x, s)
        y, t = self.norm1_act(y, t)
        y, t = self._windows(y, t)
        return self.res1(self.drop_path1(y), t, x, s)

    def mlp_half(self, carry: Carry) -> Carry:
        x, s = carry
        B, H, W, C = x.shape
        x = x.reshape(B, -1, C)
        y, t = _norm(self.norm2, x, s)
        y, t = self.norm2_act(y, t)
        y, t = self.mlp(y, t)
        y, t = self.res2(self.drop_path2(y), t, x, s)
        return y.reshape(B, H, W, C), t

    def forward(self, carry: Carry) -> Carry:
        return self.mlp_half(self.attn_half(carry))


class PaperPatchMerging(nn.Module):
    """timm Swin ``PatchMerging``: 2x2 gather -> norm site -> 8-bit -> reduction -> 8-bit."""

    def __init__(self, src: nn.Module, observer: str) -> None:
        super().__init__()
        self.norm = src.norm
        self.norm_act = IntAct(observer)
        self.reduction = IntLinear(src.reduction, observer)
        self.out_act = IntAct(observer)
        _link_out(self.norm, self.norm_act)
        _feed(self.norm_act, self.reduction)

    def forward(self, carry: Carry) -> Carry:
        x, s = carry
        B, H, W, C = x.shape
        x = nn.functional.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        _, H, W, _ = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        y, t = _norm(self.norm, x, s)
        y, t = self.norm_act(y, t)
        y, t = self.reduction(y, t)
        return self.out_act(y, t, owned=True)


class PaperPatchEmbed(nn.Module):
    """timm ``PatchEmbed``: 8-bit image -> integer conv -> [8-bit -> norm site] -> 16-bit."""

    def __init__(self, src: nn.Module, observer: str) -> None:
        super().__init__()
        self.src_embed = [src]  # (not a submodule)
        for attr in ("img_size", "patch_size", "grid_size", "num_patches", "flatten", "output_fmt",
                     "strict_img_size", "dynamic_img_pad"):  # what timm and loading read off a PatchEmbed
            setattr(self, attr, getattr(src, attr, None))
        self.in_act = IntAct(observer)
        self.proj = IntConv2d(src.proj, observer)
        self.norm = src.norm
        self.pre_norm_act = IntAct(observer) if isinstance(self.norm, QuantSite) else None
        self.out_act = IntAct(observer, bits=16, role="residual")
        _link_out(self.norm, self.out_act)
        _feed(self.in_act, self.proj)

    def forward(self, img: torch.Tensor) -> Carry:
        B, C, H, W = img.shape
        if self.img_size is not None and self.strict_img_size and (H, W) != tuple(self.img_size):
            raise ValueError(f"input size {H}x{W} does not match the model's {self.img_size[0]}x{self.img_size[1]}")
        if self.dynamic_img_pad:
            ph = (self.patch_size[0] - H % self.patch_size[0]) % self.patch_size[0]
            pw = (self.patch_size[1] - W % self.patch_size[1]) % self.patch_size[1]
            img = nn.functional.pad(img, (0, pw, 0, ph))
        x, s = self.in_act(img)
        x, s = self.proj(x, s)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        if self.pre_norm_act is not None:
            x, s = self.pre_norm_act(x, s)
            x, s = self.norm(x, s)
        return self.out_act(x, s)


class PaperStem(nn.Module):
    """ViT tokens and position embedding: ``pos_act`` (16), ``sum_act`` (16), ``pre_act`` (16,
    after a ``norm_pre`` site)."""

    def __init__(self, model: nn.Module, observer: str) -> None:
        super().__init__()
        self.pos_act = IntAct(observer, bits=16, role="residual")
        self.sum_act = IntAct(observer, bits=16, role="residual")
        self.pre_act = IntAct(observer, bits=16, role="residual") if isinstance(model.norm_pre, QuantSite) else None
        if self.pre_act is not None:
            _link_out(model.norm_pre, self.pre_act)

    @staticmethod
    def _tokens(model: nn.Module, B: int) -> list[torch.Tensor]:
        names = ("cls_token", "dist_token") if hasattr(model, "dist_token") else ("cls_token", "reg_token")
        return [t.expand(B, -1, -1) for t in (getattr(model, n, None) for n in names) if t is not None]

    @staticmethod
    def _cat(tokens: list[torch.Tensor], x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        if not tokens:
            return x
        if s is not None:
            tokens = [onto_grid(t, s, 16) for t in tokens]
        return torch.cat(tokens + [x], dim=1)

    def run(self, model: nn.Module, img: torch.Tensor) -> Carry:
        x, s = model.patch_embed(img)
        tokens = self._tokens(model, x.shape[0])
        x = x.view(x.shape[0], -1, x.shape[-1])
        if model.pos_embed is None:
            x = self._cat(tokens, x, s)
        else:
            pos, s_pos = self.pos_act(model.pos_embed)
            if model.no_embed_class:
                x, s = self.sum_act(x, s, pos, s_pos)
                x = self._cat(tokens, x, s)
            else:
                x = self._cat(tokens, x, s)
                x, s = self.sum_act(x, s, pos, s_pos)
        x = model.pos_drop(x)
        x = model.patch_drop(x)
        if self.pre_act is not None:
            x, s = model.norm_pre(x, s)
            x, s = self.pre_act(x, s)
        return x, s


class PaperHead(nn.Module):
    """The final norm's 8-bit quantizer, the pooling's (average) and ``fc_norm``'s."""

    def __init__(self, model: nn.Module, observer: str, family: str) -> None:
        super().__init__()
        self.family = family
        self.norm_act = IntAct(observer)
        self.pool_act = IntAct(observer)
        self.fc_norm_act = IntAct(observer)
        _link_out(model.norm, self.norm_act)
        if isinstance(getattr(model, "fc_norm", None), QuantSite):
            _link_out(model.fc_norm, self.fc_norm_act)

    def run_vit(self, model: nn.Module, carry: Carry) -> torch.Tensor:
        x, s = carry
        x, s = _norm(model.norm, x, s)
        x, s = self.norm_act(x, s)
        if hasattr(model, "head_dist"):  # distilled DeiT: class and distillation tokens, float mean
            a = _logits(model.head, model.head_drop(x[:, 0]), s)
            return (a + _logits(model.head_dist, model.head_drop(x[:, 1]), s)) / 2
        pool = model.global_pool
        if pool == "token":
            x = x[:, 0]
        elif pool == "avg":
            x = x[:, model.num_prefix_tokens:] if not model.pool_include_prefix else x
            x, s = self._pool(x, s, (1,))
        if isinstance(model.fc_norm, QuantSite):
            x, s = model.fc_norm(x, s)
            x, s = self.fc_norm_act(x, s)
        return _logits(model.head, model.head_drop(x), s)

    def run_swin(self, model: nn.Module, carry: Carry) -> torch.Tensor:
        x, s = carry
        x, s = _norm(model.norm, x, s)
        x, s = self.norm_act(x, s)
        head = model.head
        x, s = self._pool(x, s, (1, 2))
        return head.flatten(_logits(head.fc, head.drop(x), s))

    def _pool(self, x: torch.Tensor, s: torch.Tensor | None, dims: tuple[int, ...]) -> Carry:
        """Average pooling: the integer sum on the grid ``s / n``, then ``pool_act`` (8)."""
        n = 1
        for d in dims:
            n *= x.shape[d]
        if s is None or (torch.is_grad_enabled() and x.requires_grad):
            return self.pool_act(x.mean(dim=dims), None if s is None else s / n)
        return self.pool_act(torch.div(x, s).round_().sum(dim=dims).mul_(s / n), s / n)


def _logits(head: nn.Module, x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """The classifier: the integer accumulator, dequantized (``nn.Identity``: the features)."""
    return head(x, s)[0] if isinstance(head, IntLinear) else head(x)

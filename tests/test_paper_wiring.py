"""The ``paper`` wiring: one integer pipeline for every method (issue 8).

* integer all the way: every (tensor, scale) pair handed between modules lies on its grid;
* gamma where the paper takes it: the same tap for every method, masked entries excluded;
* the wiring's bookkeeping: default, recorded, not mixed with ``native``, unsupported models.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

import policysearch as ps
from policysearch.errors import ConfigError
from policysearch.models.attention import PaperAttention, PaperWindowAttention
from policysearch.models.paper import PaperMlp, PaperPatchEmbed, PaperPatchMerging
from policysearch.models.precision import widen_to_accumulator
from policysearch.models.segments import segments
from policysearch.models.site import QuantSite
from policysearch.models.tiny import tiny_swin, tiny_vit
from policysearch.objectives import Evaluator, asqnr
from policysearch.policy import Choice, Policy
from policysearch.quant import IntAct, IntConv2d, IntLinear, symmetric_scale

#: the widest integers a hand-over may carry: the int32 accumulators and kernel outputs, except
#: I-BERT's GELU (its integers grow as max|x| / s^3: 64-bit registers; kernels/ibert.py)
WIDTH = 32
WIDTH_IBERT_GELU = 36


def shifted_swin() -> nn.Module:
    """A one-stage Swin whose second block has shifted windows (tiny_swin has none)."""
    return SwinTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=16,
                           depths=(2,), num_heads=(2,), window_size=4, mlp_ratio=2.0).eval()


def _calibrated(make, seed: int = 0, n: int = 8):
    torch.manual_seed(seed)
    model = make()
    x = torch.randn(n, 3, 32, 32)
    ps.calibrate(ps.prepare(model), [x])
    return model, x


def _grid_ints(x: torch.Tensor, s: torch.Tensor, nchw: bool = False) -> tuple[torch.Tensor, bool]:
    """``(q, exact)``: the integers of ``x`` on the grid ``s`` (``x / s`` rounded in float64) and
    whether ``x`` is exactly their float32 dequantization, bit for bit. Below 2^24 that is
    ``float32(q) * s == x``; wider integers reach float32 rounded to a representable integer, so
    one of the float32 integers next to ``q`` must reproduce ``x`` exactly. No tolerance."""
    x, s = x.detach(), s.detach()
    if nchw and s.numel() > 1:
        s = s.view(1, -1, 1, 1)  # the conv accumulator, per-channel on dim 1
    q = torch.round(x.double() / s.double())
    qf = q.float()
    if bool((q.abs() < 2**24).all()):
        return q, torch.equal(qf * s, x)
    step = torch.clamp(torch.nextafter(qf.abs(), torch.tensor(float("inf"))) - qf.abs(), min=1.0)
    hit = torch.zeros_like(x, dtype=torch.bool)
    for k in range(-3, 4):
        hit |= (qf + k * step) * s == x
    return q, bool(hit.all())


def _width(q: torch.Tensor) -> int:
    """Signed (two's complement) bits needed for the integers ``q``."""
    if not q.numel():
        return 1
    hi, lo = int(q.max()), int(q.min())
    return max(max(hi, 0).bit_length(), max(-lo - 1, 0).bit_length()) + 1


_CHECKED = (IntAct, IntLinear, IntConv2d, QuantSite, PaperAttention, PaperWindowAttention, PaperMlp,
            PaperPatchEmbed, PaperPatchMerging)
#: the quantizers whose input is float by design: the image, and two parameter tensors
_FLOAT_INPUTS = ("patch_embed.in_act", "paper_stem.pos_act", "table_act")


def _walk(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], set[str], dict[str, int]]:
    """One forward with hooks on every module of the pipeline; asserts every hand-over is exactly
    the dequantization of integers on its grid within its bit range; returns how many hand-overs
    each module type made, the names of the modules that made them, and the widest integers (in
    signed bits) each module type handed over."""
    seen: dict[str, int] = {}
    ran: set[str] = set()
    widths: dict[str, int] = {}
    problems: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def key_of(mod: nn.Module) -> str:
        if isinstance(mod, QuantSite):
            return f"QuantSite:{mod.kind}:{mod.choice.method}"
        return type(mod).__name__

    def check(where: str, key: str, t: torch.Tensor, s: torch.Tensor | None, bits: int, nchw: bool = False) -> None:
        if s is None:
            problems.append(f"{where}: a float tensor (no scale)")
            return
        q, exact = _grid_ints(t, s, nchw)
        if not exact:
            problems.append(f"{where}: not exactly integers times its scale")
        w = _width(q)
        widths[key] = max(widths.get(key, 0), w)
        if w > bits:
            problems.append(f"{where}: |q| = {float(q.abs().max()):.0f} needs {w} bits, beyond {bits}")

    def limit(mod: nn.Module) -> int:
        if isinstance(mod, IntAct):
            return mod.bits
        if isinstance(mod, QuantSite) and mod.kind == "gelu" and mod.choice.method == "ibert":
            return WIDTH_IBERT_GELU
        return WIDTH

    def pre(mod, args):
        name = names[mod]
        if isinstance(mod, (PaperPatchMerging,)):
            args = args[0]
        if len(args) >= 2 and isinstance(args[1], torch.Tensor):
            check(f"{name} input", "input", args[0], args[1], WIDTH_IBERT_GELU)
        elif isinstance(mod, IntAct) and not any(name.endswith(f) for f in _FLOAT_INPUTS):
            problems.append(f"{name}: handed a float tensor")
        if isinstance(mod, IntAct) and len(args) >= 4 and args[2] is not None:
            check(f"{name} identity", "identity", args[2], args[3], WIDTH)

    def post(mod, args, out):
        name = names[mod]
        y, s = out
        check(f"{name} output", key_of(mod), y, s, limit(mod), nchw=isinstance(mod, IntConv2d))
        key = type(mod).__name__ + (f":{mod.kind}" if isinstance(mod, QuantSite) else "")
        seen[key] = seen.get(key, 0) + 1
        ran.add(name)

    handles = []
    for mod in model.modules():
        if isinstance(mod, _CHECKED):
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(logits).all()
    assert not problems, "\n".join(problems[:20])
    return seen, ran, widths


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin, shifted_swin, lambda: tiny_vit(distilled=True)],
                         ids=["vit", "swin", "shifted_swin", "deit_distilled"])
@pytest.mark.parametrize("method", ["ibert", "fqvit", "ivit"])
def test_every_hand_over_lies_on_its_integer_grid(make, method):
    model, x = _calibrated(make)
    sites = ps.find_sites(model)
    ps.apply_policy(model, Policy.uniform(sites, method, fallback={"gelu": "ivit"}))
    seen, ran, _ = _walk(model, x)
    # every site ran once and handed over an integer output; every linear and quantizer was checked
    for kind in ("softmax", "gelu", "layernorm"):
        assert seen[f"QuantSite:{kind}"] == sum(s.kind == kind for s in sites)
    n_linear = sum(isinstance(m, IntLinear) for m in model.modules())
    assert seen["IntLinear"] == n_linear and seen["IntConv2d"] == 1
    # every quantizer ran, but a LayerNorm's own (only with Choice.bits) and the head's unused ones
    unused = ("paper_head.pool_act", "paper_head.fc_norm_act") if hasattr(model, "blocks") else ("paper_head.fc_norm_act",)
    idle = [n for n, m in model.named_modules() if isinstance(m, IntAct) and n not in ran
            and not n.endswith(".in_act") and n not in unused]
    assert not idle, idle
    assert seen["IntAct"] >= 8 * len(sites) // 3


@pytest.mark.parametrize("name", ["fmnist_vit", "fmnist_swin"])
def test_zoo_models_hand_over_exact_integers_of_stated_widths(name):
    """The exact grid check on the trained zoo models (real ranges): every hand-over is integers
    times its scale; they fit int32 but I-BERT's GELU output, which needs more (64-bit registers)."""
    from policysearch.data import load_data
    from policysearch.models.loading import load_model

    torch.manual_seed(0)
    model = ps.prepare(load_model(name))
    data = load_data("fmnist-sample", model=model, calib_size=16, eval_size=4)
    ps.calibrate(model, [data.calib_images()])
    x, _ = data.eval_tensors()
    sites = ps.find_sites(model)
    widths = {}
    for method in ("ibert", "fqvit", "ivit"):
        ps.apply_policy(model, Policy.uniform(sites, method, fallback={"gelu": "ivit"}))
        _, _, w = _walk(model, x)
        widths.update({k: max(v, widths.get(k, 0)) for k, v in w.items()})
    assert widths["IntLinear"] <= 32 and widths["IntConv2d"] <= 32
    over = {k: v for k, v in widths.items() if v > 32}
    assert set(over) <= {"QuantSite:gelu:ibert", "input"}, over
    if name == "fmnist_vit":  # I-BERT's GELU reaches 6.8e9 here: past int32, within its stated width
        assert 32 < widths["QuantSite:gelu:ibert"] <= WIDTH_IBERT_GELU


def test_relu_and_mixed_bits_stay_integer():
    model, x = _calibrated(tiny_swin)
    sites = ps.find_sites(model)
    policy = Policy.uniform(sites, "ivit", fallback={"gelu": "relu"})
    policy = policy.replace({sites[2].name: Choice(method="ibert", bits=6), sites[0].name: Choice(method="ivit", bits=10)})
    ps.apply_policy(model, policy)
    _, ran, _ = _walk(model, x)
    assert "patch_embed.norm.in_act" in ran


def test_the_handed_tensor_is_the_same_for_every_method():
    """At each site, with upstream choices equal, the recorded input is bit-identical."""
    model, x = _calibrated(shifted_swin)
    sites = ps.find_sites(model)
    recorded = {}
    for method in ("ibert", "fqvit", "ivit"):
        base = Policy.uniform(sites, "ivit")
        for target in sites:
            if target.kind == "gelu" and method == "fqvit":
                continue
            ps.apply_policy(model, base.replace({target.name: method}))
            got = {}
            with torch.no_grad(), ps.record_sites(model, lambda n, xi, y, got=got: got.__setitem__(n, xi)):
                model(x)
            recorded[(method, target.name)] = got[target.name]
    for (method, name), t in recorded.items():
        torch.testing.assert_close(t, recorded[("ivit", name)], rtol=0, atol=0, msg=f"{method} at {name}")


def test_native_wiring_is_still_available_and_differs():
    torch.manual_seed(0)
    a, b = tiny_vit(), tiny_vit()
    b.load_state_dict(a.state_dict())
    ps.prepare(a, wiring="native")
    ps.prepare(b)
    assert a._policysearch.wiring == "native" and b._policysearch.wiring == "paper"
    assert [s.name for s in ps.find_sites(a)] == [s.name for s in ps.find_sites(b)]
    x = torch.randn(4, 3, 32, 32)
    for m in (a, b):
        ps.calibrate(m, [x])
        ps.apply_policy(m, Policy.uniform(ps.find_sites(m), "ivit"))
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))
    with pytest.raises(ConfigError, match="already wired 'native'"):
        ps.prepare(a, wiring="paper")
    with pytest.raises(ConfigError, match="unknown wiring"):
        ps.prepare(tiny_vit(), wiring="integer")


def test_paper_refuses_what_it_cannot_rebuild():
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, global_pool="max")
    with pytest.raises(ps.UnsupportedModelError, match="global_pool='max'.*native"):
        ps.prepare(model)
    ps.prepare(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                 global_pool="max"), wiring="native")  # native still wires it


@pytest.mark.parametrize("make", [tiny_vit, shifted_swin])
def test_float_mode_and_segments_of_the_paper_wiring_are_the_timm_model(make):
    torch.manual_seed(0)
    model = make()
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    ps.prepare(model)
    with torch.no_grad():
        ref = ref_model(x)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
        ps.calibrate(model, [x])
        ps.apply_policy(model, Policy.uniform(ps.find_sites(model), "ivit"))
        full = model(x)
        h = x
        for seg in segments(model):
            h = seg.fn(h)
    torch.testing.assert_close(h, full, rtol=0, atol=0)


# -- an independent reference: the integer pipeline written out on int64 tensors -----------------

def _dyadic(z: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """HAWQ's fixedpoint_mul on int64 ``z``: ``round(z * m / 2^e)``, ``m / 2^e`` the 31-bit dyadic
    form of ``s_in / s_out`` (float64 from the float32 scales; the product is exact in float64)."""
    mant, ex = torch.frexp(s_in.double() / s_out.double())
    m = torch.floor(mant * 2.0**31 + 0.5)
    return torch.round(z.double() * m / torch.pow(2.0, 31 - ex.double())).long()


def _int_weight(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    lim = 2 ** (bits - 1) - 1
    s = (w.detach().abs().reshape(w.shape[0], -1).amax(1) / lim).clamp(min=1e-8)
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w.detach() / s.view(shape)), -lim, lim).long(), s


class _RefViT:
    """tiny_vit's ``paper`` pipeline (no distillation, token pooling) on int64 tensors: int64 GEMMs,
    the dyadic requantization above, the calibrated scales read off the model's quantizers and the
    site kernels called on the handed integers. Nothing of paper_forward, segments or IntLinear."""

    def __init__(self, model: nn.Module) -> None:
        self.m = model

    @staticmethod
    def act(a: IntAct, z: torch.Tensor, s: torch.Tensor, zi: torch.Tensor | None = None,
            si: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        s_out = a.static_scale()
        q = _dyadic(z, s, s_out) + (0 if zi is None else _dyadic(zi, si, s_out))
        lim = 2 ** (a.bits - 1)
        return q.clamp(-lim, lim - 1), s_out

    @staticmethod
    def linear(lin: nn.Module, z: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, s_w = _int_weight(lin.weight)
        s_acc = s * s_w
        b = torch.clamp(torch.round(lin.bias.detach() / s_acc), -(2**31), 2**31 - 1).long()
        return z @ w.t() + b, s_acc

    @staticmethod
    def site(site: QuantSite, z: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, t = site(z.float() * s, s)
        return torch.round(y.double() / t.double()).long(), t

    def block(self, b: nn.Module, z: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = b.attn
        y, t = self.site(b.norm1, z, s)
        y, t = self.act(b.norm1_act, y, t)
        y, t = self.linear(a.qkv, y, t)
        y, t = self.act(a.qkv_act, y, t)
        B, N, _ = y.shape
        q, k, v = y.reshape(B, N, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        y, t_l = self.act(a.attn_act, q @ k.transpose(-2, -1), t * t * a.scale)
        p, t_p = self.site(a.softmax, y, t_l)
        y, t = self.act(a.av_act, (p @ v).transpose(1, 2).reshape(B, N, -1), t_p * t)
        y, t = self.linear(a.proj, y, t)
        y, t = self.act(a.proj_act, y, t)
        z, s = self.act(b.res1, y, t, z, s)
        mlp = b.mlp
        y, t = self.site(b.norm2, z, s)
        y, t = self.act(b.norm2_act, y, t)
        y, t = self.linear(mlp.fc1, y, t)
        y, t = self.act(mlp.gelu_act, y, t)
        y, t = self.site(mlp.act, y, t)
        y, t = self.act(mlp.act_out, y, t)
        y, t = self.linear(mlp.fc2, y, t)
        y, t = self.act(mlp.out_act, y, t)
        return self.act(b.res2, y, t, z, s)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        m, pe = self.m, self.m.patch_embed
        s = pe.in_act.static_scale()
        z = torch.clamp(torch.round(img / s), -128, 127).long()
        w, s_w = _int_weight(pe.proj.weight)
        s_acc = s * s_w
        acc = torch.nn.functional.conv2d(z.double(), w.double(), stride=pe.proj.conv.stride).long()
        acc = acc + torch.round(pe.proj.bias.detach() / s_acc).long().view(1, -1, 1, 1)
        z, s = self.act(pe.out_act, acc.flatten(2).transpose(1, 2), s_acc)
        cls = torch.clamp(torch.round(m.cls_token.detach() / s), -2**15, 2**15 - 1).long()
        z = torch.cat([cls.expand(z.shape[0], -1, -1), z], dim=1)
        pos, s_pos = m.paper_stem.pos_act.static_scale(), None
        pos = torch.clamp(torch.round(m.pos_embed.detach() / pos), -2**15, 2**15 - 1).long()
        s_pos = m.paper_stem.pos_act.static_scale()
        z, s = self.act(m.paper_stem.sum_act, z, s, pos, s_pos)
        for b in m.blocks:
            z, s = self.block(b, z, s)
        y, t = self.site(m.norm, z, s)
        y, t = self.act(m.paper_head.norm_act, y, t)
        logits, s_l = self.linear(m.head, y[:, 0], t)
        return logits.float() * s_l


@pytest.mark.parametrize("method", ["ivit", "ibert", "fqvit"])
def test_model_equals_an_independent_integer_reference(method):
    """``model(x)`` against :class:`_RefViT`, bit for bit (the model's quantizers in their exact
    dyadic mode, which the reference implements)."""
    model, x = _calibrated(tiny_vit, n=4)
    ps.apply_policy(model, Policy.uniform(ps.find_sites(model), method, fallback={"gelu": "ivit"}))
    IntAct.exact = True
    try:
        with torch.no_grad():
            got = model(x)
            ref = _RefViT(model)(x)
    finally:
        IntAct.exact = False
    assert torch.equal(got, ref)


# -- documented deviations from I-ViT's wiring ---------------------------------------------------

def test_vit_head_quantizer_ranges_over_every_token_not_only_the_class_token():
    """Deviation (models/paper.py): ``paper_head.norm_act`` quantizes every token, then the class
    token is taken; I-ViT takes ``x[:, 0]`` first, so its ``qact2`` range is the class token's only.
    Same integers for a given scale; the calibrated scale here covers the patch tokens too."""
    torch.manual_seed(0)
    model = ps.prepare(tiny_vit())
    x = torch.randn(8, 3, 32, 32)
    seen = []
    hook = model.norm.register_forward_hook(lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        ps.calibrate(model, [x])
    finally:
        hook.remove()
    out = seen[-1]
    obs = model.paper_head.norm_act.observer
    assert float(obs.max_val) == float(out.max()) and float(obs.min_val) == float(out.min())
    cls = out[:, 0]
    assert max(float(cls.max()), -float(cls.min())) < max(float(out.max()), -float(out.min()))
    ps.apply_policy(model, Policy.uniform(ps.find_sites(model), "ivit"))
    got = []
    hook = model.paper_head.norm_act.register_forward_hook(lambda mod, args, o: got.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    y, s = got[0]
    assert y.shape[1] == out.shape[1]  # every token quantized
    assert torch.equal(s, symmetric_scale(out.min(), out.max(), 8))


def test_requantization_clamps_at_every_width_where_ivit_clamps_only_at_4_8_16_32():
    """Deviation (quant/act.py): IntAct clamps a requantized value to its signed width at every
    width; I-ViT's QuantAct clamps after fixedpoint_mul only for 4, 8, 16 and 32 bits, so at 6 bits
    it would hand over integers beyond [-32, 31]."""
    a = IntAct(bits=6)
    a.calibrating = True
    a(torch.tensor([-1.0, 1.0]))
    a.calibrating, a.enabled = False, True
    s_in = torch.tensor(1 / 64)
    x = torch.tensor([-3.0, -1.0, 0.5, 1.5])  # on the s_in grid; 1.5 / (1 / 31) = 46.5
    for exact in (False, True):
        IntAct.exact = exact
        try:
            y, s = a(x, s_in)
        finally:
            IntAct.exact = False
        q = torch.round(y / s)
        assert float(s) == pytest.approx(1 / 31)
        assert q.tolist() == [-32, -31, 16, 31]  # unclamped: -93, -31, 16 (15.5 rounds to even), 46


def test_exact_dyadic_requantization_agrees_with_the_float32_simulation():
    model, x = _calibrated(tiny_swin)
    ps.apply_policy(model, Policy.uniform(ps.find_sites(model), "ivit"))
    with torch.no_grad():
        fast = model(x)
        IntAct.exact = True
        try:
            exact = model(x)
        finally:
            IntAct.exact = False
    assert (fast - exact).norm() <= 1e-3 * exact.norm()


def test_accumulator_form_is_a_power_of_two_refinement():
    s = torch.tensor([0.05, 2.0**-12, 3e-4, 1e-5])
    w = widen_to_accumulator(s)
    k = torch.log2(s / w)
    assert torch.equal(k, k.round()) and (k >= 0).all()
    assert (w <= 2.0**-12).all() and ((w * 2 > 2.0**-12) | (k == 0)).all()
    assert w[1] == s[1] and w[3] == s[3]


# -- gamma ---------------------------------------------------------------------------------------

def _zoo_evaluator(name: str, wiring: str = "paper", reuse: bool = True) -> Evaluator:
    from policysearch.data import load_data
    from policysearch.models.loading import load_model

    torch.manual_seed(0)
    model = ps.prepare(load_model(name), wiring=wiring)
    data = load_data("fmnist-sample", model=model, calib_size=32, eval_size=32)
    ex, ey = data.eval_tensors()
    return Evaluator(model, calib_images=data.calib_images(), eval_images=ex, eval_labels=ey,
                     batch_size=32, sqnr_batch=32, reuse=reuse)


@pytest.mark.parametrize("name", ["fmnist_vit", "fmnist_swin"])
def test_first_site_gamma_is_equal_for_every_method(name):
    ev = _zoo_evaluator(name)
    first = ev.sites[0].name
    results = {m: ev.evaluate(Policy.uniform(ev.sites, m, fallback={"gelu": "ivit"})) for m in ("ibert", "fqvit", "ivit")}
    gammas = {m: r.sites[first].gamma for m, r in results.items()}
    assert len(set(gammas.values())) == 1, gammas
    assert 40 < gammas["ivit"] < 200
    assert len({r.sites[first].beta for r in results.values()}) == 3  # the methods do differ


def test_native_first_site_gamma_differs_by_method():
    """The reason for the paper tap: in native each method quantizes its own input."""
    ev = _zoo_evaluator("fmnist_vit", wiring="native")
    first = ev.sites[0].name
    g = {m: ev.evaluate(Policy.uniform(ev.sites, m, fallback={"gelu": "ivit"})).sites[first].gamma
         for m in ("fqvit", "ivit")}
    assert g["fqvit"] < g["ivit"] - 5


@pytest.mark.parametrize("reuse", [True, False])
def test_gamma_is_equal_where_upstream_choices_are_equal(reuse):
    torch.manual_seed(0)
    ev = Evaluator(shifted_swin(), calib_images=torch.randn(8, 3, 32, 32), eval_images=torch.randn(8, 3, 32, 32),
                   batch_size=8, sqnr_batch=8, reuse=reuse)
    names = [s.name for s in ev.sites]
    base = Policy.uniform(ev.sites, "ivit")
    k = names.index("layers.0.blocks.1.attn.softmax")
    for method in ("ibert", "fqvit"):
        a = ev.evaluate(base)
        b = ev.evaluate(base.replace({names[k]: method}))
        for name in names[: k + 1]:  # upstream identical: every gamma up to the changed site is equal
            assert a.sites[name].gamma == b.sites[name].gamma, name
        assert a.sites[names[k]].beta != b.sites[names[k]].beta
        assert a.sites[names[k + 1]].gamma != b.sites[names[k + 1]].gamma  # downstream sees the change


# -- masked entries ------------------------------------------------------------------------------

def test_asqnr_leaves_masked_entries_out():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 5)
    q = x + 0.01 * torch.randn_like(x)
    valid = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    valid[..., 3:] = False
    wild = q.clone()
    wild[..., 3:] = 1e3  # masked entries: anything, even NaN, must not matter
    wild[0, 0, 0, 4] = float("nan")
    assert asqnr(x, wild, valid=valid) == pytest.approx(asqnr(x[..., :3], q[..., :3]), rel=1e-9)
    assert asqnr(x, wild) < 0 or math.isinf(asqnr(x, wild))
    none_valid = torch.zeros_like(valid)
    assert asqnr(x, wild, valid=none_valid) == 200.0  # nothing to compare


@pytest.mark.parametrize("wiring", ["paper", "native"])
def test_evaluator_leaves_the_shifted_window_mask_out(wiring):
    torch.manual_seed(0)
    model = ps.prepare(shifted_swin(), wiring=wiring)
    ev = Evaluator(model, calib_images=torch.randn(8, 3, 32, 32), eval_images=torch.randn(8, 3, 32, 32),
                   batch_size=8, sqnr_batch=8)
    name = "layers.0.blocks.1.attn.softmax"
    policy = Policy.uniform(ev.sites, "ivit")
    res = ev.evaluate(policy)
    x_ref, y_ref, valid = ev.ref_sites[name]
    assert valid is not None and not bool(valid.all()) and bool(valid.any())
    got = {}
    with torch.no_grad(), ps.record_sites(model, lambda n, xi, y, v: got.__setitem__(n, (xi, y, v)), masks=True):
        model(ev.batches[0])
    xq, yq, v = got[name]
    assert torch.equal(v, valid)
    assert res.sites[name].gamma == pytest.approx(asqnr(x_ref, xq, valid=valid))
    assert res.sites[name].beta == pytest.approx(asqnr(y_ref, yq, valid=valid))
    # the masked entries do not count: the reference may hold anything there, the result stays
    masked = ~valid.expand_as(y_ref)
    wild_x, wild_y = x_ref.masked_fill(masked, -1e3), y_ref.masked_fill(masked, 1e3)
    ev.ref_sites[name] = (wild_x, wild_y, valid)
    ev.clear_cache()
    again = ev.evaluate(policy)
    assert again.sites[name] == res.sites[name]
    assert asqnr(wild_y, yq) < res.sites[name].beta - 5  # counted, they would weigh heavily
    assert asqnr(wild_x, xq) < res.sites[name].gamma - 5
    assert ev.ref_sites["layers.0.blocks.0.attn.softmax"][2] is None  # no mask: no selection

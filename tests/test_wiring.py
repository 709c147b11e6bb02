from collections import Counter

import pytest
import timm
import torch
from torch import nn

import policysearch as ps
from policysearch.models.segments import segments
from policysearch.models.tiny import tiny_swin, tiny_vit
from policysearch.policy import Policy, PolicyError


@pytest.mark.parametrize(
    "name, counts",
    [
        ("vit_tiny_patch16_224", {"softmax": 12, "gelu": 12, "layernorm": 25}),
        ("deit_tiny_patch16_224", {"softmax": 12, "gelu": 12, "layernorm": 25}),
        ("swin_tiny_patch4_window7_224", {"softmax": 12, "gelu": 12, "layernorm": 29}),
    ],
)
def test_site_counts_of_timm_models(name, counts):
    model = timm.create_model(name, pretrained=False)
    sites = ps.find_sites(model)
    assert Counter(s.kind for s in sites) == counts
    assert len({s.name for s in sites}) == len(sites)


def test_site_names_and_forward_order():
    vit = [s.name for s in ps.find_sites(tiny_vit())]
    assert vit == ["blocks.0.norm1", "blocks.0.attn.softmax", "blocks.0.norm2", "blocks.0.mlp.act",
                   "blocks.1.norm1", "blocks.1.attn.softmax", "blocks.1.norm2", "blocks.1.mlp.act", "norm"]
    swin = [s.name for s in ps.find_sites(tiny_swin())]
    assert swin[0] == "patch_embed.norm" and "layers.1.downsample.norm" in swin
    assert swin.index("layers.0.blocks.0.mlp.act") < swin.index("layers.1.downsample.norm")


WIRINGS = ["paper", "native"]


@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("make", [tiny_vit, tiny_swin, lambda: tiny_vit(distilled=True)])
def test_wired_model_in_float_is_unchanged(make, wiring):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        ps.prepare(model, wiring=wiring)
        out = model(x)
        seg = x
        for s in segments(model):
            seg = s.fn(seg)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seg, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wiring", WIRINGS)
def test_fused_attention_does_not_hide_softmax(wiring):
    model = tiny_vit()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
    assert sum(s.kind == "softmax" for s in ps.find_sites(ps.prepare(model, wiring=wiring))) == 2


def test_unsupported_model_names_modules():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.SiLU()

    with pytest.raises(ps.UnsupportedModelError, match="Net is not supported"):
        ps.find_sites(Net())
    model = tiny_vit()
    model.blocks[0].mlp.act = nn.SiLU()
    with pytest.raises(ps.UnsupportedModelError, match=r"blocks\.0\.mlp\.act \(SiLU\)"):
        ps.find_sites(model)
    qk = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, qk_norm=True)
    with pytest.raises(ps.UnsupportedModelError, match="q_norm"):
        ps.find_sites(qk)


def test_apply_policy_rejects_foreign_sites():
    sites = ps.find_sites(tiny_vit())
    other = ps.find_sites(tiny_swin())
    with pytest.raises(PolicyError, match="does not have"):
        ps.apply_policy(tiny_vit(), Policy.uniform(other, "ivit"))
    with pytest.raises(PolicyError, match="assigns no method"):
        ps.apply_policy(tiny_vit(), Policy.uniform(sites[:3], "ivit"))


def _calibrated(make, seed=0, wiring="paper"):
    torch.manual_seed(seed)
    model = make()
    data = torch.randn(16, 3, 32, 32)
    ps.calibrate(ps.prepare(model, wiring=wiring), data.split(8))
    return model, data


def test_default_wiring_is_paper():
    model = ps.prepare(tiny_vit())
    assert model._policysearch.wiring == "paper"
    from policysearch.spec import EvaluatorSpec

    assert EvaluatorSpec().wiring == "paper"


@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
@pytest.mark.parametrize("method", ["ibert", "ivit", "fqvit"])
def test_apply_policy_runs_close_to_float(make, method, wiring):
    model, x = _calibrated(make, wiring=wiring)
    with torch.no_grad(), ps.float_mode(model):
        ref = model(x)
    sites = ps.find_sites(model)
    ps.apply_policy(model, Policy.uniform(sites, method, fallback={"gelu": "ivit"}))
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.35, f"{method}: relative error {rel:.3f}"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5


@pytest.mark.parametrize("wiring", WIRINGS)
def test_quantization_error_shrinks_with_bits(wiring):
    model, x = _calibrated(tiny_vit, wiring=wiring)
    with torch.no_grad(), ps.float_mode(model):
        ref = model(x)
    sites = ps.find_sites(model)
    errs = {}
    for bits in (4, 6, 8):
        ps.apply_policy(model, Policy.uniform(sites, "fp32", act_bits=bits, weight_bits=bits))
        with torch.no_grad():
            errs[bits] = float((model(x) - ref).norm() / ref.norm())
    assert errs[8] < errs[6] < errs[4]


@pytest.mark.parametrize("wiring", WIRINGS)
def test_uncalibrated_model_runs_dynamically(wiring):
    torch.manual_seed(0)
    model = ps.prepare(tiny_swin(), wiring=wiring)
    sites = ps.find_sites(model)
    ps.apply_policy(model, Policy.uniform(sites, "ivit"))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("wiring", WIRINGS)
@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_qat_gradients_flow(make, wiring):
    model, x = _calibrated(make, wiring=wiring)
    ps.apply_policy(model, Policy.uniform(ps.find_sites(model), "ivit"))
    model.train()
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("wiring", WIRINGS)
def test_deepcopy_of_a_prepared_model_runs_on_its_own_modules(wiring):
    import copy

    model, x = _calibrated(tiny_vit, wiring=wiring)
    ps.apply_policy(model, Policy.uniform(ps.find_sites(model), "ibert"))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
        clone.blocks[0].mlp.fc1.weight.mul_(2)  # the clone's GELU must follow the clone's fc1
        assert not torch.allclose(clone(x), model(x))
    site = clone.blocks[0].mlp.act
    if wiring == "native":  # the GELU reads its fc1's accumulator scale
        assert site._producer[0] is clone.blocks[0].mlp.fc1
    else:  # the paper forward and the site's input quantizer are the clone's own
        assert clone.forward.__self__ is clone
        assert site._input_act[0] is clone.blocks[0].mlp.gelu_act

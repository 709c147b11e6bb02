"""The ``paper`` MLP and ViT attention run in slices of the batch (``models.slicing``, issue 24:
the kernels' elementwise passes stay in cache) and give the same integers as the whole batch at
once; where anything in them takes a statistic of the whole batch they do not slice."""
from __future__ import annotations

import pytest
import torch

import policysearch as ps
import policysearch.models.slicing as slicing
from policysearch.kernels.ibert import IBertSoftmax
from policysearch.models.attention import PaperAttention
from policysearch.models.paper import PaperMlp
from policysearch.models.site import QuantSite
from policysearch.models.tiny import tiny_swin, tiny_vit
from policysearch.policy import Policy

GELU_METHODS = ["ibert", "ivit", "relu", "poly_gelu", "poly_gelu_fixed", "fp32"]


def _model(make, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ps.prepare(make(), wiring="paper")
    ps.calibrate(model, [torch.randn(8, 3, 32, 32)])
    return model


def _steps(model: torch.nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch,
           cls: type = PaperMlp) -> list[int]:
    """The slice sizes every module of ``cls`` chose on one forward of ``x``."""
    seen: list[int] = []
    real = cls._slice_rows

    def spy(self, x_, s_):  # noqa: ANN001, ANN202
        seen.append(real(self, x_, s_))
        return seen[-1]

    monkeypatch.setattr(cls, "_slice_rows", spy)
    with torch.inference_mode():
        model(x)
    monkeypatch.setattr(cls, "_slice_rows", real)
    return seen


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
@pytest.mark.parametrize("gelu", GELU_METHODS)
@pytest.mark.parametrize("bits", [8, 6])
def test_sliced_mlp_gives_the_whole_batchs_logits_exactly(make, gelu, bits, monkeypatch):
    model = _model(make)
    sites = ps.find_sites(model)
    ps.apply_policy(model, Policy.uniform(sites, {"softmax": "ibert", "gelu": gelu, "layernorm": "ibert"},
                                          weight_bits=bits, act_bits=bits))
    x = torch.randn(6, 3, 32, 32) * 1.5
    monkeypatch.setattr(slicing, "SLICE_ELEMENTS", 2**40)  # one slice: the whole batch
    with torch.inference_mode():
        whole = model(x)
    monkeypatch.setattr(slicing, "SLICE_ELEMENTS", 1)  # one image per slice
    assert set(_steps(model, x, monkeypatch)) == {1}
    with torch.inference_mode():
        sliced = model(x)
    assert torch.equal(whole, sliced)


@pytest.mark.parametrize("softmax", ["ibert", "ivit", "fqvit", "fp32"])
@pytest.mark.parametrize("bits", [8, 6])
def test_sliced_attention_gives_the_whole_batchs_logits_exactly(softmax, bits, monkeypatch):
    model = _model(tiny_vit)
    sites = ps.find_sites(model)
    ps.apply_policy(model, Policy.uniform(sites, {"softmax": softmax, "gelu": "ivit", "layernorm": "ivit"},
                                          weight_bits=bits, act_bits=bits))
    x = torch.randn(5, 3, 32, 32) * 2.0
    monkeypatch.setattr(slicing, "SLICE_ELEMENTS", 2**40)
    with torch.inference_mode():
        whole = model(x)
    monkeypatch.setattr(slicing, "SLICE_ELEMENTS", 1)
    assert set(_steps(model, x, monkeypatch, PaperAttention)) == {1}
    with torch.inference_mode():
        sliced = model(x)
    assert torch.equal(whole, sliced)


@pytest.mark.parametrize("scale", [1e-2, 1e-3, 1e-4, 3e-6])
def test_ibert_softmax_is_row_local(scale):
    """Its 16-bit requantization's range is the same for any batch (``IBertSoftmax.row_local``)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 9, 9, generator=gen) * 4.0
    x[1, 0, 3] = float("-inf")  # a masked entry
    x[2, 1, 4] = float("nan")  # a broken row
    s = torch.tensor(scale)
    x = torch.round(x / s) * s
    kern = IBertSoftmax(8)
    assert kern.row_local()
    whole, _ = kern(x, s)
    rows = torch.cat([kern(x[i:i + 1], s)[0] for i in range(len(x))])
    assert torch.equal(whole, rows)


def test_no_slices_where_a_batch_statistic_or_a_recorder_is_involved(monkeypatch):
    monkeypatch.setattr(slicing, "SLICE_ELEMENTS", 1)
    model = _model(tiny_vit)
    sites = ps.find_sites(model)
    x = torch.randn(4, 3, 32, 32)
    ps.apply_policy(model, Policy.uniform(sites, "ibert"))
    assert set(_steps(model, x, monkeypatch)) == {1}
    # recording the sites (the SQNR batch): the recorder must see the whole tensor once
    with ps.record_sites(model, lambda *a: None):
        assert set(_steps(model, x, monkeypatch)) == {0}
    # an uncalibrated quantizer takes its scale from the whole tensor (dynamic)
    fresh = ps.prepare(tiny_vit(), wiring="paper")
    ps.apply_policy(fresh, Policy.uniform(ps.find_sites(fresh), "ibert"))
    assert set(_steps(fresh, x, monkeypatch)) == {0}
    # autograd (QAT): one graph over the whole batch
    model.train()
    with torch.enable_grad():
        mlp = next(m for m in model.modules() if isinstance(m, PaperMlp))
        h = torch.randn(4, 17, 32, requires_grad=True)
        assert mlp._slice_rows(h, torch.tensor(0.1)) == 0


def test_row_local_says_which_kernels_may_run_on_slices():
    model = _model(tiny_vit)
    sites = {s.kind: s.name for s in ps.find_sites(model)}
    qs = {m.site_name: m for m in model.modules() if isinstance(m, QuantSite)}
    gelu, softmax = qs[sites["gelu"]], qs[sites["softmax"]]
    for method in ["ibert", "ivit", "relu", "poly_gelu", "poly_gelu_fixed", "fp32"]:
        ps.apply_policy(model, Policy.uniform(list(ps.find_sites(model)),
                                              {"softmax": "ibert", "gelu": method, "layernorm": "ibert"}))
        assert gelu.row_local(), method
    for method in ["ibert", "ivit", "fqvit", "fp32"]:
        ps.apply_policy(model, Policy.uniform(list(ps.find_sites(model)),
                                              {"softmax": method, "gelu": "ibert", "layernorm": "ibert"}))
        assert softmax.row_local(), method
    # the fitted exponential takes its 16-bit range from the whole tensor (no proof it is fixed);
    # a LayerNorm is never sliced (I-BERT's overflow shift is the whole tensor's)
    ps.apply_policy(model, Policy.uniform(list(ps.find_sites(model)),
                                          {"softmax": "fit_exp", "gelu": "ibert", "layernorm": "ibert"}))
    assert not softmax.row_local()
    norm = qs[sites["layernorm"]]
    assert not norm.row_local()
    # an unfitted data-aware GELU fits on its whole input
    fresh = ps.prepare(tiny_vit(), wiring="paper")
    ps.apply_policy(fresh, Policy.uniform(ps.find_sites(fresh), {"softmax": "ibert", "gelu": "poly_gelu",
                                                                 "layernorm": "ibert"}))
    site = next(m for m in fresh.modules() if isinstance(m, QuantSite) and m.kind == "gelu")
    assert not site.row_local()

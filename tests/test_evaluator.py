import math

import pytest
import torch

import policysearch as ps
from policysearch.models.tiny import tiny_swin, tiny_vit
from policysearch.errors import PolicySearchError
from policysearch.objectives import Evaluator, asqnr, kl_divergence
from policysearch.policy import Policy


def _evaluator(make=tiny_vit, reuse=True, objective="kl", wiring="paper", **options):
    torch.manual_seed(0)
    model = ps.prepare(make(), wiring=wiring)
    calib = torch.randn(16, 3, 32, 32)
    images = torch.randn(24, 3, 32, 32)
    labels = torch.randint(0, 10, (24,))
    return Evaluator(model, calib_images=calib, eval_images=images, eval_labels=labels,
                     objective=objective, batch_size=8, sqnr_batch=8, reuse=reuse, **options)


def test_asqnr_definition():
    x = torch.ones(2, 4)
    q = x + 0.1  # E[x^2] / E[e^2] = 100 per sample -> 20 log10(100) = 40 dB
    assert asqnr(x, q) == pytest.approx(40.0)
    assert asqnr(x, x) == 200.0
    assert asqnr(x, torch.full_like(x, float("nan"))) == -math.inf
    # the batch mean is over per-sample ratios, not over dB values
    x2 = torch.ones(2, 4)
    q2 = torch.stack([x2[0] + 0.1, x2[1] + 1.0])
    assert asqnr(x2, q2) == pytest.approx(20 * math.log10((100 + 1) / 2))


def test_kl_is_zero_for_equal_logits():
    z = torch.randn(5, 10)
    assert kl_divergence(z, z) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(z, z + torch.randn(5, 10)) > 0


@pytest.mark.parametrize("wiring", ["paper", "native"])
@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_evaluate_reports_site_and_model_metrics(make, wiring):
    ev = _evaluator(make, wiring=wiring)
    res = ev.evaluate(Policy.uniform(ev.sites, "ivit"))
    assert res.ok
    assert list(res.sites) == [s.name for s in ev.sites]
    for m in res.sites.values():
        assert math.isfinite(m.gamma) and math.isfinite(m.beta)
        assert m.diff == pytest.approx(m.beta - m.gamma)
    assert 0 <= res.metrics["agreement"] <= 1 and res.metrics["kl"] >= 0
    assert res.values == (res.metrics["kl"],)
    fp = ev.evaluate(Policy.uniform(ev.sites, "fp32", act_bits=16, weight_bits=16))
    assert fp.metrics["kl"] < res.metrics["kl"]


@pytest.mark.parametrize("wiring", ["paper", "native"])
@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_activation_reuse_gives_identical_results_with_fewer_segment_calls(make, wiring):
    with_reuse, without = _evaluator(make, reuse=True, wiring=wiring), _evaluator(make, reuse=False, wiring=wiring)
    base = Policy.uniform(with_reuse.sites, "ivit")
    changes = [base] + [base.replace({s.name: c}) for s in with_reuse.sites[3:] for c in ("fp32", "ibert")]
    for p in changes:
        a, b = with_reuse.evaluate(p), without.evaluate(p)
        assert a.values == b.values
        assert a.sites == b.sites
    assert with_reuse.segment_calls < without.segment_calls


def _kept_bytes(ev: Evaluator) -> int:
    """Bytes of the kept segment inputs (segment 0's is the evaluator's own batch)."""
    return sum(t.numel() * t.element_size() for run in ev._runs for batch in run.inputs for h in batch[1:]
               if h is not None for t in (h if isinstance(h, tuple) else (h,)) if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin])
def test_reuse_memory_keeps_every_kth_segment_input_with_identical_results(make):
    full = _evaluator(make)
    base = Policy.uniform(full.sites, "ivit")
    changes = [base] + [base.replace({s.name: c}) for s in full.sites[2:] for c in ("fp32", "ibert")]
    for p in changes:
        full.evaluate(p)
    assert full.stride == 1
    budget = _kept_bytes(full) // 3  # a third of what keeping everything takes
    bounded, without = _evaluator(make, reuse_memory=budget), _evaluator(make, reuse=False)
    for p in changes:
        a, b = bounded.evaluate(p), without.evaluate(p)
        assert a.values == b.values and a.sites == b.sites
        assert _kept_bytes(bounded) <= budget * 1.05  # the inputs' scale tensors aside
    assert bounded.stride >= 3
    assert full.segment_calls < bounded.segment_calls < without.segment_calls
    with pytest.raises(PolicySearchError, match="reuse_memory"):
        _evaluator(make, reuse_memory=0)


def test_non_finite_logits_give_failed_result():
    ev = _evaluator()
    with torch.no_grad():
        ev.model.head.weight[0, 0] = float("nan")
    res = ev.evaluate(Policy.uniform(ev.sites, "fp32"))
    assert not res.ok and "non-finite" in res.error


def test_nan_float_model_is_one_clear_error():
    from policysearch.models.loading import ModelError

    torch.manual_seed(0)
    model = tiny_vit()
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    with pytest.raises(ModelError, match="non-finite"):
        Evaluator(model, calib_images=torch.randn(4, 3, 32, 32), eval_images=torch.randn(4, 3, 32, 32))

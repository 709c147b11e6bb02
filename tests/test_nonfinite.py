"""A policy whose logits go NaN/inf is an error naming the first site, never a silent 10% top-1."""
import pytest
import torch

import policysearch as ps
from policysearch.errors import PolicySearchError
from policysearch.models.tiny import tiny_vit
from policysearch.objectives.evaluator import Evaluator, NonFiniteOutputError
from policysearch.policy import Policy


@pytest.fixture(scope="module")
def sharp_evaluator():
    """A tiny ViT with sharp attention in block 0 (as a trained one has): I-BERT's softmax on a
    2-bit input divides by a zero row sum there in the native wiring."""
    torch.manual_seed(0)
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(10)
    model = ps.prepare(model, wiring="native")
    return Evaluator(model, calib_images=torch.randn(8, 3, 32, 32), eval_images=torch.randn(16, 3, 32, 32),
                     eval_labels=torch.randint(0, 10, (16,)), batch_size=8, sqnr_batch=8)


def test_nonfinite_logits_name_the_first_site(sharp_evaluator):
    ev = sharp_evaluator
    base = Policy.uniform(ev.sites, "ibert")
    assert ev.evaluate(base).ok
    bad = base.replace({"blocks.0.attn.softmax": "ibert@2"})
    res = ev.evaluate(bad)
    assert not res.ok
    assert "'blocks.0.attn.softmax'" in res.error and "ibert@2" in res.error and "output" in res.error
    assert "\n" not in res.error
    with pytest.raises(NonFiniteOutputError, match=r"blocks\.0\.attn\.softmax.*ibert@2") as info:
        ev.evaluate(bad, strict=True)
    assert isinstance(info.value, PolicySearchError)
    # the evaluator stays usable, and a finite policy after it is unaffected
    assert ev.evaluate(base).ok


def test_finite_policy_is_not_flagged_in_strict_mode(sharp_evaluator):
    ev = sharp_evaluator
    res = ev.evaluate(Policy.uniform(ev.sites, "ivit"), strict=True)
    assert res.ok and res.error is None

"""ReLU repair (policysearch.objectives.repair): a relu GELU site's MLP re-fitted to the float block."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

import policysearch.objectives.repair as repair
from policysearch.errors import ConfigError
from policysearch.models.loading import load_model
from policysearch.models.wiring import prepare
from policysearch.objectives import Evaluator
from policysearch.objectives.repair import RepairSettings, mlp_output_mse, repair_mlp
from policysearch.policy import Policy

STEPS = 25


def _evaluator(tmp_path, *, name="test_fmnist_vit", wiring="paper", repair_on=True, reuse=True, steps=STEPS,
               cache=True, seed=0):
    torch.manual_seed(0)
    model = prepare(load_model(name), wiring=wiring)
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(16, 1, 28, 28, generator=g)
    images = torch.randn(24, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (24,), generator=g)
    settings = RepairSettings(steps=steps, batch_tokens=64, seed=seed,
                              cache_dir=(tmp_path / "relu_repair") if cache else None) if repair_on else None
    return Evaluator(model, calib_images=calib, eval_images=images, eval_labels=labels, batch_size=8,
                     sqnr_batch=8, reuse=reuse, relu_repair=settings)


def _same(a, b):
    return a.shape == b.shape and bool(torch.equal(a, b) or torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


def _gelu(ev):
    return [s.name for s in ev.sites if s.kind == "gelu"]


def _relu(policy, sites):
    return policy.replace({s: "relu" for s in sites})


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    real = repair.repair_mlp

    def counting(teacher, inputs, settings, **kw):
        calls.append(kw.get("site"))
        return real(teacher, inputs, settings, **kw)

    monkeypatch.setattr(repair, "repair_mlp", counting)
    return calls


def test_repair_lowers_the_mlp_output_error():
    torch.manual_seed(0)
    teacher = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 48), act=nn.GELU(), fc2=nn.Linear(48, 16)))
    x = torch.randn(2048, 16)
    rep = repair_mlp(teacher, x, RepairSettings(steps=150, lr=3e-3, cache_dir=None))
    assert rep.mse_after < 0.5 * rep.mse_before
    # the reported errors are those of the returned weights, measured independently here
    student = nn.Sequential(OrderedDict(fc1=nn.Linear(16, 48), act=nn.ReLU(), fc2=nn.Linear(48, 16)))
    student.load_state_dict({k: v for k, v in rep.weights.items()})
    with torch.no_grad():
        target = teacher(x)
    assert mlp_output_mse(student, x, target) == pytest.approx(rep.mse_after, rel=1e-5)
    assert isinstance(teacher.act, nn.GELU)  # the teacher is left as it was


@pytest.mark.parametrize("name,wiring", [("test_fmnist_vit", "paper"), ("test_fmnist_vit", "native"),
                                         ("test_fmnist_swin", "paper")])
def test_evaluated_relu_site_runs_the_repaired_weights(tmp_path, name, wiring):
    ev = _evaluator(tmp_path, name=name, wiring=wiring)
    site = _gelu(ev)[0]
    mlp = ev.model.get_submodule(site.rpartition(".")[0])
    before_w = mlp.fc1.weight.detach().clone()
    before_ranges = repair._ranges_of(mlp)
    res = ev.evaluate(_relu(Policy.uniform(ev.sites, "ibert"), [site]))
    assert res.ok
    rep = ev.relu_repair.repaired(site)
    assert rep.mse_after < rep.mse_before
    assert torch.equal(mlp.fc1.weight, rep.weights["fc1.weight"])
    ranges = repair._ranges_of(mlp)  # the MLP's quantizers were re-calibrated on the repaired MLP
    assert any(not _same(ranges[p]["max_val"], before_ranges[p]["max_val"]) for p in ranges)
    ev.evaluate(Policy.uniform(ev.sites, "ibert"))  # no relu: the originals are back, ranges too
    assert torch.equal(mlp.fc1.weight, before_w)
    after_ranges = repair._ranges_of(mlp)
    assert all(_same(after_ranges[p][k], v) for p, sd in before_ranges.items() for k, v in sd.items())


def test_second_candidate_hits_the_memory_cache(tmp_path, count_trainings):
    ev = _evaluator(tmp_path, cache=False)
    a, b = _gelu(ev)
    base = Policy.uniform(ev.sites, "ibert")
    ev.evaluate(_relu(base, [a]))
    assert count_trainings == [a]
    softmax = next(s.name for s in ev.sites if s.kind == "softmax")
    ev.evaluate(_relu(base.replace({softmax: "ivit"}), [a]))  # another candidate, same relu site
    ev.evaluate(_relu(Policy.uniform(ev.sites, "ivit"), [a]))
    assert count_trainings == [a]
    ev.evaluate(_relu(base, [a, b]))  # only the new site trains
    assert count_trainings == [a, b]
    ev.evaluate(base)
    ev.evaluate(_relu(base, [b]))
    assert count_trainings == [a, b] and ev.relu_repair.trainings == 2


def test_disk_cache_is_reused_by_a_fresh_evaluator(tmp_path, count_trainings, caplog):
    first = _evaluator(tmp_path)
    policy = _relu(Policy.uniform(first.sites, "ibert"), _gelu(first))
    with caplog.at_level("INFO", logger="policysearch.objectives.repair"):
        res1 = first.evaluate(policy)
    assert "computed" in caplog.text
    files = sorted((tmp_path / "relu_repair").glob("*.safetensors"))
    assert [f.name.split("-")[0] for f in files] == sorted(_gelu(first))
    caplog.clear()
    second = _evaluator(tmp_path)
    with caplog.at_level("INFO", logger="policysearch.objectives.repair"):
        res2 = second.evaluate(policy)
    assert "loaded from cache" in caplog.text
    assert len(count_trainings) == 2 and second.relu_repair.trainings == 0 and second.relu_repair.loads == 2
    assert res2.values == res1.values and res2.sites == res1.sites and res2.metrics == res1.metrics
    # the key follows what the repair depends on: other settings or another calibration set
    other = _evaluator(tmp_path, steps=STEPS + 1)
    assert other.relu_repair.key(_gelu(other)[0]) != second.relu_repair.key(_gelu(second)[0])
    assert other.relu_repair.key(_gelu(other)[0]).startswith(_gelu(other)[0] + "-")


def test_cache_file_that_does_not_fit_is_recomputed(tmp_path, count_trainings):
    ev = _evaluator(tmp_path)
    site = _gelu(ev)[0]
    path = tmp_path / "relu_repair" / f"{ev.relu_repair.key(site)}.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    assert ev.evaluate(_relu(Policy.uniform(ev.sites, "ibert"), [site])).ok
    assert count_trainings == [site]
    fresh = _evaluator(tmp_path)
    fresh.evaluate(_relu(Policy.uniform(fresh.sites, "ibert"), [site]))  # the rewritten file loads
    assert fresh.relu_repair.loads == 1


@pytest.mark.parametrize("wiring", ["paper", "native"])
def test_policies_without_relu_are_unaffected(tmp_path, wiring):
    with_repair, without = _evaluator(tmp_path, wiring=wiring), _evaluator(tmp_path, wiring=wiring, repair_on=False)
    base = Policy.uniform(with_repair.sites, "ibert")
    relu_policy = _relu(base, _gelu(with_repair))
    policies = [base, Policy.uniform(with_repair.sites, "ivit"), base.replace({_gelu(with_repair)[1]: "ivit"})]
    for p in policies:
        a, b = with_repair.evaluate(p), without.evaluate(p)
        assert a.values == b.values and a.sites == b.sites and a.metrics == b.metrics
        with_repair.evaluate(relu_policy)  # in between: repaired weights swapped in, then out again
    assert with_repair.relu_repair.trainings == 2
    # with the repair off, relu still only swaps the activation
    assert without.relu_repair is None and without.evaluate(relu_policy).ok


@pytest.mark.parametrize("wiring", ["paper", "native"])
def test_segment_reuse_gives_the_fresh_result_for_relu_candidates(tmp_path, wiring):
    reused = _evaluator(tmp_path, wiring=wiring, reuse=True)
    a, b = _gelu(reused)
    base = Policy.uniform(reused.sites, "ibert")
    sequence = [base, _relu(base, [b]), _relu(base, [a, b]), _relu(base, [a]), base, _relu(base, [b]),
                _relu(Policy.uniform(reused.sites, "ivit"), [b])]
    for p in sequence:
        fresh = _evaluator(tmp_path, wiring=wiring, reuse=False)  # loads the same repairs from disk
        r1, r2 = reused.evaluate(p), fresh.evaluate(p)
        assert r1.values == r2.values and r1.sites == r2.sites and r1.metrics == r2.metrics
    assert reused.relu_repair.trainings == 2
    # the relu candidate after the base restarts at block 1's MLP (the last two segments), not at the stem
    reused.evaluate(base)
    calls = reused.segment_calls
    reused.evaluate(_relu(base, [b]))
    assert reused.segment_calls - calls == 2 * len(reused.batches)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="steps must be a positive integer"):
        RepairSettings(steps=0)
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        RepairSettings(lr=float("nan"))
    assert "cache_dir" not in RepairSettings().key_fields()

"""The Python API (policysearch.search_policy): a user's own model and images in, a policy, its
metrics and the integer model out, through the same search (and run records) as the CLI."""
import contextlib
import io

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import policysearch
from policysearch import api
from policysearch.cli import main
from policysearch.errors import PolicySearchError
from policysearch.models import find_sites, float_mode
from policysearch.models.tiny import tiny_vit
from policysearch.objectives.sqnr import logit_metrics
from policysearch.policy import read_policy


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 32, 32, generator=g)
    return x[:16], x, torch.randint(0, 10, (40,), generator=g)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_vit()


@pytest.fixture(scope="module")
def searched(model, data, tmp_path_factory):
    calib, x, y = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = tmp_path_factory.mktemp("api") / "results"
    res = policysearch.search_policy(model, calib=calib, eval=(x, y), strategy="sqnr_diff", space="paper",
                                     objective="kl", bits=8, run_name="api", results_dir=str(results),
                                     progress=False)
    return res, before, results


def test_root_exports_the_api_and_keeps_the_search_module():
    import policysearch.search as search_module
    from policysearch.search import SearchConfig, search

    assert policysearch.search_policy is api.search_policy
    assert policysearch.PolicyResult is api.PolicyResult
    assert policysearch.SearchConfig is SearchConfig
    assert {"search_policy", "PolicyResult", "SearchConfig"} <= set(policysearch.__all__)
    assert policysearch.search is search_module and search_module.search is search


def test_result_has_policy_metrics_with_counts(searched, model):
    res, _, results = searched
    assert [s.name for s in res.policy.sites] == [s.name for s in find_sites(tiny_vit())]
    m = res.metrics
    assert (m["eval_images"], m["calib_images"]) == (40, 16)
    assert 0 <= m["top1"] <= 1 and m["kl"] >= 0 and 0 <= m["agreement"] <= 1
    assert set(res.baselines) == {"ibert", "fqvit", "ivit"}
    assert res.run_dir == results / "api" and (res.run_dir / "run.json").is_file()
    assert "run api:" in res.summary()


def test_the_users_model_is_left_unchanged(searched, model):
    _, before, _ = searched
    assert not hasattr(model, "_policysearch")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("given", [False, True], ids=["searched-model", "users-model"])
def test_apply_gives_the_integer_model_the_search_scored(searched, model, data, given):
    res, _, _ = searched
    _, x, y = data
    qmodel = res.apply(model if given else None)
    assert qmodel is not model
    with torch.no_grad():
        logits = qmodel(x)
        with float_mode(qmodel):
            ref = qmodel(x)
    assert float((logits.argmax(-1) == y).double().mean()) == res.metrics["top1"]
    measured = logit_metrics(ref, logits)
    assert measured == {k: res.metrics[k] for k in measured}  # the same logits, bit for bit


def test_a_dataloader_is_the_same_work_and_resumes(searched, model, data):
    """Loaders give the same images: same fingerprint, so the second run reuses every evaluation."""
    res, _, results = searched
    calib, x, y = data
    calib_loader = DataLoader(TensorDataset(calib, torch.zeros(len(calib), dtype=torch.long)), batch_size=8)
    eval_loader = DataLoader(TensorDataset(x, y), batch_size=16)
    again = policysearch.search_policy(model, calib=calib_loader, eval=eval_loader, bits=8, run_name="api-loader",
                                       results_dir=str(results), progress=False)
    assert again.search.evaluated == 0 and again.search.reused > 0
    assert again.policy == res.policy and again.metrics == res.metrics


def test_the_cli_reads_the_run_the_api_made(searched, tmp_path):
    res, _, results = searched
    out = tmp_path / "policy.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "api", "--results-dir", str(results), "--out", str(out)]) == 0
    doc = read_policy(out)
    assert doc.policy == res.policy
    assert doc.provenance["eval_size"] == 40 and doc.provenance["calib_size"] == 16


# ---- bad input: one PolicySearchError naming the fix, before any work -----------------------------
def _no_sites() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


@pytest.mark.parametrize(("make", "kwargs", "message"), [
    (lambda: "vit", {}, "must be a torch.nn.Module"),
    (_no_sites, {}, "not supported"),
    (tiny_vit, {"calib": torch.randn(4, 3, 16, 16)}, "takes input (3, 32, 32)"),
    (tiny_vit, {"calib": torch.randn(4, 32, 32)}, "float tensor (N, C, H, W)"),
    (tiny_vit, {"calib": torch.zeros(4, 3, 32, 32, dtype=torch.uint8)}, "float tensor"),
    (tiny_vit, {"eval": (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 10]))}, "num_classes=11"),
    (tiny_vit, {"eval": (torch.randn(4, 3, 32, 32), torch.tensor([0, 1]))}, "4 eval images but 2 labels"),
    (tiny_vit, {"eval": (torch.randn(4, 3, 28, 28), torch.tensor([0, 1, 2, 3]))}, "eval images are"),
    (tiny_vit, {"calib": "images/"}, "DataLoader"),
    (tiny_vit, {"stratgy": "tpe"}, "unknown option(s) stratgy; valid:"),
    (tiny_vit, {"data": "fmnist"}, "set by the model and images"),
    (tiny_vit, {"runner": "ray"}, "runner='local'"),
    (tiny_vit, {"bits": 1}, "must be in [2, 16]"),
], ids=["not-a-module", "no-sites", "image-size", "not-4d", "uint8", "label-classes", "label-count",
        "calib-eval-shapes", "a-string", "unknown-option", "input-option", "ray", "bits"])
def test_bad_input_is_one_clear_error(make, kwargs, message, tmp_path):
    args = {"calib": torch.randn(4, 3, 32, 32), "results_dir": str(tmp_path), "progress": False, **kwargs}
    with pytest.raises(PolicySearchError, match=None) as info:
        policysearch.search_policy(make(), **args)
    assert message in str(info.value)
    assert not (tmp_path / "studies.db").exists()  # refused before any work

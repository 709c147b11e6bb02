"""The integer artifact: calibration independent of the batch split, and a model rebuilt from the
exported artifact alone (no calibration image) computing the CLI's logits bit for bit."""
import contextlib
import io
import json

import pytest
import torch

from policysearch.artifact import ArtifactError, load_artifact, save_artifact
from policysearch.cli import main
from policysearch.data import load_data
from policysearch.models import apply_policy, calibrate, find_sites, prepare
from policysearch.models.loading import load_model
from policysearch.models.wiring import calib_chunks
from policysearch.policy import Policy, read_policy
from policysearch.quant import Observer
from policysearch.spec import EvaluatorSpec

MIXED = {"softmax": "fit_exp", "layernorm": "fqvit", "gelu": "poly_gelu"}


def _model(wiring="paper"):
    return prepare(load_model("test_fmnist_vit"), wiring=wiring).eval()


@pytest.fixture(scope="module")
def data():
    return load_data("fmnist-sample", model=load_model("test_fmnist_vit"), calib_size=300, eval_size=16)


def _ranges(model):
    return {n: torch.stack([m.min_val, m.max_val]) for n, m in model.named_modules() if isinstance(m, Observer)}


def test_the_default_split_passes_through_unchanged():
    x = torch.randn(600, 1, 4, 4)
    parts = x.split(256)
    assert all(a is b for a, b in zip(calib_chunks(parts), parts, strict=True))
    assert [c.shape[0] for c in calib_chunks(x.split(7))] == [256, 256, 88]
    assert torch.equal(torch.cat(list(calib_chunks(x.split(7)))), x)


@pytest.mark.parametrize("split", [32, 100, 300])
def test_calibration_does_not_depend_on_the_split(data, split):
    calib = data.calib_images()
    models = [_model(), _model()]
    calibrate(models[0], calib.split(256))
    calibrate(models[1], calib.split(split))
    a, b = (_ranges(m) for m in models)
    assert a.keys() == b.keys()
    for k in a:  # NaN: an observer this wiring never feeds
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    x, _ = data.eval_tensors()
    policy = Policy.uniform(find_sites(models[0]), MIXED)
    with torch.no_grad():
        y0, y1 = (apply_policy(m, policy)(x) for m in models)
    assert torch.equal(y0, y1)


@pytest.mark.parametrize("wiring", ["paper", "native"])
@pytest.mark.parametrize("methods", [MIXED, {"softmax": "ivit", "layernorm": "ibert", "gelu": "ibert"}])
def test_a_fresh_model_loads_the_artifact_bit_exactly(data, tmp_path, wiring, methods):
    model = _model(wiring)
    calibrate(model, data.calib_images().split(64))
    apply_policy(model, Policy.uniform(find_sites(model), methods))
    x, _ = data.eval_tensors()
    with torch.no_grad():
        ref = model(x)
    save_artifact(model, tmp_path / "a.safetensors")
    fresh = load_artifact(_model(wiring), tmp_path / "a.safetensors")  # never calibrated
    assert fresh._policysearch.calibration["images"] == 300
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)


def test_the_artifact_refuses_other_weights_and_wirings(data, tmp_path):
    model = _model()
    calibrate(model, data.calib_images()[:32].split(32))
    apply_policy(model, Policy.uniform(find_sites(model), "ibert"))
    save_artifact(model, tmp_path / "a.safetensors")
    with pytest.raises(ArtifactError, match="native"):
        load_artifact(_model("native"), tmp_path / "a.safetensors")
    other = _model()
    with torch.no_grad():
        other.head.weight.mul_(2)
    with pytest.raises(ArtifactError, match="integer weights differ"):
        load_artifact(other, tmp_path / "a.safetensors")
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(_model(), tmp_path / "missing.safetensors")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifact")
    args = ["run", "--strategy", "sqnr_drop", "--model", "test_fmnist_vit", "--eval-size", "32",
            "--calib-size", "300", "--run-name", "art", "--no-progress", "--results-dir", str(root / "results")]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
        assert main(["export", "art", "--results-dir", str(root / "results"), "--out", str(root / "policy.json")]) == 0
    return root


def test_export_names_the_artifact_and_its_calibration(exported):
    doc = json.loads((exported / "policy.json").read_text())
    ref = doc["integer_model"]
    assert ref["file"] == "policy.integer.safetensors" and (exported / ref["file"]).is_file()
    assert ref["format"] == "policysearch.integer/v1" and ref["numerics"]
    assert ref["calibration"]["images"] == 300 and ref["calibration"]["chunk"] == 256


def test_the_artifact_alone_reproduces_the_cli_logits_bit_for_bit(exported):
    doc = read_policy(exported / "policy.json")
    spec = EvaluatorSpec.from_policy(doc, device="cpu")  # the search's own evaluator: calibrates
    ev = spec.build()
    x = ev.batches[1]
    with torch.no_grad():
        cli = apply_policy(ev.model, doc.policy)(x)
    model = prepare(load_model(doc.model["name"]), wiring=doc.wiring)
    load_artifact(model, exported / doc.integer_model["file"])
    with torch.no_grad():
        assert torch.equal(model(x), cli)


def test_apply_loads_the_artifact(exported, capsys):
    assert main(["apply", str(exported / "policy.json"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "loaded, not recalibrated" in out and "DIFFERS" not in out


def test_onnx_export_carries_the_policy_and_preprocessing(exported):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from policysearch.deploy.onnx_export import export_run_onnx

    res = export_run_onnx("art", exported / "m.onnx", results_dir=exported / "results", top1=False)
    props = {p.key: p.value for p in onnx.load(str(res.path)).metadata_props}
    assert json.loads(props["policysearch.input_size"]) == [1, 28, 28]
    assert len(json.loads(props["policysearch.mean"])) == len(json.loads(props["policysearch.std"])) == 1
    policy = json.loads(props["policysearch.policy"])
    assert policy["sites"] == json.loads((exported / "policy.json").read_text())["sites"]

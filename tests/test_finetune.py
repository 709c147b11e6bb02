"""The training stage (policysearch.finetune): distillation, QAT gradients and ranges, ReLU stages,
resume, outputs and their reload. Tiny zoo test models on the shipped sample, a few steps each."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import policysearch as ps
from policysearch import kernels
from policysearch.data import load_data
from policysearch.finetune import (
    FinetuneError,
    FinetuneStopped,
    KDLoss,
    build_student,
    finetune,
    freeze,
    gelu_paths,
    kd_loss,
    qat_train,
    relu_distill,
    relu_plan,
    track_ranges,
)
from policysearch.finetune.batches import TrainBatches
from policysearch.kernels._common import current_ste, ste_gradients
from policysearch.methods import get_method
from policysearch.models.loading import load_model
from policysearch.numerics import NUMERICS_VERSION
from policysearch.policy import Policy
from policysearch.sites import KIND_METHODS
from policysearch.train import train
from scripts import load_script

tables = load_script("finetune_tables")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest (and the test machines are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(calib_size=32, eval_size=64, batch_size=32, progress=False, device="cpu")


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_fmnist_vit trained briefly in float (meaningful logits for a teacher), as safetensors."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = load_model("test_fmnist_vit")
    data = load_data("fmnist-sample", model=model)
    train(model, TrainBatches(data.train_dataset(), 64, seed=0), steps=150, lr=3e-3, device="cpu", progress=False)
    path = tmp_path_factory.mktemp("teacher") / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _sample(model: nn.Module, n: int = 128) -> torch.Tensor:
    data = load_data("fmnist-sample", model=model)
    return data.calib_images()[:n]


def _uniform(model_name: str, method: str, *, wiring: str = "paper", bits: int = 8) -> Policy:
    m = load_model(model_name)
    ps.prepare(m, wiring=wiring)
    per_kind = {k: (method if method in KIND_METHODS[k] else {"gelu": "relu"}[k]) for k in KIND_METHODS}
    return Policy.uniform(ps.find_sites(m), per_kind, weight_bits=bits, act_bits=bits)


# ---- the distillation loss ------------------------------------------------------------------------

def test_kd_loss_is_zero_on_the_teacher_and_mixes_labels() -> None:
    torch.manual_seed(0)
    t = torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    assert float(kd_loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 5)
    assert float(kd_loss(s, t, temperature=2.0)) > 0
    ce = torch.nn.functional.cross_entropy(s, y)
    assert float(kd_loss(s, t, y, weight=0.0)) == pytest.approx(float(ce))
    mixed = 0.25 * float(kd_loss(s, t, temperature=3.0)) + 0.75 * float(ce)
    assert float(kd_loss(s, t, y, temperature=3.0, weight=0.25)) == pytest.approx(mixed, rel=1e-5)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(s, t, None, weight=0.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, temperature=0.0)


def test_a_few_qat_steps_lower_the_distillation_loss_and_raise_agreement(trained_vit: Path) -> None:
    teacher = freeze(load_model("test_fmnist_vit", checkpoint=str(trained_vit)))
    x = _sample(teacher, 256)
    policy = _uniform("test_fmnist_vit", "ivit", bits=4)  # a student far from its teacher
    student, _ = build_student("test_fmnist_vit", checkpoint=str(trained_vit), model_args={}, wiring="paper",
                               policy=policy, calib_images=x[:64], device=torch.device("cpu"))

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            s, t = student.eval()(x), teacher(x)
        return float(kd_loss(s, t)), float((s.argmax(-1) == t.argmax(-1)).double().mean())

    loss0, agree0 = measure()
    batches = [(x[i:i + 64], torch.zeros(64, dtype=torch.long)) for i in range(0, 256, 64)]
    res = qat_train(student, batches, teacher=teacher, steps=24, lr=1e-3, warmup_steps=2, weight_decay=0.0,
                    device="cpu", progress=False)
    assert res.finished and res.steps == 24
    loss1, agree1 = measure()
    assert loss1 < 0.6 * loss0, (loss0, loss1)
    assert agree1 > agree0 + 0.03, (agree0, agree1)


def test_the_teacher_stays_frozen(trained_vit: Path) -> None:
    teacher = load_model("test_fmnist_vit", checkpoint=str(trained_vit))
    before = _params(teacher)
    x = _sample(teacher, 64)
    policy = _uniform("test_fmnist_vit", "ibert")
    student, _ = build_student("test_fmnist_vit", checkpoint=str(trained_vit), model_args={}, wiring="paper",
                               policy=policy, calib_images=x, device=torch.device("cpu"))
    teacher.train()  # a teacher handed over in training mode is put in eval mode and frozen
    loss = KDLoss(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    qat_train(student, [(x, torch.zeros(64, dtype=torch.long))], teacher=teacher, steps=3, lr=1e-2,
              device="cpu", progress=False)
    assert _same(before, _params(teacher))
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert loss.teacher is teacher


# ---- gradients ------------------------------------------------------------------------------------

def _quant(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = x.abs().max() / (2 ** (bits - 1) - 1)
    return torch.round(x / s) * s, s


@pytest.mark.parametrize("kind, method", [(k, m) for k in KIND_METHODS for m in KIND_METHODS[k]])
def test_kernel_gradients_in_both_ste_modes_with_the_forward_unchanged(kind: str, method: str) -> None:
    torch.manual_seed(0)
    norm = nn.LayerNorm(32)
    nn.init.normal_(norm.weight, 1.0, 0.1)
    nn.init.normal_(norm.bias, 0.0, 0.1)
    # each method at its operating point: I-BERT's softmax/GELU take a fine accumulator grid
    bits = 16 if kind == "layernorm" or method == "ibert" else 8
    x0, s = _quant(torch.randn(3, 5, 32) * 2, bits)
    if kind == "softmax":
        x0 = x0.clone()
        x0[..., :4] -= 100.0  # Swin's mask: those entries get no gradient and no NaN
    if kind == "layernorm" and method == "fqvit":
        s = s.expand(32).clone()  # PTF: per-channel scales
    kern = kernels.create(kind, method, norm=norm)
    with torch.no_grad():
        y0, _ = kern(x0, s)
    grads = {}
    w = torch.randn_like(y0)
    for mode in ("float", "reference"):
        norm.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with ste_gradients(mode):
            assert current_ste() == mode
            y, _ = kern(x, s)
        assert torch.equal(y.detach(), y0), "the forward value must not depend on autograd or the STE mode"
        (y * w).sum().backward()
        assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
        if kind == "softmax":
            assert float(x.grad[..., :4].abs().max()) < 1e-6 * float(x.grad.abs().max()) + 1e-12
        if kind == "layernorm":
            for p in (norm.weight, norm.bias):
                assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0
        grads[mode] = x.grad.clone()
    assert current_ste() == "float"
    if get_method(kind, method).reference_ste:  # the reference graph is not the float operator's
        assert not torch.allclose(grads["float"], grads["reference"])
    else:
        assert torch.allclose(grads["float"], grads["reference"])
    with pytest.raises(ValueError, match="unknown STE mode"):
        with ste_gradients("exact"):
            pass


@pytest.mark.parametrize("wiring", ["paper", "native"])
@pytest.mark.parametrize("model_name", ["test_fmnist_vit", "test_fmnist_swin"])
def test_gradients_reach_every_weight_through_every_method(model_name: str, wiring: str) -> None:
    model = load_model(model_name)
    ps.prepare(model, wiring=wiring)
    x = _sample(model, 16)
    ps.calibrate(model, [x])
    sites = ps.find_sites(model)
    policies = [Policy.uniform(sites, {"softmax": m, "gelu": g, "layernorm": n})
                for m, g, n in (("ibert", "ibert", "ibert"), ("fqvit", "relu", "fqvit"), ("ivit", "ivit", "ivit"),
                                ("fp32", "fp32", "fp32"), ("fit_exp", "poly_gelu", "ibert"),
                                ("fit_exp", "poly_gelu_fixed", "ibert"))]
    covered = {(s.kind, c.method) for p in policies for s, c in p.items()}
    assert covered == {(k, m) for k in KIND_METHODS for m in KIND_METHODS[k]}
    model.train()
    for policy in policies:
        ps.apply_policy(model, policy)
        for mode in ("reference", "float"):
            model.zero_grad(set_to_none=True)
            with ste_gradients(mode):
                model(x).logsumexp(-1).sum().backward()
            for name, p in model.named_parameters():
                assert p.grad is not None, (policy.key()[:40], mode, name)
                assert torch.isfinite(p.grad).all(), (mode, name)
            total = sum(float(p.grad.abs().sum()) for p in model.parameters())
            assert total > 0
            # every LayerNorm's weight and bias train under every LayerNorm method
            norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
            assert norms
            for norm in norms:
                assert float(norm.weight.grad.abs().sum()) > 0 and float(norm.bias.grad.abs().sum()) > 0, mode


# ---- activation ranges ------------------------------------------------------------------------------

def test_ranges_follow_the_training_batches_like_ivit_quantact() -> None:
    from policysearch.quant import IntAct

    model = load_model("test_fmnist_vit")
    ps.prepare(model, wiring="paper")
    x = _sample(model, 64)
    ps.calibrate(model, [x[:32]])
    ps.apply_policy(model, _uniform("test_fmnist_vit", "ivit"))
    acts = [m for m in model.modules() if isinstance(m, IntAct) and m.observer.ready]
    assert acts
    calibrated = [(float(a.observer.min_val), float(a.observer.max_val)) for a in acts]
    big = x[32:] * 3.0  # wider activations than calibration saw
    with track_ranges(model, momentum=0.5) as n:
        assert n >= len(acts)
        with torch.no_grad():  # no autograd: not training, nothing moves
            model.train()(big)
        assert [(float(a.observer.min_val), float(a.observer.max_val)) for a in acts] == calibrated
        model.eval()(big).sum()  # eval mode: ranges fixed
        assert [(float(a.observer.min_val), float(a.observer.max_val)) for a in acts] == calibrated
        first = acts[0]
        lo, hi = calibrated[0]
        seen: list[torch.Tensor] = []
        handle = first.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        model.train()(big)
        handle.remove()
        t = seen[0]
        assert float(first.observer.min_val) == pytest.approx(0.5 * lo + 0.5 * float(t.min()), rel=1e-5)
        assert float(first.observer.max_val) == pytest.approx(0.5 * hi + 0.5 * float(t.max()), rel=1e-5)
    moved = [(float(a.observer.min_val), float(a.observer.max_val)) for a in acts]
    assert moved != calibrated
    model.train()(big)  # hooks removed with the block
    assert [(float(a.observer.min_val), float(a.observer.max_val)) for a in acts] == moved


# ---- GELU -> ReLU stages ---------------------------------------------------------------------------

def test_relu_plan_orders_and_groups() -> None:
    paths = ["a.act", "b.act", "c.act", "d.act", "e.act"]
    assert relu_plan(paths) == [[p] for p in paths]
    assert relu_plan(paths, blocks_per_stage=2) == [["a.act", "b.act"], ["c.act", "d.act"], ["e.act"]]
    assert relu_plan(paths, blocks_per_stage=2, order="backward") == [["e.act", "d.act"], ["c.act", "b.act"],
                                                                       ["a.act"]]
    assert relu_plan(paths, blocks_per_stage=9) == [paths]
    with pytest.raises(ValueError, match="order"):
        relu_plan(paths, order="random")


def test_each_relu_stage_is_taught_by_the_previous_stage(monkeypatch: pytest.MonkeyPatch, trained_vit: Path) -> None:
    base = load_model("test_fmnist_vit", checkpoint=str(trained_vit))
    original = _params(base)
    paths = gelu_paths(base)
    assert paths == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    x = _sample(base, 64)
    teachers: list[tuple[int, dict[str, torch.Tensor]]] = []
    real_call = KDLoss.__call__

    def spy(self: KDLoss, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        relus = sum(isinstance(m, nn.ReLU) for m in self.teacher.modules())
        teachers.append((relus, _params(self.teacher)))
        return real_call(self, logits, batch)

    monkeypatch.setattr(KDLoss, "__call__", spy)
    finals: dict[int, dict[str, torch.Tensor]] = {}
    model, records = relu_distill(base, paths, [(x, torch.zeros(64, dtype=torch.long))], order="backward",
                                  steps=3, lr=1e-2, device="cpu", progress=False,
                                  on_stage=lambda k, rec, m: finals.__setitem__(k, _params(m)))
    assert [r["relu"] for r in records] == [["blocks.1.mlp.act"], ["blocks.0.mlp.act"]]
    assert [r["teacher"] for r in records] == ["float", "relu-1"]
    assert len(teachers) == 6  # 3 steps per stage
    # stage 1: the original GELU model; stage 2: the model stage 1 ended with (one ReLU)
    assert all(r == 0 and _same(p, original) for r, p in teachers[:3])
    assert all(r == 1 for r, _ in teachers[3:])
    assert not _same(finals[1], original)
    assert all(_same(p, finals[1]) for _, p in teachers[3:])
    assert _same(finals[2], _params(model))
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.GELU) for m in model.modules())
    assert _same(_params(base), original)  # the input model is left unchanged


# ---- the stage: resume, outputs, reload ----------------------------------------------------------

def _relu_policy() -> Policy:
    m = load_model("test_fmnist_vit")
    ps.prepare(m, wiring="paper")
    return Policy.uniform(ps.find_sites(m), {"softmax": "ivit", "gelu": "relu", "layernorm": "ibert"})


FT = dict(model="test_fmnist_vit", data="fmnist-sample", wiring="paper", steps=4, relu_steps=3, lr=2e-3, **SMALL)


def test_an_interrupted_finetune_resumes_to_the_same_weights(tmp_path: Path, trained_vit: Path) -> None:
    from safetensors.torch import load_file

    policy = _relu_policy()
    common = dict(FT, checkpoint=str(trained_vit))
    straight = finetune(policy=policy, out=tmp_path / "straight", **common)
    assert straight.relu_weights is not None and len(straight.record["relu_stages"]) == 2
    # stopped inside the second ReLU stage, then inside QAT, then finished: the same weights
    with pytest.raises(FinetuneStopped, match="ReLU stage 2"):
        finetune(policy=policy, out=tmp_path / "split", stop_after=4, **common)
    with pytest.raises(FinetuneStopped, match="QAT"):
        finetune(policy=policy, out=tmp_path / "split", stop_after=8, **common)
    assert (tmp_path / "split" / "finetune" / "qat" / "last.pt").is_file()
    resumed = finetune(policy=policy, out=tmp_path / "split", **common)
    for name in ("finetuned.safetensors", "relu_float.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "split" / name))
        assert _same(a, b), name
    assert resumed.after == straight.after and resumed.relu_float_top1 == straight.relu_float_top1
    assert resumed.record["qat"]["steps"] == 4
    # other settings are refused on resume, and --restart starts over
    with pytest.raises(FinetuneError, match="other settings.*lr"):
        finetune(policy=policy, out=tmp_path / "split", **{**common, "lr": 1e-3})
    finetune(policy=policy, out=tmp_path / "split", restart=True, **{**common, "lr": 1e-3, "relu_steps": 1})


def test_finetuned_weights_reload_and_reproduce_their_metrics(tmp_path: Path, trained_vit: Path) -> None:
    from policysearch.report.text import check_policy_file

    res = finetune(policy=_relu_policy(), out=tmp_path, checkpoint=str(trained_vit), **FT)
    doc = json.loads((tmp_path / "policy.json").read_text())
    assert doc["model"]["finetuned"] == "finetuned.safetensors" and doc["model"]["relu_float"] == "relu_float.safetensors"
    ft = doc["metrics"]["finetune"]
    assert ft["before"]["top1"] == res.before["top1"] and ft["after"]["top1"] == res.after["top1"]
    assert doc["provenance"]["finetune"]["settings"]["steps"] == 4
    assert doc["provenance"]["finetune"]["settings"]["ste"] == "reference"
    rec = json.loads((tmp_path / "finetune.json").read_text())
    assert rec["machine"]["cpu"] and rec["machine"]["torch"] == torch.__version__ and rec["machine"]["threads"] >= 1
    # `apply` / `eval` load the fine-tuned weights and reproduce the figures measured after training
    report, ok = check_policy_file(str(tmp_path / "policy.json"), model=None, checkpoint=None, data="fmnist-sample",
                                   device="cpu")
    assert ok, report
    assert "fine-tuned" in report and "recorded" in report
    # the float ReLU model reloads as a plain checkpoint and gives its recorded top-1
    from policysearch.finetune import swap_to_relu

    relu = load_model("test_fmnist_vit", checkpoint=str(tmp_path / "relu_float.safetensors"))
    swap_to_relu(relu, gelu_paths(relu))
    data = load_data("fmnist-sample", model=relu, calib_size=32, eval_size=64)
    ex, ey = data.eval_tensors()
    with torch.no_grad():
        top1 = float((relu.eval()(ex).argmax(-1) == ey).double().mean())
    assert top1 == res.relu_float_top1


def test_finetune_of_a_run_records_the_stage_and_the_cli_chains_it(tmp_path: Path) -> None:
    from policysearch.cli import main
    from policysearch.report.text import check_policy_file
    from policysearch.run import RunRecord

    argv = ["run", "--strategy", "uniform", "--model", "test_fmnist_swin", "--eval-size", "48", "--calib-size", "32",
            "--results-dir", str(tmp_path), "--run-name", "r", "--storage", f"sqlite:///{tmp_path}/s.db",
            "--wiring", "paper", "--device", "cpu", "--no-progress",
            "--finetune", "--steps", "2", "--train-batch-size", "32"]
    assert main(argv) == 0
    record = RunRecord.load(tmp_path / "r")
    stage = record.data["stages"]["finetune"]
    assert stage["weights"] == "finetuned.safetensors" and (tmp_path / "r" / "finetuned.safetensors").is_file()
    assert stage["checkpoint"] == "finetuned.safetensors"  # no ReLU site: the latency stage measures these
    assert stage["settings"]["steps"] == 2 and stage["eval_images"] == 48
    assert set(stage["before"]) >= {"top1", "agreement", "kl"} and set(stage["after"]) >= {"top1", "agreement", "kl"}
    doc = json.loads((tmp_path / "r" / "policy.json").read_text())
    assert doc["metrics"]["finetune"]["after"]["top1"] == stage["after"]["top1"]
    assert doc["model"]["finetuned"] == "finetuned.safetensors"
    _, ok = check_policy_file(str(tmp_path / "r" / "policy.json"), model=None, checkpoint=None,
                              data="fmnist-sample", device="cpu")
    assert ok
    # the stage on its own: the same run again resumes (finished checkpoint) and gives the same weights
    before = (tmp_path / "r" / "finetuned.safetensors").read_bytes()
    assert main(["finetune", "r", "--results-dir", str(tmp_path), "--steps", "2", "--batch-size", "32",
                 "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "r" / "finetuned.safetensors").read_bytes() == before
    # other settings on the same run are refused, as one CLI error line
    assert main(["finetune", "r", "--results-dir", str(tmp_path), "--steps", "3", "--device", "cpu"]) == 2
    assert main(["finetune", "r", "--results-dir", str(tmp_path), "--steps", "2", "--device", "cpu",
                 "--lr", "-1"]) == 2


def test_training_never_sees_an_evaluation_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    from PIL import Image

    import policysearch.finetune.batches as batches

    seen: list[torch.Tensor] = []
    real_iter = batches.TrainBatches.__iter__

    def spy(self: Any) -> Any:
        for x, y in real_iter(self):
            seen.append(x)
            yield x, y

    monkeypatch.setattr(batches.TrainBatches, "__iter__", spy)
    finetune(policy=_relu_policy(), out=tmp_path / "ft", **{**FT, "relu_steps": 2, "steps": 2})
    data = load_data("fmnist-sample", model=load_model("test_fmnist_vit"))
    ex, _ = data.eval_tensors()
    evaluation = {bytes(t.numpy().tobytes()) for t in ex}
    trained = [bytes(t.numpy().tobytes()) for batch in seen for t in batch]
    assert len(trained) == 6 * 32 and not evaluation.intersection(trained)
    # data without a training split: one clear error, before any training
    model = load_model("test_fmnist_vit")
    from policysearch.models.loading import model_class_names

    root = tmp_path / "folder"
    for name in model_class_names(model):
        (root / name.replace("/", "-")).mkdir(parents=True)
        for j in range(2):
            Image.fromarray(np.full((28, 28), 40 * j, dtype=np.uint8), mode="L").save(root / name.replace("/", "-")
                                                                                      / f"{j}.png")
    with pytest.raises(FinetuneError, match="no training split"):
        finetune(policy=_relu_policy(), out=tmp_path / "none", **{**FT, "data": f"imagefolder:{root}", "calib_size": 4,
                                                                   "eval_size": 8})
    assert not (tmp_path / "none" / "finetune" / "qat").exists()


def test_settings_are_checked_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match="--epochs or --steps"):
        finetune(policy=_relu_policy(), out=tmp_path, epochs=1, steps=2)
    with pytest.raises(FinetuneError, match="relu-order"):
        finetune(policy=_relu_policy(), out=tmp_path, relu_order="middle")
    with pytest.raises(FinetuneError, match="unknown fine-tuning option"):
        finetune(policy=_relu_policy(), out=tmp_path, temperature=2.0)
    with pytest.raises(FinetuneError, match="a run .* or a policy file"):
        finetune("r", policy=_relu_policy(), out=tmp_path)
    assert not (tmp_path / "finetune").exists()


def _table5_job(root: Path, labels: Any, *, policy: str, model: str = "fmnist_swin", epochs: int = 1,
                before_wrong: int = 0, after_wrong: int = 0) -> Path:
    """A finished Table 5 job folder whose policy misses the first images before / after QAT."""
    import numpy as np

    Job = tables.Job

    rec = Job(part="table5", model=model, bits=8, policy=policy, epochs=epochs).folder(root)
    (rec / "finetune").mkdir(parents=True, exist_ok=True)
    (rec / "finetune.json").write_text(json.dumps({"device": "cpu", "seconds": 1.0}))
    before, after = labels.copy(), labels.copy()
    before[:before_wrong] = 9
    after[:after_wrong] = 9
    np.savez_compressed(rec / "finetune" / "predictions.npz", labels=labels, float=labels, before=before, after=after)
    return rec


def test_paired_interval_and_the_table_lists_missing_rows_with_their_commands(tmp_path: Path) -> None:
    import numpy as np

    jobs, paired_interval, render = tables.jobs, tables.paired_interval, tables.render

    labels = np.array([0, 1, 2, 3] * 25)
    a = labels.copy()
    b = labels.copy()
    b[:10] = 9  # b misses 10 images that a gets right
    d, lo, hi = paired_interval(a, b, labels)
    assert d == pytest.approx(10.0) and lo < 10.0 < hi
    sd = np.std(np.r_[np.ones(10), np.zeros(90)], ddof=1)
    assert hi - d == pytest.approx(100 * 1.96 * sd / 10)
    assert paired_interval(a, a, labels) == (0.0, 0.0, 0.0)
    _verdict = tables._verdict

    assert _verdict(paired_interval(a, b, labels)) == "better" and _verdict(paired_interval(b, a, labels)) == "worse"
    assert _verdict(paired_interval(a, a, labels)) == "no measurable difference"
    out = render(tmp_path, tmp_path / "finetune.md", models=["fmnist_swin"], bits=[8], epochs=[1])
    text = out.read_text()
    for job in jobs("geluless", models=["fmnist_swin"]) + jobs("table5", models=["fmnist_swin"], bits=[8]):
        assert job.command(tmp_path) in text
    assert "not run" in text


def test_render_keeps_the_figures_of_tables_whose_jobs_are_not_in_this_checkout(tmp_path: Path) -> None:

    import numpy as np

    render = tables.render

    labels = np.array([0, 1, 2, 3] * 25)
    _table5_job(tmp_path, labels, policy="ibert", after_wrong=3)
    out = tmp_path / "finetune.md"
    kept = tmp_path / "kept.json"
    render(tmp_path, out, models=["fmnist_swin"], bits=[8], epochs=[1], record=True)
    first = out.read_text()
    assert "| ibert | 100.00 | 97.00 |" in first
    assert tables.read_kept(kept)[("table5", "fmnist_swin-w8a8-ibert-e1")].numerics == NUMERICS_VERSION
    # a checkout without the job folders: the recorded job keeps its figures, the rest re-renders
    render(tmp_path / "elsewhere", out, models=["fmnist_swin"], bits=[8], epochs=[1], kept=kept)
    again = out.read_text()
    assert "| ibert* | 100.00 | 97.00 |" in again
    assert again.count("<!-- section: table5 fmnist_swin w8 -->") == 1
    assert "run geluless --models fmnist_swin --epochs 1" in again  # never had figures: rendered afresh
    # the figures come from the JSON records, never from the Markdown the last render wrote
    render(tmp_path / "elsewhere", out, models=["fmnist_swin"], bits=[8], epochs=[1])
    assert "100.00 | 97.00" not in out.read_text() and "| ibert | not run | not run |" in out.read_text()
    # a job that is there replaces what the records say
    _table5_job(tmp_path, labels, policy="ibert")
    render(tmp_path, out, models=["fmnist_swin"], bits=[8], epochs=[1])
    assert "| ibert | 100.00 | 100.00 |" in out.read_text()


def test_render_keeps_rows_whose_jobs_are_gone_and_drops_their_intervals_when_the_reference_changes(
        tmp_path: Path) -> None:
    import shutil

    import numpy as np

    Job, render = tables.Job, tables.render

    labels = np.array([0, 1, 2, 3] * 25)

    def put(policy: str, wrong: int) -> None:
        _table5_job(tmp_path, labels, policy=policy, before_wrong=wrong, after_wrong=wrong)

    for policy, wrong in [("ibert", 2), ("fqvit", 4), ("sqnr_diff", 12), ("tpe", 3)]:
        put(policy, wrong)
    out = tmp_path / "finetune.md"
    args = dict(models=["fmnist_swin"], bits=[8], epochs=[1])
    render(tmp_path, out, **args, record=True)
    row = next(line for line in out.read_text().splitlines() if line.startswith("| sqnr_diff |"))
    interval = row.split("|")[2].strip()
    assert interval.startswith("88.00 (-10.00 [")
    # sqnr_diff's and fqvit's folders are gone; ibert (the reference) is unchanged: rows and intervals kept
    for policy in ("sqnr_diff", "fqvit"):
        shutil.rmtree(Job(part="table5", model="fmnist_swin", bits=8, policy=policy, epochs=1).folder(tmp_path))
    render(tmp_path, out, **args)
    text = out.read_text()
    assert f"| sqnr_diff* | {interval} | {interval} |" in text and "| fqvit* | 96.00 | 96.00 |" in text
    assert "sqnr_diff worse" in text and "tpe no measurable difference" in text
    assert "--only sqnr_diff" in text and "intervals dropped" not in text
    render(tmp_path, out, **args)
    assert out.read_text() == text  # kept rows stay kept
    # the reference changes: the kept row keeps its top-1 only
    put("ibert", 0)
    render(tmp_path, out, **args)
    text = out.read_text()
    assert "| sqnr_diff* | 88.00 | 88.00 |" in text and "intervals dropped" in text
    render(tmp_path, out, **args)
    assert out.read_text() == text  # still said on the next render
    assert "sqnr_diff worse" not in text and "| tpe | 97.00 (-3.00 [" in text
    assert "kept fqvit scored higher" not in text
    put("ibert", 6)  # now below the kept fqvit (96.00)
    render(tmp_path, out, **args)
    assert "kept fqvit scored higher" in out.read_text()


def test_students_train_without_stochastic_depth() -> None:
    from policysearch.finetune import without_dropout

    model = load_model("test_fmnist_swin")  # timm's Swin adds drop path 0.1 by default
    x = _sample(model, 8)
    with torch.no_grad():
        reference = model.eval()(x)
        noisy = model.train()(x)
    assert not torch.allclose(noisy, reference)
    assert without_dropout(model) > 0 and without_dropout(model) == 0
    with torch.no_grad():
        assert torch.allclose(model.train()(x), reference, atol=1e-6)
    policy = _uniform("test_fmnist_swin", "ivit")
    student, _ = build_student("test_fmnist_swin", checkpoint=None, model_args={}, wiring="paper", policy=policy,
                               calib_images=x, device=torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(student.train()(x), student.eval()(x))


def test_render_shows_a_longer_training_column_only_where_its_jobs_were_run(tmp_path: Path) -> None:

    import numpy as np

    Job, render = tables.Job, tables.render

    labels = np.array([0, 1, 2, 3] * 25)

    def put(model: str, policy: str, epochs: int, wrong: int) -> None:
        _table5_job(tmp_path, labels, model=model, policy=policy, epochs=epochs, after_wrong=wrong)

    for model in ("fmnist_vit", "fmnist_swin"):
        put(model, "ibert", 1, 4)
        put(model, "sqnr_diff", 1, 6)
    put("fmnist_vit", "ibert", 2, 2)
    put("fmnist_vit", "sqnr_diff", 2, 1)
    unfinished = Job(part="table5", model="fmnist_swin", bits=8, policy="ibert", epochs=5).folder(tmp_path)
    (unfinished / "finetune").mkdir(parents=True)  # interrupted: no record, so no column
    out = tmp_path / "finetune.md"
    args = dict(models=["fmnist_vit", "fmnist_swin"], bits=[8])
    render(tmp_path, out, **args)
    text = out.read_text()
    vit, swin = text.split("### fmnist_vit W8A8")[1].split("### fmnist_swin W8A8")
    assert "| policy | before QAT | after 1 epoch | after 2 epochs |" in vit
    assert "| ibert | 100.00 | 96.00 | 98.00 |" in vit and "| sqnr_diff | 100.00 (+0.00 [+0.00, +0.00]) | 94.00 (" in vit
    assert "| 99.00 (+1.00 [" in vit  # after 2 epochs, against ibert after 2 epochs
    assert "--models fmnist_vit --bits 8 --epochs 2`" in vit and "--epochs 2 --only fqvit" in vit
    assert "after 2 epochs (fqvit, ivit not run)" in vit
    assert "after 2 epochs" not in swin.split("## Straight")[0] and "epochs 5" not in text
    assert "| policy | before QAT | after 1 epoch |" in swin
    render(tmp_path, out, **args)
    assert out.read_text() == text
    # an explicit --epochs shows exactly those columns
    render(tmp_path, out, **args, epochs=[1])
    assert "after 2 epochs" not in out.read_text()

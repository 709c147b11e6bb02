"""policysearch.train: schedule, loss hook, checkpoints, and bit-exact resume (CPU)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from policysearch.train import CHECKPOINT_FILE, Schedule, TrainError, param_groups, train
from scripts import load_script

zoo_train = load_script("train_zoo")

# ---------------------------------------------------------------------------------------- helpers


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # dropout draws from torch's global RNG every step: resuming must restore it
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.3), nn.LayerNorm(16), nn.Linear(16, 3))


def _loader(seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))


KW: dict[str, Any] = dict(epochs=3, lr=1e-2, min_lr=1e-4, warmup_steps=3, grad_clip=1.0, label_smoothing=0.1,
                          device="cpu", progress=False, seed=7)


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.fixture(scope="module")
def straight() -> Any:
    """The uninterrupted reference run (3 epochs of 5 steps)."""
    return train(_model(), _loader(), **KW)


# ------------------------------------------------------------------------------------------ tests


def test_schedule_warmup_then_decay() -> None:
    s = Schedule(lr=1.0, total=20, warmup=4, min_lr=0.1)
    lrs = [s.lr_at(i) for i in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(0.1, abs=0.02)
    assert Schedule(lr=1.0, total=10, kind="linear").lr_at(5) == pytest.approx(0.5)
    assert Schedule(lr=0.3, total=10, warmup=2, kind="constant").lr_at(9) == 0.3
    with pytest.raises(TrainError, match="unknown schedule 'step'.*cosine"):
        Schedule(lr=1.0, total=10, kind="step")


def test_param_groups_skip_decay_on_1d() -> None:
    decay, no_decay = param_groups(_model(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) == 2 and len(no_decay["params"]) == 4


def test_training_learns_and_records(straight: Any) -> None:
    assert straight.finished and straight.steps == straight.total_steps == 15 and straight.steps_per_epoch == 5
    assert [r["epoch"] for r in straight.history] == [1, 2, 3]
    assert set(straight.history[0]) == {"epoch", "loss", "train_top1", "lr_end", "seconds"}
    assert straight.history[-1]["loss"] < straight.history[0]["loss"]
    assert straight.history[-1]["lr_end"] == Schedule(lr=1e-2, min_lr=1e-4, total=15, warmup=3).lr_at(14) < 1e-3
    assert not straight.model.training
    # same seed, same everything: the same weights
    assert _same(train(_model(), _loader(), **KW).model, straight.model)


@pytest.mark.parametrize("stop", [5, 7], ids=["epoch_boundary", "mid_epoch"])
def test_resume_gives_the_same_weights(stop: int, straight: Any, tmp_path: Path) -> None:
    first = train(_model(), _loader(), **KW, checkpoint_dir=tmp_path, stop_at_step=stop)
    assert not first.finished and first.steps == stop and (tmp_path / CHECKPOINT_FILE).is_file()
    assert not list(tmp_path.glob("*.tmp"))
    assert first.history[-1].get("partial", False) == (stop % 5 != 0)
    # a new process would build a fresh model and loader: other init, other loader seed
    resumed = train(_model(seed=99), _loader(seed=5), **KW, checkpoint_dir=tmp_path)
    assert resumed.finished and resumed.resumed_from == stop
    assert _same(resumed.model, straight.model)
    assert _strip(resumed.history) == _strip(straight.history)
    # a finished checkpoint: nothing left to train, the final weights come back
    again = train(_model(seed=3), _loader(), **KW, checkpoint_dir=tmp_path)
    assert again.finished and again.resumed_from == 15 and _same(again.model, straight.model)


def test_ctrl_c_saves_a_checkpoint_and_resumes(straight: Any, tmp_path: Path) -> None:
    calls = {"n": 0}

    def loss_with_interrupt(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 8:
            os.kill(os.getpid(), signal.SIGINT)
        return nn.functional.cross_entropy(logits, batch[1], label_smoothing=0.1)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    with pytest.raises(KeyboardInterrupt):
        train(_model(), _loader(), **KW, checkpoint_dir=tmp_path, loss_fn=loss_with_interrupt)
    assert signal.getsignal(signal.SIGINT) is before  # the handler the caller had is back
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["step"] == 8 and saved["in_epoch"] == 3 and not saved["finished"]
    # the custom loss is "custom" in the run's config; resume with an equal one
    resumed = train(_model(seed=1), _loader(), **KW, checkpoint_dir=tmp_path,
                    loss_fn=lambda lg, b: nn.functional.cross_entropy(lg, b[1], label_smoothing=0.1))
    assert resumed.resumed_from == 8 and _same(resumed.model, straight.model)


def test_resume_refuses_another_run(tmp_path: Path) -> None:
    train(_model(), _loader(), **KW, checkpoint_dir=tmp_path, stop_at_step=5)
    with pytest.raises(TrainError, match=r"written by another run: .*lr.*resume=False"):
        train(_model(), _loader(), **{**KW, "lr": 0.5}, checkpoint_dir=tmp_path)
    # resume=False starts over (and overwrites the checkpoint)
    fresh = train(_model(), _loader(), **{**KW, "lr": 0.5}, checkpoint_dir=tmp_path, resume=False, stop_at_step=2)
    assert fresh.resumed_from is None and torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["step"] == 2
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"garbage")
    with pytest.raises(TrainError, match="unreadable"):
        train(_model(), _loader(), **KW, checkpoint_dir=tmp_path)


def test_distillation_loss_hook() -> None:
    """A KD-style loss_fn sees the student's logits and the batch; the student moves to the teacher."""
    torch.manual_seed(0)
    teacher = nn.Linear(6, 3).eval()
    student = nn.Linear(6, 3)
    x = torch.randn(32, 6)

    def kd(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(batch[0]).softmax(-1)
        return nn.functional.kl_div(logits.log_softmax(-1), target, reduction="batchmean")

    def gap() -> float:
        with torch.no_grad():
            return float(kd(student(x), (x,)))

    before = gap()
    loader = DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long)), batch_size=8)
    result = train(student, loader, steps=60, lr=0.05, weight_decay=0.0, loss_fn=kd, device="cpu", progress=False)
    assert result.steps == 60 and len(result.history) == 15
    assert gap() < 0.2 * before


def test_steps_with_an_unsized_loader_and_errors() -> None:
    data = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]

    class Unsized:
        def __iter__(self) -> Any:
            return iter(data)

    result = train(_model(), Unsized(), steps=7, device="cpu", progress=False)
    assert result.steps == 7 and [r["epoch"] for r in result.history] == [1, 2, 3]
    with pytest.raises(TrainError, match="needs steps=N"):
        train(_model(), Unsized(), epochs=1, device="cpu", progress=False)
    with pytest.raises(TrainError, match="exactly one of epochs or steps"):
        train(_model(), data, epochs=1, steps=3, device="cpu", progress=False)
    with pytest.raises(TrainError, match="no batches"):
        train(_model(), [], epochs=1, device="cpu", progress=False)


# --------------------------------------------------------------------------------- zoo trainer


def test_zoo_train_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        zoo_train.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint-dir" in out and "fmnist_vit" in out


@pytest.fixture
def restore_torch_state() -> Any:
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


@pytest.mark.usefixtures("restore_torch_state")
def test_zoo_training_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    fake = (torch.randint(0, 256, (40, 28, 28), generator=g, dtype=torch.uint8).numpy(),
            (torch.arange(40) % 10).numpy())
    monkeypatch.setattr(zoo_train, "read_fmnist", lambda root=None, split="train": fake)
    args = ["test_fmnist_vit", "--device", "cpu", "--epochs", "2", "--batch-size", "16", "--set", "recipe.drop_path_rate=0.1"]
    assert zoo_train.main([*args, "--out", str(tmp_path / "straight")]) == 0
    ckpt = tmp_path / "ckpt"
    assert zoo_train.main([*args, "--out", str(tmp_path / "cut"), "--checkpoint-dir", str(ckpt), "--max-steps", "4"]) == 0
    assert zoo_train.main([*args, "--out", str(tmp_path / "resumed"), "--checkpoint-dir", str(ckpt)]) == 0
    weights = "test_fmnist_vit.safetensors"
    assert (tmp_path / "resumed" / weights).read_bytes() == (tmp_path / "straight" / weights).read_bytes()
    assert (tmp_path / "cut" / weights).read_bytes() != (tmp_path / "straight" / weights).read_bytes()
    card = json.loads((tmp_path / "resumed" / "test_fmnist_vit.json").read_text())
    assert card["training"]["steps"] == 6 and [r["epoch"] for r in card["training"]["history"]] == [1, 2]

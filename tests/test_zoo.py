"""The embedded model zoo: registry <-> card <-> weights agree, and the models reproduce their card."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from policysearch.data import load_data
from policysearch.models import zoo
from policysearch.models.loading import check_compatible, load_model, model_data_config
from policysearch.registry import UnknownNameError
from scripts import load_script

zoo_train = load_script("train_zoo")

NAMES = ["fmnist_swin", "fmnist_vit"]


def test_registry_names() -> None:
    assert zoo.list_zoo() == NAMES + ["test_fmnist_swin", "test_fmnist_vit"]
    assert all(zoo.get(n).shipped_weights for n in NAMES)
    with pytest.raises(UnknownNameError, match="fmnist_swin, fmnist_vit"):
        zoo.get("fmnist_deit")


@pytest.mark.parametrize("name", NAMES)
def test_card_matches_registry_and_weights(name: str) -> None:
    entry, card = zoo.get(name), zoo.read_card(name)
    path = zoo.weights_path(name)
    assert card["architecture"]["class"] == entry.model_class
    assert card["architecture"]["kwargs"] == json.loads(json.dumps(entry.kwargs))
    recipe = {k: v for k, v in card["recipe"].items() if k in {f.name for f in dataclasses.fields(zoo.Recipe)}}
    assert recipe == dataclasses.asdict(entry.recipe)
    assert card["weights"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.stat().st_size <= 5 * 2**20
    assert card["metrics"]["float_top1_test"] >= 0.88
    assert card["cpu_estimate"]["total_minutes"] <= 60
    assert card["preprocessing"]["mean"] == list(entry.mean) and card["preprocessing"]["input_size"] == [1, 28, 28]


def test_swin_windows_divide_every_stage() -> None:
    model = zoo.get("fmnist_swin").build()
    assert len(model.layers) >= 2
    assert any(type(m).__name__ == "PatchMerging" for m in model.modules())
    for layer in model.layers:
        for block in layer.blocks:
            h, w = block.input_resolution
            wh, ww = block.window_size
            assert h % wh == 0 and w % ww == 0


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_reproduces_card_on_sample(name: str) -> None:
    model = load_model(name)
    assert model_data_config(model)["mean"] == zoo.FMNIST_MEAN
    data = load_data("fmnist-sample", model=model)
    check_compatible(model, data)
    x, y = data.eval_tensors()
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 500]).argmax(-1) for i in range(0, len(x), 500)])
    top1 = int((pred == y).sum()) / len(y)
    card = zoo.read_card(name)
    assert abs(top1 - card["metrics"]["float_top1_sample"]) <= 0.001
    cpu = [v for v in card["verified"] if v["device"].startswith("cpu")]
    assert cpu and abs(top1 - cpu[0]["float_top1_sample"]) < 1e-9


@pytest.fixture
def restore_torch_state() -> Iterator[None]:
    """train.main switches on deterministic algorithms and 2 threads; undo it for the other tests."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)


@pytest.mark.usefixtures("restore_torch_state")
def test_train_smoke_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    fake = (rng.integers(0, 256, (48, 28, 28), dtype=np.uint8), np.arange(48) % 10)
    monkeypatch.setattr(zoo_train, "read_fmnist", lambda root=None, split="train": fake)
    args = ["fmnist_vit", "--device", "cpu", "--epochs", "1", "--batch-size", "16", "--eval-every", "1",
            "--set", "arch.depth=1", "--set", "arch.embed_dim=24", "--set", "arch.num_heads=2"]
    for run in ("a", "b"):
        assert zoo_train.main([*args, "--out", str(tmp_path / run)]) == 0
    a, b = (tmp_path / r / "fmnist_vit.safetensors" for r in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    card = json.loads((tmp_path / "a" / "fmnist_vit.json").read_text())
    assert card["architecture"]["kwargs"]["depth"] == 1 and card["training"]["steps"] == 3
    assert card["weights"]["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert (tmp_path / "a" / "fmnist_vit.md").is_file()


def test_augmentation_and_schedule() -> None:
    recipe = zoo.get("fmnist_vit").recipe
    x = torch.arange(2 * 28 * 28, dtype=torch.uint8).reshape(2, 28, 28)
    batches = zoo_train.Batches(zoo_train.Split(images=x, labels=torch.zeros(2, dtype=torch.long)), recipe, 0)
    centred = batches._augment(x, torch.full((2, 2), recipe.crop_padding), torch.tensor([False, True]))
    assert torch.equal(centred[0], x[0]) and torch.equal(centred[1], x[1].flip(-1))
    lrs = [zoo_train.lr_at(s, 100, 10, recipe) for s in range(100)]
    assert lrs[9] == pytest.approx(recipe.lr) and lrs[-1] == pytest.approx(recipe.min_lr, rel=0.1)
    assert max(lrs) == pytest.approx(recipe.lr)

"""policysearch.models.loading: timm names + checkpoints in every common format, clear errors."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from policysearch.data import load_data
from policysearch.models.loading import (
    ModelError,
    check_compatible,
    load_model,
    model_data_config,
    read_state_dict,
)

TINY = "test_vit"  # a registered timm test model (~0.37M parameters)
KW: dict[str, Any] = {"num_classes": 10, "img_size": 32}


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model(TINY, **KW)


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32))


def _save_torch(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


FORMATS: dict[str, Callable[[dict[str, torch.Tensor], Path], Path]] = {
    "safetensors": lambda sd, d: (save_file(sd, str(d / "w.safetensors")), d / "w.safetensors")[1],
    "torch": lambda sd, d: _save_torch(sd, d / "w.pth"),
    "state_dict_wrapper": lambda sd, d: _save_torch({"state_dict": sd, "epoch": 3}, d / "w.pth.tar"),
    "model_wrapper": lambda sd, d: _save_torch({"model": sd, "optimizer": {"lr": 0.1}}, d / "ckpt.pt"),
    "module_prefix": lambda sd, d: _save_torch({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, d / "ddp.pth"),
    "safetensors_without_suffix": lambda sd, d: (save_file(sd, str(d / "w.bin")), d / "w.bin")[1],
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_checkpoint_formats(fmt: str, source: torch.nn.Module, tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = FORMATS[fmt](state, tmp_path)
    model = load_model(TINY, checkpoint=path, **KW)
    assert not model.training
    assert torch.equal(_outputs(model), _outputs(source))


def test_random_timm_model_and_data_config(source: torch.nn.Module) -> None:
    cfg = model_data_config(source)
    assert cfg["input_size"] == (3, 32, 32) and len(cfg["mean"]) == 3
    gray = load_model(TINY, num_classes=10, img_size=28, in_chans=1)
    cfg = model_data_config(gray)
    assert cfg["input_size"] == (1, 28, 28) and len(cfg["mean"]) == len(cfg["std"]) == 1


def test_check_compatible(source: torch.nn.Module) -> None:
    data = load_data("fmnist-sample", model=source, calib_size=8, eval_size=10)
    assert data.input_size == (3, 32, 32)
    check_compatible(source, data)
    with pytest.raises(ModelError, match="the model takes input \\(3, 32, 32\\).*gives \\(1, 28, 28\\)"):
        check_compatible(source, load_data("fmnist-sample", calib_size=8, eval_size=10))
    wide = load_model(TINY, num_classes=7, img_size=32)
    with pytest.raises(ModelError, match="7 classes but the data fmnist-sample has 10"):
        check_compatible(wide, data)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(TINY, checkpoint=tmp_path / "nope.safetensors", **KW)


def test_unknown_model_lists_zoo() -> None:
    with pytest.raises(ModelError, match="unknown model 'fmnist_vitt'.*fmnist_swin, fmnist_vit.*any timm name") as e:
        load_model("fmnist_vitt")
    assert "did you mean fmnist_vit" in str(e.value)


def test_mismatched_checkpoint(source: torch.nn.Module, tmp_path: Path) -> None:
    path = FORMATS["safetensors"]({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path)
    with pytest.raises(ModelError, match="head.weight.*checkpoint has 10 classes: pass num_classes=10"):
        load_model(TINY, checkpoint=path, num_classes=5, img_size=32)
    with pytest.raises(ModelError, match="pos_embed.*img_size"):
        load_model(TINY, checkpoint=path, num_classes=10, img_size=48)
    with pytest.raises(ModelError, match="missing keys.*another architecture"):
        load_model("test_vit2", checkpoint=path, **KW)


def test_bad_checkpoint_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00 definitely not a checkpoint")
    with pytest.raises(ModelError, match="neither a safetensors file nor a torch state dict"):
        read_state_dict(junk)
    empty = _save_torch({"epoch": 1, "config": {"lr": 0.1}}, tmp_path / "meta.pth")
    with pytest.raises(ModelError, match="holds no state dict"):
        read_state_dict(empty)
    pickled = _save_torch(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(ModelError, match="pickled Python objects.*state_dict"):
        read_state_dict(pickled)


def test_zoo_override_needs_checkpoint() -> None:
    with pytest.raises(ModelError, match="fmnist_vit ships weights for .*num_classes.*checkpoint"):
        load_model("fmnist_vit", num_classes=100)

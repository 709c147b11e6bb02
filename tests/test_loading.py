"""policysearch.models.loading: timm names + checkpoints in every common format, clear errors."""
from __future__ import annotations

import json
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
    infer_model_args,
    load_model,
    model_class_names,
    model_data_config,
    model_input_size,
    model_num_classes,
    read_checkpoint,
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


# ----------------------------------------------------------------- bring your own model (inference)


def _save(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


def _equal_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fine_tuned_vit_loads_with_name_and_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import timm

    torch.manual_seed(1)
    tuned = timm.create_model(TINY, pretrained=False, num_classes=10, img_size=48, in_chans=1)
    path = _save(tuned, tmp_path / "tuned.safetensors")
    assert infer_model_args(path) == {"num_classes": 10, "in_chans": 1, "img_size": 48}
    with caplog.at_level("INFO", logger="policysearch.models.loading"):
        model = load_model(TINY, checkpoint=path)
    assert "num_classes=10" in caplog.text and "img_size=48 (pos_embed: 10 tokens = 1 prefix + 3x3" in caplog.text
    assert model.get_classifier().out_features == 10 and model_num_classes(model) == 10
    assert _equal_weights(model, tuned) and model_data_config(model)["input_size"] == (1, 48, 48)
    assert model_class_names(model) is None
    # an explicit argument wins over the checkpoint (and a wrong one is a clear error)
    with pytest.raises(ModelError, match="checkpoint has 10 classes: pass num_classes=10.*built with in_chans=1"):
        load_model(TINY, checkpoint=path, num_classes=4)


def test_fine_tuned_distilled_deit_loads(tmp_path: Path) -> None:
    import timm

    name = "deit_tiny_distilled_patch16_224"
    tuned = timm.create_model(name, pretrained=False, num_classes=10, img_size=32)
    path = _save(tuned, tmp_path / "deit.safetensors")
    model = load_model(name, checkpoint=path)  # 2 prefix tokens: cls + dist
    assert model.head.out_features == model.head_dist.out_features == 10
    assert model_input_size(model) == (3, 32, 32) and _equal_weights(model, tuned)
    with pytest.raises(ModelError, match="distilled DeiT.*use a distilled model name"):
        load_model("deit_tiny_patch16_224", checkpoint=path)


def test_fine_tuned_swin_loads_with_metadata(tmp_path: Path) -> None:
    from policysearch.models.zoo import get

    tuned = get("test_fmnist_swin").build(num_classes=7, in_chans=3)
    names = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
    path = _save(tuned, tmp_path / "swin.safetensors", {"class_names": json.dumps(names), "img_size": "28"})
    model = load_model("test_fmnist_swin", checkpoint=path)
    assert model.head.fc.out_features == 7 and model.patch_embed.proj.in_channels == 3
    assert _equal_weights(model, tuned) and model_class_names(model) == names
    data_cfg = model_data_config(model)
    assert data_cfg["input_size"] == (3, 28, 28)
    # a torch file with the class names beside the state dict
    torch.save({"state_dict": tuned.state_dict(), "class_names": names, "epoch": 3}, tmp_path / "swin.pth")
    assert model_class_names(load_model("test_fmnist_swin", checkpoint=tmp_path / "swin.pth")) == names
    torch.save({"model": tuned.state_dict(), "classes": {n: i for i, n in enumerate(names)}}, tmp_path / "c2i.pth")
    assert read_checkpoint(tmp_path / "c2i.pth").class_names == names


def test_zoo_models_know_their_class_names() -> None:
    from policysearch.models.zoo import FMNIST_CLASSES

    assert model_class_names(load_model("fmnist_vit")) == list(FMNIST_CLASSES)
    assert model_class_names(load_model(TINY, **KW)) is None


def test_bad_metadata_is_one_clear_error(source: torch.nn.Module, tmp_path: Path) -> None:
    path = _save(source, tmp_path / "a.safetensors", {"num_classes": "12"})
    with pytest.raises(ModelError, match="metadata says num_classes=12 but its tensors say 10.*--num-classes"):
        load_model(TINY, checkpoint=path)
    path = _save(source, tmp_path / "b.safetensors", {"class_names": json.dumps(["a", "b"])})
    with pytest.raises(ModelError, match="lists 2 class names but the model has 10 outputs"):
        load_model(TINY, checkpoint=path)
    path = _save(source, tmp_path / "c.safetensors", {"img_size": "big"})
    with pytest.raises(ModelError, match="metadata img_size='big' is not a positive integer or \\[height, width\\]"):
        load_model(TINY, checkpoint=path)


def test_pickled_checkpoint_refusal_is_one_sentence(source: torch.nn.Module, tmp_path: Path) -> None:
    import argparse

    path = _save_torch({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "t.pth")
    with pytest.raises(ModelError) as e:
        load_model(TINY, checkpoint=path)
    msg = str(e.value)
    assert "refused by torch.load(weights_only=True)" in msg and "argparse.Namespace" in msg
    assert "safetensors" in msg and "plain state dict" in msg
    assert msg.endswith(".") and msg.count(". ") == 0 and "\n" not in msg


def test_missing_checkpoint_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist.*--checkpoint"):
        load_model("fmnist_vit", checkpoint=tmp_path / "nope.pth")


def test_head_and_input_mismatch_hints(source: torch.nn.Module, tmp_path: Path) -> None:
    headless = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    torch.save(headless, tmp_path / "features.pth")
    with pytest.raises(ModelError, match="no classifier head: pass num_classes=0 \\(--num-classes 0\\)"):
        load_model(TINY, checkpoint=tmp_path / "features.pth", num_classes=10, img_size=32)
    with pytest.raises(ModelError, match="takes 3 input channels: pass in_chans=3 \\(--in-chans 3\\)"):
        load_model(TINY, checkpoint=FORMATS["torch"](source.state_dict(), tmp_path), in_chans=1)

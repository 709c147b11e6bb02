"""policysearch.data: the shipped sample, Fashion-MNIST idx files, image folders, clear errors."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from policysearch.data import (
    SOURCES,
    ArrayDataset,
    DataError,
    DataSpec,
    balanced_order,
    load_data,
    make_loader,
    normalize_class_name,
    read_idx,
)
from policysearch.models.zoo import FMNIST_MEAN, FMNIST_STD, sample_path

# --------------------------------------------------------------------------------------- helpers


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(gzip.compress(_idx_bytes(array)))


@pytest.fixture
def fmnist_root(tmp_path: Path) -> Path:
    """A small Fashion-MNIST lookalike: 40 training and 30 test images, labels 0..9."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("train", 40), ("t10k", 30)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def _png_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (40, 36)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


# ----------------------------------------------------------------------------------------- specs


def test_spec_parsing() -> None:
    assert DataSpec.parse("fmnist-sample") == DataSpec(kind="fmnist-sample")
    assert DataSpec.parse("fmnist") == DataSpec(kind="fmnist")
    assert DataSpec.parse("fmnist:/x/y").path == Path("/x/y")
    assert DataSpec.parse("imagefolder:/data/val") == DataSpec(kind="imagefolder", path=Path("/data/val"))
    with pytest.raises(DataError, match="unknown data spec 'mnist'.*fmnist-sample"):
        DataSpec.parse("mnist")
    with pytest.raises(DataError, match="imagefolder:PATH"):
        DataSpec.parse("imagefolder")


# ---------------------------------------------------------------------------------------- sample


def test_sample_default_is_balanced_and_normalized() -> None:
    assert sample_path().stat().st_size <= 4 * 2**20
    data = load_data()
    assert (len(data.calib), len(data.eval)) == (512, 2000)
    assert data.num_classes == 10 and data.input_size == (1, 28, 28) and len(data.class_names) == 10
    x, y = data.eval_tensors()
    assert x.shape == (2000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [200] * 10
    counts = torch.bincount(data.calib_tensors()[1])
    assert counts.max() - counts.min() <= 1
    # pixel / 255 normalized with the Fashion-MNIST statistics
    raw = data.eval.images[:5].float() / 255
    assert torch.allclose(x[:5, 0], (raw - FMNIST_MEAN[0]) / FMNIST_STD[0])
    assert torch.equal(data.eval[3][0], x[3])


def test_sample_subsets_and_model_cfg() -> None:
    data = load_data("fmnist-sample", calib_size=20, eval_size=50,
                     model_cfg={"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    assert (len(data.calib), len(data.eval)) == (20, 50)
    assert torch.bincount(data.eval_tensors()[1]).tolist() == [5] * 10
    x = data.calib_images()
    assert x.shape == (20, 3, 32, 32) and data.input_size == (3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 2])
    with pytest.raises(DataError, match="asked for 5000 evaluation images.*2000"):
        load_data(eval_size=5000)
    with pytest.raises(DataError, match="positive"):
        load_data(calib_size=0)


def test_make_loader_is_reproducible() -> None:
    data = load_data(calib_size=64, eval_size=100)
    a = [y for _, y in make_loader(data.eval, 32, shuffle=True, seed=3)]
    b = [y for _, y in make_loader(data.eval, 32, shuffle=True, seed=3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True)) and len(a) == 4
    x, _ = next(iter(make_loader(data.calib, 16)))
    assert x.shape == (16, 1, 28, 28)


def test_balanced_order_prefixes() -> None:
    labels = np.repeat(np.arange(4), [10, 7, 5, 9])
    order = balanced_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(len(labels)))
    assert np.bincount(labels[order[:12]]).tolist() == [3, 3, 3, 3]
    assert np.array_equal(order, balanced_order(labels, seed=0))


# ----------------------------------------------------------------------------------------- fmnist


def test_fmnist_from_folder(fmnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_data(f"fmnist:{fmnist_root}", calib_size=10)
    assert (len(data.calib), len(data.eval)) == (10, 30)
    assert torch.bincount(data.calib_tensors()[1]).tolist() == [1] * 10
    monkeypatch.setenv("POLICYSEARCH_FMNIST_DIR", str(fmnist_root))
    data = load_data("fmnist", eval_size=20)
    assert len(data.eval) == 20
    images = read_idx(fmnist_root / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8


def test_fmnist_errors(tmp_path: Path, fmnist_root: Path) -> None:
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_data(f"fmnist:{tmp_path / 'nope'}")
    (fmnist_root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is missing"):
        load_data(f"fmnist:{fmnist_root}")
    (fmnist_root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x1e" + b"\x01" * 5))
    with pytest.raises(DataError, match="truncated or malformed"):
        load_data(f"fmnist:{fmnist_root}")
    (fmnist_root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"PK\x03\x04 not idx"))
    with pytest.raises(DataError, match="bad header"):
        load_data(f"fmnist:{fmnist_root}")
    (fmnist_root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="damaged"):
        load_data(f"fmnist:{fmnist_root}")


# ------------------------------------------------------------------------------------ imagefolder


def test_imagefolder_uses_model_preprocessing(tmp_path: Path) -> None:
    root = _png_folder(tmp_path / "imgs", {"cat": 6, "dog": 5, "emu": 4})
    cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
           "interpolation": "bilinear", "crop_pct": 1.0}
    data = load_data(f"imagefolder:{root}", model_cfg=cfg, calib_size=3)
    assert data.class_names == ("cat", "dog", "emu") and data.num_classes == 3
    assert (len(data.calib), len(data.eval)) == (3, 12)
    x, y = data.eval_tensors()
    assert x.shape == (12, 3, 32, 32) and set(y.tolist()) == {0, 1, 2}
    assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6
    gray = load_data(f"imagefolder:{root}", model_cfg={**cfg, "input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,)})
    assert gray.calib_images().shape[1:] == (1, 28, 28)


def test_imagefolder_split_dirs(tmp_path: Path) -> None:
    _png_folder(tmp_path / "ds" / "train", {"a": 3, "b": 3})
    _png_folder(tmp_path / "ds" / "val", {"a": 2, "b": 2})
    data = load_data(f"imagefolder:{tmp_path / 'ds'}",
                     model_cfg={"input_size": (3, 24, 24), "crop_pct": 1.0})
    assert (len(data.calib), len(data.eval)) == (6, 4) and data.input_size == (3, 24, 24)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'missing'}")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="has no class subfolders"):
        load_data(f"imagefolder:{flat}")
    root = _png_folder(tmp_path / "ok", {"a": 2})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*hold no images"):
        load_data(f"imagefolder:{root}")
    (root / "empty" / "broken.png").write_bytes(b"this is no png")
    data = load_data(f"imagefolder:{root}", calib_size=1)
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        data.calib_tensors()
        data.eval_tensors()


# ------------------------------------------------------------------------------- class mapping

# Fashion-MNIST's classes spelled as folder names, in another order once sorted
RENAMED = {"t_shirt_top": 0, "TROUSER": 1, "pull-over": 2, "dress": 3, "Coat": 4, "sandal": 5, "SHIRT": 6,
           "sneaker": 7, "bag": 8, "ankle-boot": 9}


def _gray_folder(root: Path, names: list[str], per_class: int = 2) -> Path:
    from PIL import Image

    rng = np.random.default_rng(2)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def zoo_model() -> torch.nn.Module:
    from policysearch.models.loading import load_model

    return load_model("test_fmnist_vit")  # a zoo model: it knows Fashion-MNIST's class names


def test_normalize_class_name() -> None:
    assert normalize_class_name("T-shirt/top") == normalize_class_name("t_shirt_top") == "tshirttop"
    assert normalize_class_name("Ankle boot") == normalize_class_name("ankle-boot") == "ankleboot"


def test_imagefolder_maps_folders_to_the_models_classes(tmp_path: Path, zoo_model: torch.nn.Module) -> None:
    from policysearch.models.zoo import FMNIST_CLASSES

    root = _gray_folder(tmp_path / "ds", list(RENAMED))
    data = load_data(f"imagefolder:{root}", model=zoo_model, calib_size=5)
    assert data.class_names == FMNIST_CLASSES and data.num_classes == 10
    assert data.info["class_to_idx"] == RENAMED
    assert sorted(RENAMED) != sorted(RENAMED, key=RENAMED.get)  # the sorted folder order is not the model's
    for ds in (data.calib, data.eval):
        for path, label in ds.samples:
            assert label == RENAMED[path.parent.name]
    assert "matched to the model's class names" in data.class_mapping_note
    assert "not the sorted order" in data.class_mapping_note
    # a subset of the classes keeps the model's indices
    few = load_data(f"imagefolder:{_gray_folder(tmp_path / 'few', ['Bag', 'ankle boot'])}", model=zoo_model)
    assert few.num_classes == 10 and sorted({y for _, y in few.eval.samples}) == [8, 9]
    assert "8 of the model's 10 classes have no images" in few.class_mapping_note


def test_imagefolder_class_mismatch_errors(tmp_path: Path, zoo_model: torch.nn.Module) -> None:
    none = _gray_folder(tmp_path / "none", ["cat", "dog", "emu"])
    with pytest.raises(DataError, match=r"none of the class folders .*'cat', 'dog', 'emu'.*'T-shirt/top', 'Trouser'"):
        load_data(f"imagefolder:{none}", model=zoo_model)
    some = _gray_folder(tmp_path / "some", ["bag", "sneaker", "unicorn"])
    with pytest.raises(DataError, match=r"1 of the class folders .*'unicorn'.*match none.*'bag', 'sneaker' do"):
        load_data(f"imagefolder:{some}", model=zoo_model)
    twice = _gray_folder(tmp_path / "twice", ["Bag", "bag"])
    with pytest.raises(DataError, match="'Bag' and 'bag' both match the model's class 'Bag'"):
        load_data(f"imagefolder:{twice}", model=zoo_model)


def test_imagefolder_without_class_names_uses_sorted_order(tmp_path: Path) -> None:
    root = _gray_folder(tmp_path / "ds", ["b", "a", "C"])
    data = load_data(f"imagefolder:{root}", model_cfg={"input_size": (1, 28, 28)})
    assert data.class_names == ("C", "a", "b")  # Python's sort, as torchvision's ImageFolder
    assert "sorted class-folder names (0 'C', 1 'a', 2 'b')" in data.class_mapping_note
    assert "ImageFolder" in data.class_mapping_note
    # explicit class names work without a model
    named = load_data(f"imagefolder:{root}", model_cfg={"input_size": (1, 28, 28)}, class_names=["A", "B", "c"])
    assert named.info["class_to_idx"] == {"C": 2, "a": 0, "b": 1}


def test_fmnist_labels_follow_the_models_order(zoo_model: torch.nn.Module) -> None:
    from policysearch.models.zoo import FMNIST_CLASSES

    base = load_data(calib_size=20, eval_size=30)
    same = load_data(model=zoo_model, calib_size=20, eval_size=30)
    assert torch.equal(same.eval_tensors()[1], base.eval_tensors()[1])
    assert "matched to the model's class names" in same.class_mapping_note
    reverse = tuple(reversed(FMNIST_CLASSES))
    flipped = load_data(calib_size=20, eval_size=30, class_names=reverse)
    assert flipped.class_names == reverse
    assert torch.equal(flipped.eval_tensors()[1], 9 - base.eval_tensors()[1])
    other = load_data(calib_size=20, eval_size=30, class_names=[f"c{i}" for i in range(10)])
    assert torch.equal(other.eval_tensors()[1], base.eval_tensors()[1]) and "do not match" in other.class_mapping_note


# -------------------------------------------------------------------------- sources and train split


def test_sources_are_registered() -> None:
    assert SOURCES.names() == ["fmnist", "fmnist-sample", "imagefolder"]
    assert DataSpec.parse("sample") == DataSpec(kind="fmnist-sample")
    with pytest.raises(DataError, match="fmnist-sample takes no path; valid: fmnist-sample"):
        DataSpec.parse("fmnist-sample:/x")


def _image_bytes(ds: ArrayDataset) -> set[bytes]:
    return {bytes(img.numpy().tobytes()) for img in ds.images}


def test_sample_train_split_is_the_calibration_part() -> None:
    data = load_data(calib_size=16, eval_size=100)
    train = data.train_dataset()
    assert data.has_train and len(train) == 512 and train is data.train_dataset()
    assert torch.equal(train.images[:16], data.calib.images)
    assert not _image_bytes(train) & _image_bytes(load_data().eval)


def test_fmnist_train_split(fmnist_root: Path) -> None:
    data = load_data(f"fmnist:{fmnist_root}", calib_size=10)
    train = data.train_dataset()
    assert len(train) == 40 and train.tensors()[0].shape == (40, 1, 28, 28)
    assert _image_bytes(data.calib) <= _image_bytes(train)
    assert not _image_bytes(train) & _image_bytes(data.eval)
    # loaded lazily, on first use: a bundle whose training files went away says so then
    lazy = load_data(f"fmnist:{fmnist_root}", calib_size=10)
    (fmnist_root / "train-images-idx3-ubyte.gz").unlink()
    assert len(data.train_dataset()) == 40  # already loaded, kept
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is missing"):
        lazy.train_dataset()


def test_imagefolder_train_split(tmp_path: Path) -> None:
    cfg = {"input_size": (3, 24, 24), "crop_pct": 1.0}
    root = tmp_path / "ds"
    _png_folder(root / "train", {"a": 4, "b": 3})
    _png_folder(root / "val", {"a": 2, "b": 2})
    data = load_data(f"imagefolder:{root}", model_cfg=cfg, calib_size=2)
    train = data.train_dataset()
    assert len(train) == 7 and [y for _, y in train.samples] == [0] * 4 + [1] * 3
    assert not {p for p, _ in train.samples} & {p for p, _ in data.eval.samples}
    assert train[0][0].shape == (3, 24, 24)
    # an evaluation image that is also a training image is refused
    (root / "val" / "a" / "0.png").unlink()
    (root / "val" / "a" / "0.png").symlink_to(root / "train" / "a" / "1.png")
    with pytest.raises(DataError, match="also evaluation images.*must not hold evaluation images"):
        load_data(f"imagefolder:{root}", model_cfg=cfg).train_dataset()
    flat = _png_folder(tmp_path / "flat", {"a": 3, "b": 3})
    data = load_data(f"imagefolder:{flat}", model_cfg=cfg)
    assert not data.has_train
    with pytest.raises(DataError, match="has no training split: put training images in .*/train/<class>/"):
        data.train_dataset()

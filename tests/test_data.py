"""policysearch.data: the shipped sample, Fashion-MNIST idx files, image folders, clear errors."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from policysearch.data import (
    DataError,
    DataSpec,
    balanced_order,
    load_data,
    make_loader,
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

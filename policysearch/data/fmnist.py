"""The full Fashion-MNIST set: ``fmnist`` or ``fmnist:DIR`` (the idx files, gzipped or not).

Default directory ``/usr/share/datasets/fashion-mnist/`` (``apt-get install -y
dataset-fashion-mnist``), or ``$POLICYSEARCH_FMNIST_DIR``. Calibration images are drawn from the
60,000 training images (seeded, class-balanced), evaluation uses the 10,000 test images, and the
training split is the whole training set; no test image is ever in it.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np

from policysearch.data.base import (
    DEFAULT_CALIB_SIZE,
    SOURCES,
    ArrayDataset,
    DataBundle,
    DataError,
    DataSpec,
    GrayPreprocess,
    LoadRequest,
    Source,
    balanced_order,
    per_channel,
    take,
)
from policysearch.data.classes import map_classes
from policysearch.models.zoo import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD

__all__ = ["FMNIST_DIR", "FMNIST_ENV", "FmnistSource", "fmnist_dir", "read_fmnist", "read_idx"]

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_ENV = "POLICYSEARCH_FMNIST_DIR"
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
INSTALL_HINT = (
    "install it with `apt-get install -y dataset-fashion-mnist`, or point to the idx files "
    f"with `--data fmnist:DIR` or ${FMNIST_ENV}=DIR"
)


# ------------------------------------------------------------------------------------ idx files


def fmnist_dir(path: Path | None = None) -> Path:
    """The Fashion-MNIST directory: ``path``, else ``$POLICYSEARCH_FMNIST_DIR``, else the Debian one."""
    if path is not None:
        return path
    env = os.environ.get(FMNIST_ENV)
    return Path(env).expanduser() if env else FMNIST_DIR


def _idx_file(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}.gz is missing in {root}; {INSTALL_HINT}")


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (gzipped or not) into a uint8 array."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} ({e}); the file is damaged: reinstall the dataset") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (bad header); reinstall the dataset")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path} is truncated or malformed: header says {shape}, "
                        f"{len(raw) - header} bytes of data; reinstall the dataset")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_fmnist(root: Path | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ('train' or 'test'): uint8 images (N, 28, 28) and int64 labels (N,)."""
    root = fmnist_dir(root)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST not found: {root} is not a directory; {INSTALL_HINT}")
    img_stem, lbl_stem = _FMNIST_FILES[split]
    images = read_idx(_idx_file(root, img_stem))
    labels = read_idx(_idx_file(root, lbl_stem)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} files in {root} disagree: images {images.shape}, "
                        f"labels {labels.shape}; reinstall the dataset")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"Fashion-MNIST {split} labels in {root} are outside 0..9; reinstall the dataset")
    return images, labels


# ------------------------------------------------------------------- shared with the zoo sample


def gray_preprocess(model_cfg: dict[str, Any] | None) -> GrayPreprocess:
    """The model's input size and normalization for uint8 grayscale images (Fashion-MNIST's by default)."""
    cfg = model_cfg or {}
    size = tuple(int(v) for v in cfg.get("input_size", (1, 28, 28)))
    if len(size) != 3:
        raise DataError(f"model input_size {size} is not (C, H, W)")
    return GrayPreprocess(input_size=size,  # type: ignore[arg-type]
                          mean=tuple(cfg.get("mean", FMNIST_MEAN)), std=tuple(cfg.get("std", FMNIST_STD)))


class Relabel:
    """Fashion-MNIST label -> model label (a picklable lookup table)."""

    def __init__(self, labels: tuple[int, ...]) -> None:
        self.table = np.asarray(labels, dtype=np.int64)

    def __call__(self, y: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(y, dtype=np.int64)]


def fmnist_bundle(spec: DataSpec, request: LoadRequest, calib: tuple[np.ndarray, np.ndarray],
                  eval_: tuple[np.ndarray, np.ndarray], pre: GrayPreprocess, *, train: Any,
                  train_missing: str = "", **info: Any) -> DataBundle:
    """A bundle of Fashion-MNIST arrays, labelled in the model's class order when its names match.

    ``train`` is a callable ``(preprocess, relabel) -> ArrayDataset`` (or None)."""
    mapping = map_classes(
        FMNIST_CLASSES, request.class_names, what="the Fashion-MNIST classes", noun="Fashion-MNIST classes",
        unmatched_fix="", strict=False,
        default_note="Fashion-MNIST's own label order (0 'T-shirt/top' ... 9 'Ankle boot')")
    relabel = Relabel(mapping.labels)
    c = pre.input_size[0]
    return DataBundle(
        spec=str(spec), calib=ArrayDataset(calib[0], relabel(calib[1]), pre),
        eval=ArrayDataset(eval_[0], relabel(eval_[1]), pre), num_classes=len(mapping.names),
        input_size=pre.input_size, class_names=mapping.names,
        mean=tuple(per_channel(pre.mean, c)), std=tuple(per_channel(pre.std, c)), info=info,
        class_mapping_note=mapping.note,
        train_factory=functools.partial(train, pre, relabel) if train is not None else None,
        train_missing=train_missing,
    )


# --------------------------------------------------------------------------------------- source


def _train_split(root: Path, pre: GrayPreprocess, relabel: Relabel) -> ArrayDataset:
    images, labels = read_fmnist(root, "train")
    return ArrayDataset(images, relabel(labels), pre)


@SOURCES.register("fmnist")
class FmnistSource(Source):
    """``fmnist[:DIR]``: calibration from the training set, evaluation on the test set, train = training set."""

    path = "optional"
    usage = "fmnist, fmnist:DIR"

    def load(self, spec: DataSpec, request: LoadRequest) -> DataBundle:
        root = fmnist_dir(spec.path)
        train_x, train_y = read_fmnist(root, "train")
        test_x, test_y = read_fmnist(root, "test")
        nc = take(request.calib_size or min(DEFAULT_CALIB_SIZE, len(train_y)), len(train_y), "calibration",
                  f"the training set in {root}", "ask for fewer")
        ne = take(request.eval_size, len(test_y), "evaluation", f"the test set in {root}", "ask for fewer")
        calib_idx = balanced_order(train_y, request.seed)[:nc]
        eval_idx = np.arange(len(test_y)) if ne == len(test_y) else balanced_order(test_y, request.seed)[:ne]
        return fmnist_bundle(spec, request, (train_x[calib_idx], train_y[calib_idx]),
                             (test_x[eval_idx], test_y[eval_idx]), gray_preprocess(request.model_cfg),
                             train=functools.partial(_train_split, root), source=str(root),
                             train_split=f"the {len(train_y):,} training images of {root}")

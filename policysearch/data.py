"""Datasets and loaders, chosen by a spec string.

* ``fmnist-sample`` (default): the class-balanced Fashion-MNIST subset shipped in the package
  (calibration images from the training set, evaluation images from the test set);
* ``fmnist`` or ``fmnist:DIR``: the full Fashion-MNIST idx files (default directory
  ``/usr/share/datasets/fashion-mnist/``, or ``$POLICYSEARCH_FMNIST_DIR``);
* ``imagefolder:PATH``: one folder per class (or ``train``/``val`` folders of class folders),
  preprocessed with the model's timm data config (resize, crop, normalize).

Every problem with a dataset raises one :class:`DataError` that names the problem and the fix.
"""
from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_CALIB_SIZE",
    "FMNIST_DIR",
    "DataBundle",
    "DataError",
    "DataSpec",
    "ArrayDataset",
    "ImageFileDataset",
    "GrayPreprocess",
    "balanced_order",
    "load_data",
    "make_loader",
    "read_fmnist",
    "read_idx",
]

log = logging.getLogger(__name__)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_ENV = "POLICYSEARCH_FMNIST_DIR"
DEFAULT_CALIB_SIZE = 512
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPECS = "fmnist-sample (default, shipped), fmnist, fmnist:DIR, imagefolder:PATH"
_INSTALL_HINT = (
    "install it with `apt-get install -y dataset-fashion-mnist`, or point to the idx files "
    f"with `--data fmnist:DIR` or ${FMNIST_ENV}=DIR"
)


class DataError(ValueError):
    """A missing, malformed or unsupported dataset; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------- spec


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """A parsed data spec: ``kind`` in {fmnist-sample, fmnist, imagefolder} and an optional path."""

    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str | DataSpec) -> DataSpec:
        if isinstance(spec, DataSpec):
            return spec
        text = str(spec).strip()
        kind, sep, path = text.partition(":")
        kind = kind.strip().lower()
        if kind in ("fmnist-sample", "sample", "") and not sep:
            return cls(kind="fmnist-sample")
        if kind == "fmnist":
            return cls(kind="fmnist", path=Path(path).expanduser() if path else None)
        if kind == "imagefolder":
            if not path:
                raise DataError("data spec 'imagefolder' needs a folder: use imagefolder:PATH")
            return cls(kind="imagefolder", path=Path(path).expanduser())
        raise DataError(f"unknown data spec {text!r}; valid: {_SPECS}")

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


# ------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True, kw_only=True)
class GrayPreprocess:
    """uint8 grayscale images -> float tensors: /255, resize, repeat channels, normalize."""

    input_size: tuple[int, int, int] = (1, 28, 28)
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: uint8 (N, H, W) or (H, W) -> float32 (N, C, H', W') or (C, H', W')."""
        single = images.dim() == 2
        x = images.reshape(-1, 1, *images.shape[-2:]).float().div_(255.0)
        c, h, w = self.input_size
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if c != 1:
            x = x.expand(-1, c, -1, -1)
        mean = torch.tensor(_per_channel(self.mean, c)).view(1, c, 1, 1)
        std = torch.tensor(_per_channel(self.std, c)).view(1, c, 1, 1)
        x = (x - mean) / std
        return x[0] if single else x


def _per_channel(values: Sequence[float], channels: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise DataError(f"normalization has {len(values)} values, the model wants {channels} channels")


class ArrayDataset(Dataset):
    """In-memory uint8 images + int labels, preprocessed on access (``tensors()`` does all at once)."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 preprocess: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images = torch.as_tensor(np.asarray(images, dtype=np.uint8))
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.preprocess(self.images[i]), int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images (N, C, H, W) float32 and labels (N,) int64."""
        return self.preprocess(self.images), self.labels.clone()


class ImageFileDataset(Dataset):
    """Image files with labels, loaded with PIL and a torchvision/timm transform."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable[[Any], torch.Tensor],
                 mode: str = "RGB") -> None:
        self.samples = list(samples)
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                image = img.convert(self.mode)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}; remove or replace the file") from None
        return self.transform(image), label

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _stack(self)


def _stack(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if len(ds) == 0:
        raise DataError("the dataset is empty")
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.int64)


@dataclass(frozen=True, kw_only=True)
class DataBundle:
    """Calibration and evaluation datasets plus what a model must agree with."""

    spec: str
    calib: Dataset
    eval: Dataset
    num_classes: int
    input_size: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def calib_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _tensors(self.calib)

    def calib_images(self) -> torch.Tensor:
        return self.calib_tensors()[0]

    def eval_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _tensors(self.eval)

    def __str__(self) -> str:
        return (f"{self.spec}: {len(self.calib)} calibration + {len(self.eval)} evaluation images, "
                f"{self.num_classes} classes, input {self.input_size}")


def _tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return ds.tensors() if hasattr(ds, "tensors") else _stack(ds)


def make_loader(ds: Dataset, batch_size: int, shuffle: bool = False, *, seed: int = 0,
                num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    """A DataLoader; shuffling uses its own seeded generator (reproducible)."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      num_workers=num_workers, drop_last=drop_last)


def balanced_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A permutation that shuffles each class (seeded) and interleaves classes round-robin,
    so that every prefix is class-balanced (counts differ by at most one)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rank = np.empty(len(labels), dtype=np.int64)
    for idx in per_class:
        rank[idx] = np.arange(len(idx))
    cls = np.searchsorted(np.unique(labels), labels)
    return np.lexsort((cls, rank))  # by rank within class, then class


# ------------------------------------------------------------------------------------ entry point


def load_data(spec: str | DataSpec = "fmnist-sample", *, model: nn.Module | None = None,
              model_cfg: dict[str, Any] | None = None, calib_size: int | None = None,
              eval_size: int | None = None, seed: int = 0) -> DataBundle:
    """Load calibration and evaluation data for ``spec``, preprocessed for ``model`` (or ``model_cfg``,
    a timm-style data config: input_size, mean, std, interpolation, crop_pct).

    ``calib_size`` defaults to 512 (all of the shipped sample's), ``eval_size`` to every evaluation
    image; subsets are seeded and class-balanced.
    """
    parsed = DataSpec.parse(spec)
    if model_cfg is None and model is not None:
        from policysearch.models.loading import model_data_config

        model_cfg = model_data_config(model)
    for what, n in (("calib_size", calib_size), ("eval_size", eval_size)):
        if n is not None and n < 1:
            raise DataError(f"{what} must be a positive number of images, got {n}")
    if parsed.kind == "fmnist-sample":
        return _load_sample(parsed, model_cfg, calib_size, eval_size)
    if parsed.kind == "fmnist":
        return _load_fmnist(parsed, model_cfg, calib_size, eval_size, seed)
    return _load_imagefolder(parsed, model_cfg, calib_size, eval_size, seed)


# ------------------------------------------------------------------------------- Fashion-MNIST


def _gray_preprocess(model_cfg: dict[str, Any] | None) -> GrayPreprocess:
    from policysearch.models.zoo import FMNIST_MEAN, FMNIST_STD

    cfg = model_cfg or {}
    size = tuple(int(v) for v in cfg.get("input_size", (1, 28, 28)))
    if len(size) != 3:
        raise DataError(f"model input_size {size} is not (C, H, W)")
    return GrayPreprocess(input_size=size,  # type: ignore[arg-type]
                          mean=tuple(cfg.get("mean", FMNIST_MEAN)), std=tuple(cfg.get("std", FMNIST_STD)))


def _bundle(spec: DataSpec, calib: ArrayDataset, eval_: ArrayDataset, pre: GrayPreprocess,
            **info: Any) -> DataBundle:
    from policysearch.models.zoo import FMNIST_CLASSES

    c = pre.input_size[0]
    return DataBundle(spec=str(spec), calib=calib, eval=eval_, num_classes=len(FMNIST_CLASSES),
                      input_size=pre.input_size, class_names=FMNIST_CLASSES,
                      mean=tuple(_per_channel(pre.mean, c)), std=tuple(_per_channel(pre.std, c)), info=info)


def _take(n: int | None, available: int, what: str, source: str, hint: str) -> int:
    if n is None:
        return available
    if n > available:
        raise DataError(f"asked for {n} {what} images but {source} has {available}; {hint}")
    return n


def _load_sample(spec: DataSpec, model_cfg: dict[str, Any] | None, calib_size: int | None,
                 eval_size: int | None) -> DataBundle:
    from policysearch.models.zoo import sample_path

    path = sample_path()
    arrays = _read_sample(path)
    hint = "use `--data fmnist` (the full set) for more"
    nc = _take(calib_size or min(DEFAULT_CALIB_SIZE, len(arrays["calib_labels"])),
               len(arrays["calib_labels"]), "calibration", "the shipped sample", hint)
    ne = _take(eval_size, len(arrays["eval_labels"]), "evaluation", "the shipped sample", hint)
    pre = _gray_preprocess(model_cfg)
    # the sample is stored in class-balanced round-robin order: every prefix is balanced
    calib = ArrayDataset(arrays["calib_images"][:nc], arrays["calib_labels"][:nc], pre)
    eval_ = ArrayDataset(arrays["eval_images"][:ne], arrays["eval_labels"][:ne], pre)
    return _bundle(spec, calib, eval_, pre, source=str(path))


def _read_sample(path: Path) -> dict[str, np.ndarray]:
    fix = ("reinstall policysearch, or regenerate it with "
           "`python -m policysearch.models.zoo.make_sample` (needs dataset-fashion-mnist)")
    if not path.is_file():
        raise DataError(f"the shipped Fashion-MNIST sample {path} is missing; {fix}")
    keys = ("calib_images", "calib_labels", "eval_images", "eval_labels")
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"the shipped Fashion-MNIST sample {path} is unreadable ({e}); {fix}") from None
    return arrays


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
    raise DataError(f"Fashion-MNIST file {stem}.gz is missing in {root}; {_INSTALL_HINT}")


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
        raise DataError(f"Fashion-MNIST not found: {root} is not a directory; {_INSTALL_HINT}")
    img_stem, lbl_stem = _FMNIST_FILES[split]
    images = read_idx(_idx_file(root, img_stem))
    labels = read_idx(_idx_file(root, lbl_stem)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} files in {root} disagree: images {images.shape}, "
                        f"labels {labels.shape}; reinstall the dataset")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"Fashion-MNIST {split} labels in {root} are outside 0..9; reinstall the dataset")
    return images, labels


def _load_fmnist(spec: DataSpec, model_cfg: dict[str, Any] | None, calib_size: int | None,
                 eval_size: int | None, seed: int) -> DataBundle:
    root = fmnist_dir(spec.path)
    train_x, train_y = read_fmnist(root, "train")
    test_x, test_y = read_fmnist(root, "test")
    nc = _take(calib_size or min(DEFAULT_CALIB_SIZE, len(train_y)), len(train_y), "calibration",
               f"the training set in {root}", "ask for fewer")
    ne = _take(eval_size, len(test_y), "evaluation", f"the test set in {root}", "ask for fewer")
    calib_idx = balanced_order(train_y, seed)[:nc]
    eval_idx = np.arange(len(test_y)) if ne == len(test_y) else balanced_order(test_y, seed)[:ne]
    pre = _gray_preprocess(model_cfg)
    return _bundle(spec, ArrayDataset(train_x[calib_idx], train_y[calib_idx], pre),
                   ArrayDataset(test_x[eval_idx], test_y[eval_idx], pre), pre, source=str(root))


# ----------------------------------------------------------------------------------- ImageFolder


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and (file, label) pairs of a folder with one subfolder per class."""
    classes = _class_folders(root)
    if not classes:
        raise DataError(f"folder {root} has no class subfolders; imagefolder:PATH wants one "
                        "subfolder per class holding its images (PATH/<class>/<image>)")
    samples: list[tuple[Path, int]] = []
    empty = []
    for label, folder in enumerate(classes):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            empty.append(folder.name)
        samples += [(p, label) for p in files]
    if empty:
        raise DataError(f"class folder(s) {', '.join(empty[:5])} in {root} hold no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)")
    return [p.name for p in classes], samples


def _split_dirs(root: Path) -> tuple[Path, Path] | None:
    calib = next((root / n for n in ("calib", "train") if (root / n).is_dir()), None)
    eval_ = next((root / n for n in ("eval", "val", "test") if (root / n).is_dir()), None)
    return (calib, eval_) if calib is not None and eval_ is not None else None


def _timm_transform(model_cfg: dict[str, Any] | None) -> tuple[Callable[[Any], torch.Tensor], dict[str, Any]]:
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(pretrained_cfg=dict(model_cfg or {"input_size": (3, 224, 224)}))
    cfg["mean"] = tuple(_per_channel(cfg["mean"], cfg["input_size"][0]))
    cfg["std"] = tuple(_per_channel(cfg["std"], cfg["input_size"][0]))
    return create_transform(**cfg, is_training=False), cfg


def _load_imagefolder(spec: DataSpec, model_cfg: dict[str, Any] | None, calib_size: int | None,
                      eval_size: int | None, seed: int) -> DataBundle:
    root = spec.path
    assert root is not None
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory; "
                        "use imagefolder:PATH with PATH/<class>/<image>")
    split = _split_dirs(root)
    if split is not None:
        classes, calib_samples = _scan(split[0])
        eval_classes, eval_samples = _scan(split[1])
        if eval_classes != classes:
            raise DataError(f"{split[0]} and {split[1]} have different class folders; they must match")
        nc = _take(calib_size or min(DEFAULT_CALIB_SIZE, len(calib_samples)), len(calib_samples),
                   "calibration", str(split[0]), "ask for fewer")
        calib_pick = _pick(calib_samples, nc, seed)
        ne = _take(eval_size, len(eval_samples), "evaluation", str(split[1]), "ask for fewer")
        eval_pick = _pick(eval_samples, ne, seed)
    else:
        classes, samples = _scan(root)
        if len(samples) < 2:
            raise DataError(f"{root} has {len(samples)} image(s); it needs some for calibration "
                            "and some for evaluation")
        order = [samples[i] for i in balanced_order(np.array([s[1] for s in samples]), seed)]
        nc = _take(calib_size or min(DEFAULT_CALIB_SIZE, len(order) // 5 or 1), len(order) - 1,
                   "calibration", f"{root} (keeping one for evaluation)", "ask for fewer")
        ne = _take(eval_size, len(order) - nc, "evaluation", f"{root} after calibration", "ask for fewer")
        calib_pick, eval_pick = order[:nc], order[nc:nc + ne]
    transform, cfg = _timm_transform(model_cfg)
    mode = "L" if cfg["input_size"][0] == 1 else "RGB"
    return DataBundle(
        spec=str(spec), calib=ImageFileDataset(calib_pick, transform, mode),
        eval=ImageFileDataset(eval_pick, transform, mode), num_classes=len(classes),
        input_size=tuple(int(v) for v in cfg["input_size"]),  # type: ignore[arg-type]
        class_names=tuple(classes), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        info={"source": str(root), "data_config": cfg},
    )


def _pick(samples: list[tuple[Path, int]], n: int, seed: int) -> list[tuple[Path, int]]:
    if n == len(samples):
        return samples
    return [samples[i] for i in balanced_order(np.array([s[1] for s in samples]), seed)[:n]]

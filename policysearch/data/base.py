"""What every data source shares: the spec, the error, the datasets, the bundle, and the source registry.

A source is a class registered in :data:`SOURCES` (``@SOURCES.register("fmnist")``) with a
``load(spec, request) -> DataBundle`` method; :func:`load_data` parses the spec, finds the source
and hands it a :class:`LoadRequest`. Every problem raises one :class:`DataError` that names the
problem and the fix.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from policysearch.errors import PolicySearchError
from policysearch.models.loading import model_class_names, model_data_config
from policysearch.registry import Registry

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_CALIB_SIZE",
    "DEFAULT_SOURCE",
    "SOURCES",
    "ArrayDataset",
    "DataBundle",
    "DataError",
    "DataSpec",
    "GrayPreprocess",
    "ImageFileDataset",
    "LoadRequest",
    "Source",
    "balanced_order",
    "load_data",
    "make_loader",
    "valid_specs",
]

log = logging.getLogger("policysearch.data")

DEFAULT_CALIB_SIZE = 512
DEFAULT_SOURCE = "fmnist-sample"
#: other spellings of a source name
_ALIASES = {"": DEFAULT_SOURCE, "sample": DEFAULT_SOURCE}


class DataError(PolicySearchError, ValueError):
    """A missing, malformed or unsupported dataset; the message names the problem and the fix."""


# -------------------------------------------------------------------------------------- sources


@dataclass(frozen=True, kw_only=True)
class LoadRequest:
    """What :func:`load_data` asks of a source: preprocessing, class names, subset sizes, seed."""

    model_cfg: dict[str, Any] | None = None
    #: the model's class names (label ``i`` is ``class_names[i]``), or None when it has none
    class_names: tuple[str, ...] | None = None
    calib_size: int | None = None
    eval_size: int | None = None
    seed: int = 0


class Source:
    """A registered data source. Subclasses set the class attributes and implement :meth:`load`."""

    #: "none" (``NAME`` only), "optional" (``NAME`` or ``NAME:PATH``), "required" (``NAME:PATH``)
    path: ClassVar[str] = "none"
    #: how the spec is written, for error messages and ``--help``
    usage: ClassVar[str] = ""

    def load(self, spec: DataSpec, request: LoadRequest) -> DataBundle:
        raise NotImplementedError


SOURCES: Registry[type[Source]] = Registry("data source")


def valid_specs() -> str:
    """The spec forms of every registered source, the default first."""
    names = sorted(SOURCES.names(), key=lambda n: (n != DEFAULT_SOURCE, n))
    return ", ".join(SOURCES.get(n).usage or n for n in names)


# ----------------------------------------------------------------------------------------- spec


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """A parsed data spec ``KIND`` or ``KIND:PATH``: ``kind`` is a registered source name."""

    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str | DataSpec) -> DataSpec:
        if isinstance(spec, DataSpec):
            return spec
        text = str(spec).strip()
        kind, sep, path = text.partition(":")
        kind = kind.strip().lower()
        kind = _ALIASES.get(kind, kind)
        if kind not in SOURCES:
            raise DataError(f"unknown data spec {text!r}; valid: {valid_specs()}")
        source = SOURCES.get(kind)
        path = path.strip()
        if source.path == "none" and sep:
            raise DataError(f"data spec {text!r}: {kind} takes no path; valid: {valid_specs()}")
        if source.path == "required" and not path:
            raise DataError(f"data spec {kind!r} needs a folder: use {source.usage or kind + ':PATH'}")
        return cls(kind=kind, path=Path(path).expanduser() if path else None)

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
        mean = torch.tensor(per_channel(self.mean, c)).view(1, c, 1, 1)
        std = torch.tensor(per_channel(self.std, c)).view(1, c, 1, 1)
        x = (x - mean) / std
        return x[0] if single else x


def per_channel(values: Sequence[float], channels: int) -> list[float]:
    """``values`` (mean or std) for ``channels`` channels: as is, repeated, or averaged."""
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


# --------------------------------------------------------------------------------------- bundle


@dataclass(frozen=True, kw_only=True)
class DataBundle:
    """Calibration, evaluation and (lazily) training datasets plus what a model must agree with.

    ``class_names[i]`` names label ``i``; ``class_mapping_note`` says in one sentence how the
    source's classes became those labels (printable by the CLI). ``train_dataset()`` builds the
    source's training split on first use; it never holds an evaluation image.
    """

    spec: str
    calib: Dataset
    eval: Dataset
    num_classes: int
    input_size: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict)
    class_mapping_note: str = ""
    #: builds the training split (None: the source has none; ``train_missing`` says why)
    train_factory: Callable[[], Dataset] | None = field(default=None, repr=False, compare=False)
    train_missing: str = ""
    _cache: dict[str, Dataset] = field(default_factory=dict, init=False, repr=False, compare=False)

    def calib_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _tensors(self.calib)

    def calib_images(self) -> torch.Tensor:
        return self.calib_tensors()[0]

    def eval_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _tensors(self.eval)

    @property
    def has_train(self) -> bool:
        return self.train_factory is not None

    def train_dataset(self) -> Dataset:
        """The training split, loaded on first call and then kept (preprocessed like the other
        splits, no augmentation); a :class:`DataError` when the source has none."""
        if "train" not in self._cache:
            if self.train_factory is None:
                raise DataError(self.train_missing or f"the data {self.spec} has no training split")
            self._cache["train"] = self.train_factory()
        return self._cache["train"]

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


def take(n: int | None, available: int, what: str, source: str, hint: str) -> int:
    """``n`` images (all when None), or a :class:`DataError` when ``source`` has fewer."""
    if n is None:
        return available
    if n > available:
        raise DataError(f"asked for {n} {what} images but {source} has {available}; {hint}")
    return n


# ------------------------------------------------------------------------------------ entry point


def load_data(spec: str | DataSpec = DEFAULT_SOURCE, *, model: nn.Module | None = None,
              model_cfg: dict[str, Any] | None = None, class_names: Sequence[str] | None = None,
              calib_size: int | None = None, eval_size: int | None = None, seed: int = 0) -> DataBundle:
    """Load calibration and evaluation data (and a lazy training split) for ``spec``, preprocessed
    for ``model`` (or ``model_cfg``, a timm-style data config: input_size, mean, std,
    interpolation, crop_pct).

    ``class_names`` (default: the model's own, see ``models.loading.model_class_names``) label the
    data in the model's class order where the source's class names match them. ``calib_size``
    defaults to 512 (all of the shipped sample's), ``eval_size`` to every evaluation image; subsets
    are seeded and class-balanced.
    """
    parsed = DataSpec.parse(spec)
    if model is not None:
        if model_cfg is None:
            model_cfg = model_data_config(model)
        if class_names is None:
            class_names = model_class_names(model)
    for what, n in (("calib_size", calib_size), ("eval_size", eval_size)):
        if n is not None and n < 1:
            raise DataError(f"{what} must be a positive number of images, got {n}")
    request = LoadRequest(model_cfg=model_cfg, class_names=tuple(class_names) if class_names else None,
                          calib_size=calib_size, eval_size=eval_size, seed=seed)
    bundle = SOURCES.get(parsed.kind)().load(parsed, request)
    if bundle.class_mapping_note:
        log.info("%s: %s", bundle.spec, bundle.class_mapping_note)
    return bundle

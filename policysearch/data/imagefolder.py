"""Image folders: ``imagefolder:PATH``, one subfolder per class, preprocessed with the model's timm
data config (resize, crop, normalize).

Layouts:

* ``PATH/<class>/<image>``: calibration and evaluation images are disjoint, seeded,
  class-balanced parts of the same images; there is no training split.
* ``PATH/{calib|train}/<class>/...`` plus ``PATH/{eval|val|test}/<class>/...``: calibration from
  ``calib/`` (else ``train/``), evaluation from the first of ``eval/``, ``val/``, ``test/``; the
  training split is ``PATH/train/`` when it exists, and it may not share a file with the
  evaluation folder.

Labels: when the model has class names and every class folder matches one of them (ignoring case
and punctuation: ``t_shirt_top`` is ``T-shirt/top``), a folder gets the model's index of its class.
Without model class names, folders are labelled in sorted name order, as torchvision's
``ImageFolder`` does. :attr:`DataBundle.class_mapping_note` says which happened.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import create_transform, resolve_data_config

from policysearch.data.base import (
    DEFAULT_CALIB_SIZE,
    SOURCES,
    DataBundle,
    DataError,
    DataSpec,
    ImageFileDataset,
    LoadRequest,
    Source,
    balanced_order,
    per_channel,
    take,
)
from policysearch.data.classes import ClassMapping, map_classes

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderSource", "scan_folder", "split_dirs"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CALIB_DIRS = ("calib", "train")
EVAL_DIRS = ("eval", "val", "test")
TRAIN_DIR = "train"

Samples = list[tuple[Path, int]]


def _class_folders(root: Path) -> list[Path]:
    # sorted by name, as torchvision's ImageFolder (hidden folders are skipped)
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def scan_folder(root: Path) -> tuple[list[str], Samples]:
    """Class-folder names (sorted) and (file, folder index) pairs of ``root``/<class>/<image>."""
    classes = _class_folders(root)
    if not classes:
        raise DataError(f"folder {root} has no class subfolders; imagefolder:PATH wants one "
                        "subfolder per class holding its images (PATH/<class>/<image>)")
    samples: Samples = []
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


def split_dirs(root: Path) -> tuple[Path, Path] | None:
    """(calibration folder, evaluation folder) when ``root`` has both, else None (one flat folder)."""
    calib = next((root / n for n in CALIB_DIRS if (root / n).is_dir()), None)
    eval_ = next((root / n for n in EVAL_DIRS if (root / n).is_dir()), None)
    return (calib, eval_) if calib is not None and eval_ is not None else None


def _timm_transform(model_cfg: dict[str, Any] | None) -> tuple[Callable[[Any], torch.Tensor], dict[str, Any]]:
    cfg = resolve_data_config(pretrained_cfg=dict(model_cfg or {"input_size": (3, 224, 224)}))
    cfg["mean"] = tuple(per_channel(cfg["mean"], cfg["input_size"][0]))
    cfg["std"] = tuple(per_channel(cfg["std"], cfg["input_size"][0]))
    return create_transform(**cfg, is_training=False), cfg


def _pick(samples: Samples, n: int, seed: int) -> Samples:
    if n == len(samples):
        return samples
    return [samples[i] for i in balanced_order(np.array([s[1] for s in samples]), seed)[:n]]


def _relabel(samples: Samples, mapping: ClassMapping) -> Samples:
    return [(p, mapping.labels[i]) for p, i in samples]


def _mapping(folder: Path, classes: list[str], request: LoadRequest) -> ClassMapping:
    shown = ", ".join(f"{i} {c!r}" for i, c in enumerate(classes[:4])) + (", ..." if len(classes) > 4 else "")
    return map_classes(
        classes, request.class_names, what=f"the class folders of {folder}", noun="class folders",
        unmatched_fix="rename the folders after the model's classes (case and punctuation do not matter), "
                      "or use a model trained on these classes",
        default_note=f"labels follow the sorted class-folder names ({shown}), as torchvision's ImageFolder "
                     "does; the model has no class names to match them against")


def _train_split(train_dir: Path, classes: list[str], eval_files: frozenset[Path], mapping: ClassMapping,
                 transform: Callable[[Any], torch.Tensor], mode: str) -> ImageFileDataset:
    train_classes, samples = scan_folder(train_dir)
    if train_classes != classes:
        raise DataError(f"{train_dir} and the evaluation folder have different class folders "
                        f"({', '.join(sorted(set(train_classes) ^ set(classes))[:5])}); they must match")
    shared = [p for p, _ in samples if p.resolve() in eval_files]
    if shared:
        raise DataError(f"{len(shared)} image(s) of {train_dir} are also evaluation images "
                        f"(e.g. {shared[0]}); the training split must not hold evaluation images: "
                        "remove them from one of the folders")
    return ImageFileDataset(_relabel(samples, mapping), transform, mode)


@SOURCES.register("imagefolder")
class ImageFolderSource(Source):
    """``imagefolder:PATH``: class folders, optionally under calib/train and eval/val/test folders."""

    path = "required"
    usage = "imagefolder:PATH"

    def load(self, spec: DataSpec, request: LoadRequest) -> DataBundle:
        root = spec.path
        assert root is not None
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a directory; "
                            "use imagefolder:PATH with PATH/<class>/<image>")
        seed = request.seed
        split = split_dirs(root)
        train_dir = root / TRAIN_DIR if split is not None and (root / TRAIN_DIR).is_dir() else None
        if split is not None:
            classes, calib_samples = scan_folder(split[0])
            eval_classes, eval_samples = scan_folder(split[1])
            if eval_classes != classes:
                raise DataError(f"{split[0]} and {split[1]} have different class folders; they must match")
            mapping = _mapping(split[1], classes, request)
            nc = take(request.calib_size or min(DEFAULT_CALIB_SIZE, len(calib_samples)), len(calib_samples),
                      "calibration", str(split[0]), "ask for fewer")
            calib_pick = _pick(calib_samples, nc, seed)
            ne = take(request.eval_size, len(eval_samples), "evaluation", str(split[1]), "ask for fewer")
            eval_pick = _pick(eval_samples, ne, seed)
        else:
            classes, samples = scan_folder(root)
            mapping = _mapping(root, classes, request)
            if len(samples) < 2:
                raise DataError(f"{root} has {len(samples)} image(s); it needs some for calibration "
                                "and some for evaluation")
            order = [samples[i] for i in balanced_order(np.array([s[1] for s in samples]), seed)]
            nc = take(request.calib_size or min(DEFAULT_CALIB_SIZE, len(order) // 5 or 1), len(order) - 1,
                      "calibration", f"{root} (keeping one for evaluation)", "ask for fewer")
            ne = take(request.eval_size, len(order) - nc, "evaluation", f"{root} after calibration",
                      "ask for fewer")
            calib_pick, eval_pick = order[:nc], order[nc:nc + ne]
            eval_samples = eval_pick
        transform, cfg = _timm_transform(request.model_cfg)
        mode = "L" if cfg["input_size"][0] == 1 else "RGB"
        train_factory = None
        if train_dir is not None:
            # every evaluation file, not only the evaluated subset: none may be trained on
            eval_files = frozenset(p.resolve() for p, _ in eval_samples)
            train_factory = functools.partial(_train_split, train_dir, classes, eval_files, mapping, transform, mode)
        return DataBundle(
            spec=str(spec), calib=ImageFileDataset(_relabel(calib_pick, mapping), transform, mode),
            eval=ImageFileDataset(_relabel(eval_pick, mapping), transform, mode),
            num_classes=len(mapping.names),
            input_size=tuple(int(v) for v in cfg["input_size"]),  # type: ignore[arg-type]
            class_names=mapping.names, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
            info={"source": str(root), "data_config": cfg,
                  "class_to_idx": {c: mapping.labels[i] for i, c in enumerate(classes)},
                  "train_split": str(train_dir) if train_dir is not None else None},
            class_mapping_note=mapping.note, train_factory=train_factory,
            train_missing=f"imagefolder:{root} has no training split: put training images in "
                          f"{root}/train/<class>/ and evaluation images in {root}/val/<class>/",
        )
